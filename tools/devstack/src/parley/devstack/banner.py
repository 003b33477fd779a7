"""What `parley-devstack run` prints once the stack is up."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from parley.devstack.credentials import SECRET_FILE_NAME
from parley.devstack.stack import Endpoints, redact

__all__ = ["banner"]


def _shown(path: Path) -> str:
    """`path` relative to the current directory when it is below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _token_hint(data_dir: Path, secret_from_env: bool) -> str:
    command = f"{_shown(Path(sys.executable).parent / 'parley')} token --sub 1 --scope users:write"
    if secret_from_env:
        return command
    # `parley token` finds .parley/jwt-secret in the current directory or any parent.
    cwd = Path.cwd()
    if data_dir.name == ".parley" and (data_dir.parent == cwd or data_dir.parent in cwd.parents):
        return command
    secret_file = _shown(data_dir / SECRET_FILE_NAME)
    return f'PARLEY_JWT_SECRET="$(cat {secret_file})" {command}'


def banner(endpoints: Endpoints, data_dir: Path, *, secret_from_env: bool) -> str:
    """The addresses of the running stack and how to get a token for it."""
    redis = redact(endpoints.redis_url)
    if endpoints.redis_prefix is not None:
        redis += f"    prefix {endpoints.redis_prefix}"
    rows = [
        ("UserService", f"{endpoints.user}    metrics {endpoints.user_metrics}"),
        ("ChatService", f"{endpoints.chat}    metrics {endpoints.chat_metrics}"),
        ("ChatService 2", f"{endpoints.chat2}    metrics {endpoints.chat2_metrics}"),
        ("Postgres", redact(endpoints.database_url)),
        ("Redis", redis),
    ]
    logs = data_dir / "logs"
    where = f" (server logs in {_shown(logs)})" if logs.is_dir() else ""
    rows.append(("Data", f"{_shown(data_dir)}{os.sep}{where}"))
    width = max(len(name) for name, _ in rows) + 1
    lines = ["", "Parley is running. Ctrl-C stops it.", ""]
    lines += [f"  {name:<{width}} {value}" for name, value in rows]
    lines += ["", "A token for the API:", f"  {_token_hint(data_dir, secret_from_env)}", ""]
    return "\n".join(lines)
