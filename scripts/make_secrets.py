#!/usr/bin/env python3
"""Write fresh random secrets into .env for docker compose: PARLEY_JWT_SECRET,
POSTGRES_PASSWORD and REDIS_PASSWORD.

.env is made from .env.example when it does not exist. Only a secret that is missing or
empty gets a value: one that is set is kept unless --force is given, because Postgres keeps
the password it was first started with in its volume, and a new one would lock the stack
out. The values are URL-safe (A-Z a-z 0-9 - _), so they go into URLs as they are, and .env
is left readable by its owner only. Standard library only: runs with any python3.

Usage: python3 scripts/make_secrets.py [--env .env] [--example .env.example] [--force]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each secret and the bytes of randomness in it (token_urlsafe: 4 characters per 3 bytes).
SECRETS = {"PARLEY_JWT_SECRET": 48, "POSTGRES_PASSWORD": 32, "REDIS_PASSWORD": 32}

_ASSIGNMENT = re.compile(r"^(\s*(?:export\s+)?)([A-Za-z_][A-Za-z0-9_]*)(\s*=\s*)(.*)$")


def _is_empty(value: str) -> bool:
    return value.strip() in ("", '""', "''")


def fill(lines: list[str], force: bool) -> tuple[list[str], dict[str, str]]:
    """The lines with every missing or empty secret (every secret, with `force`) set to a
    new random value, and what happened to each secret: "wrote", "replaced" or "kept"."""
    values = {name: secrets.token_urlsafe(size) for name, size in SECRETS.items()}
    done: dict[str, str] = {}
    result: list[str] = []
    for line in lines:
        match = _ASSIGNMENT.match(line)
        if match is None or match.group(2) not in SECRETS:
            result.append(line)
            continue
        prefix, name, equals, value = match.groups()
        if name in done:
            continue  # a repeated assignment: the one kept or written above stands
        if _is_empty(value):
            done[name] = "wrote"
        elif force:
            done[name] = "replaced"
        else:
            done[name] = "kept"
            result.append(line)
            continue
        result.append(f"{prefix}{name}{equals}{values[name]}")
    for name in SECRETS:
        if name not in done:
            done[name] = "wrote"
            result.append(f"{name}={values[name]}")
    return result, done


def write_private(path: Path, text: str) -> None:
    """Replaces `path` with `text` in one step, readable and writable by its owner only."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", type=Path, default=ROOT / ".env", help="default: .env")
    parser.add_argument(
        "--example", type=Path, default=ROOT / ".env.example", help="default: .env.example"
    )
    parser.add_argument("--force", action="store_true", help="replace secrets already set")
    args = parser.parse_args(argv)

    env: Path = args.env
    if env.exists():
        text = env.read_text(encoding="utf-8")
    elif args.example.exists():
        text = args.example.read_text(encoding="utf-8")
        print(f"{env.name}: made from {args.example.name}")
    else:
        text = ""
    lines, done = fill(text.splitlines(), args.force)
    write_private(env, "\n".join(lines) + "\n")
    for name, what in done.items():
        if what == "kept":
            print(f"{env.name}: kept {name}, which is set (FORCE=1 replaces it)")
        else:
            print(f"{env.name}: {what} {name} with a new random value")
    if done["POSTGRES_PASSWORD"] == "replaced":
        print(
            f"{env.name}: an existing Postgres volume keeps the old password; "
            "`docker compose down -v` drops it, and the data with it",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
