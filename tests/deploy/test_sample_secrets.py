"""No tracked file holds a secret the services would accept: every JWT secret or password
written in the repository (compose and env files, the chart and its CI values, docs, scripts,
tests) is one that libs/chassis/src/parley/chassis/sample_secrets.py lists, or one the
settings code refuses anyway (too short). A new sample secret fails this test until it is
generated at run time instead, or listed there.

What counts as a secret: the value given to a name that ends in secret or password
(PARLEY_JWT_SECRET=..., jwtSecret: ..., JWT_SECRET = "...", {"POSTGRES_PASSWORD": ...},
password=..., secret=...), the key passed to make_token/mint_token/jwt.encode, the password of
a postgresql:// or redis:// URL and the argument of requirepass. Python is read with `ast`, so
"a" * 32 counts as the string it makes; values with $, {, < or * are references, templates or
placeholders, not secrets."""

from __future__ import annotations

import ast
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
import yaml

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env
from parley.chassis.sample_secrets import SAMPLE_SECRETS
from parley.chat_service.settings import ChatSettings

from .tools import REPO

LIST = "libs/chassis/src/parley/chassis/sample_secrets.py"
JWT = "JWT secret"
PASSWORD = "password"
_PASSWORD_WORDS = {"password", "passwd", "pw"}
# NAME=value, in env files, shell lines, --set arguments, libpq strings and Python strings.
# ($name = ... is a template's or shell's variable, given a computed value.)
_ASSIGNMENT = re.compile(
    r"(?<!\$)\b([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(?!=)[ \t]*(\"[^\"]*\"|'[^']*'|[^\s\"',;)}\]]+)"
)
_URL_PASSWORD = re.compile(r"\b(?:postgres(?:ql)?|rediss?|unix)://[^\s:/@'\"]*:([^\s@/'\"]+)@")
# --requirepass VALUE (or =VALUE, or as items of a list), and a configuration line.
_REQUIREPASS = re.compile(
    r"--requirepass(?:[ \t]*=[ \t]*|[\"']?,?[ \t]+[\"']?)(\"[^\"]*\"|'[^']*'|[^\s\"',\]]+)"
    r"|^[ \t]*requirepass[ \t]+(\"[^\"]*\"|'[^']*'|\S+)",
    re.MULTILINE,
)
_NOT_A_VALUE = re.compile(r"[${}<>*]|%[sdv]|^\.\.\.$")
_TEXT_SUFFIXES = {".env", ".example", ".md", ".txt", ".tpl", ".sh", ".toml", ".cfg", ".ini",
                  ".json", ".mk", ""}  # fmt: skip


@dataclass(frozen=True)
class Found:
    where: str  # path:line
    role: str  # JWT or PASSWORD
    value: str


def secret_role(name: str) -> str | None:
    """JWT or PASSWORD when `name` (any case style) names a secret, e.g. jwtSecret, DB_PASSWORD."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    if not words or words[0] == "existing":  # existingSecret names a Secret object
        return None
    if words[-1] in _PASSWORD_WORDS:
        return PASSWORD
    return JWT if words[-1] == "secret" else None


def _value(raw: str) -> str | None:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        raw = raw[1:-1]
    return None if not raw or _NOT_A_VALUE.search(raw) else raw


def scan_text(path: str, text: str, first_line: int = 1) -> Iterator[Found]:
    def where(offset: int) -> str:
        return f"{path}:{first_line + text.count(chr(10), 0, offset)}"

    for match in _ASSIGNMENT.finditer(text):
        role, value = secret_role(match.group(1)), _value(match.group(2))
        if text.endswith("keys.", 0, match.start()):
            continue  # --set secret.keys.jwtSecret=NAME: a key's name inside a Secret
        if role and value:
            yield Found(where(match.start()), role, value)
    for match in _URL_PASSWORD.finditer(text):
        value = _value(match.group(1))
        if value:
            yield Found(where(match.start()), PASSWORD, unquote(value))
    for match in _REQUIREPASS.finditer(text):
        value = _value(match.group(1) or match.group(2))
        if value:
            yield Found(where(match.start()), PASSWORD, value)


def _constant(node: ast.AST | None) -> str | None:
    """The string a constant expression makes ("a" + "b", "x" * 32), else None."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.BinOp):
        left, right = node.left, node.right
        if isinstance(node.op, ast.Add):
            a, b = _constant(left), _constant(right)
            return a + b if a is not None and b is not None else None
        if isinstance(node.op, ast.Mult):
            for text, times in ((left, right), (right, left)):
                s = _constant(text)
                if s is not None and isinstance(times, ast.Constant) and type(times.value) is int:
                    return s * times.value
    return None


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


def scan_python(path: str, text: str) -> Iterator[Found]:
    try:
        tree = ast.parse(text)
    except SyntaxError:  # being edited: read it as text
        yield from scan_text(path, text)
        return
    pairs: list[tuple[str, ast.AST | None, int]] = []  # (name, value node, line)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            pairs += [(_name(target), node.value, node.lineno) for target in node.targets]
        elif isinstance(node, ast.AnnAssign):
            pairs.append((_name(node.target), node.value, node.lineno))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                pairs.append((_constant(key) or "", value, node.lineno))
        elif isinstance(node, ast.Call):
            callee = _name(node.func)
            for keyword in node.keywords:
                name = keyword.arg or ""
                if name == "key" and "token" in callee:
                    name = "secret"
                pairs.append((name, keyword.value, node.lineno))
            # The signing key: make_token(key, ...), mint_token(key, ...), jwt.encode(p, key).
            position = {"make_token": 0, "mint_token": 0, "encode": 1, "decode": 1}.get(callee)
            if position is not None and len(node.args) > position:
                pairs.append(("secret", node.args[position], node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield from scan_text(path, node.value, node.lineno)
    for name, value_node, line in pairs:
        role, value = secret_role(name), _constant(value_node)
        if role and value and _value(value):
            yield Found(f"{path}:{line}", role, value)


def _yaml_found(path: str, node: Any, parent: str) -> Iterator[Found]:
    if isinstance(node, dict):
        for key, value in node.items():
            role = secret_role(str(key))
            # secret.keys.* are the key names inside a Secret, not secrets.
            if role and isinstance(value, str) and parent != "keys" and _value(value):
                yield Found(f"{path} ({key})", role, _value(value) or "")
            yield from _yaml_found(path, value, str(key))
    elif isinstance(node, list):
        # A command's arguments are items: read the strings as one line, e.g. --requirepass X.
        yield from scan_text(f"{path} ({parent})", " ".join(i for i in node if isinstance(i, str)))
        for item in node:
            if not isinstance(item, str):
                yield from _yaml_found(path, item, parent)
    elif isinstance(node, str):
        yield from scan_text(f"{path} ({parent})", node)


def scan_file(path: str, text: str) -> list[Found]:
    suffix = Path(path).suffix
    if suffix == ".py":
        return list(scan_python(path, text))
    if suffix in (".yaml", ".yml") and "{{" not in text:
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            return list(scan_text(path, text))
        return [f for doc in documents for f in _yaml_found(path, doc, "")]
    return list(scan_text(path, text))


def accepted(found: Found) -> bool:
    """Whether a service would start with this value in the place it was found in."""
    try:
        if found.role == JWT:
            AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": found.value}))
        else:
            url = f"postgresql://parley:{quote(found.value, safe='')}@db:5432/parley"
            DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": url}))
    except ConfigError:
        return False
    return True


def tracked_files() -> list[str]:
    """Files git tracks, and new ones it would (not ignored), so a secret is caught before
    its commit. .env is left out: `make secrets` writes real secrets there."""
    result = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    return sorted({name for name in result.stdout.split("\0") if name and name != ".env"})


def repository_secrets() -> list[Found]:
    found: list[Found] = []
    for name in tracked_files():
        path = REPO / name
        if name == "uv.lock" or not path.is_file():
            continue  # hashes only; a tracked file deleted in the working tree
        if path.suffix not in (".py", ".yaml", ".yml") and path.suffix not in _TEXT_SUFFIXES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += scan_file(name, text)
    return found


def test_every_secret_in_the_repository_is_refused_by_the_services() -> None:
    found = repository_secrets()
    # Files known to hold listed secrets: the scan must see them.
    places = {f.where.split(":")[0].split(" ")[0] for f in found}
    assert {
        "libs/chassis/tests/test_sample_secrets.py",
        "tools/devstack/tests/test_devstack_cli.py",
    } <= places
    taken = [f for f in found if accepted(f)]
    assert not taken, (
        "secrets in tracked files that the services would accept; generate them at run time "
        f"(secrets.token_urlsafe(32)) or list them in {LIST}:\n"
        + "\n".join(f"  {f.where}: {f.role} {f.value!r}" for f in taken)
    )


def test_the_published_compose_defaults_are_listed() -> None:
    assert {"change-me-this-is-a-local-development-secret", "parley"} <= SAMPLE_SECRETS


@pytest.mark.parametrize("password", ["parley", "PASSWORD"])
def test_chat_refuses_a_sample_redis_password(password: str) -> None:
    env = {
        "PARLEY_DATABASE_URL": "postgresql://parley@db:5432/parley",
        "PARLEY_JWT_SECRET": secrets.token_urlsafe(32),
        "PARLEY_REDIS_URL": f"redis://:{password}@redis:6379/0",
    }
    with pytest.raises(ConfigError) as info:
        ChatSettings.from_env(Env(env))
    assert info.value.variable == "PARLEY_REDIS_URL"
    assert "sample value published in the Parley repository" in str(info.value)
    fresh = secrets.token_urlsafe(32)
    redis_url = ChatSettings.from_env(Env(env | {"PARLEY_REDIS_URL": f"redis://:{fresh}@r/0"}))
    assert redis_url.redis_url.endswith("@r/0")


# --- The scan itself: it finds a new secret in each place it looks, and only those -------


def _fresh() -> str:
    return secrets.token_urlsafe(32)


def test_the_scan_finds_a_new_secret_in_every_kind_of_file() -> None:
    s = _fresh()
    listed = "change-me-this-is-a-local-development-secret"
    cases: dict[str, tuple[str, str]] = {
        "a.env": (f"# x\nPARLEY_JWT_SECRET={s}\nPOSTGRES_PASSWORD=\n", JWT),
        "b.env": (f"POSTGRES_PASSWORD={s}\n", PASSWORD),
        "c.md": (f"    --set secret.jwtSecret={s} \\\n", JWT),
        "d.md": (f"PARLEY_DATABASE_URL=postgresql://app:{s}@db/x\n", PASSWORD),
        "e.yaml": (f"secret:\n  keys:\n    jwtSecret: PARLEY_JWT_SECRET\n  jwtSecret: {s}\n", JWT),
        "f.yaml": (
            f"services:\n  redis:\n    command: [redis-server, --requirepass, {s}]\n",
            PASSWORD,
        ),
        "g.yml": (f"env:\n  - REDIS_URL=redis://:{s}@redis:6379/0\n", PASSWORD),
        "h.tpl": (f'args: ["--requirepass", "{s}"]  {{{{ .Values.x }}}}\n', PASSWORD),
        "i.py": (f'JWT_SECRET = "{s[:16]}" + "{s[16:]}"\n', JWT),
        "j.py": (f'ENV = {{"PARLEY_JWT_SECRET": "{s}"}}\n', JWT),
        "k.py": (f'token = make_token("{s}", "1")\n', JWT),
        "l.py": (f'forged = jwt.encode({{}}, "{s}", algorithm="HS256")\n', JWT),
        "m.py": (f'run(settings(password="{s}"))\n', PASSWORD),
        "n.py": (f'URL = "host=db password={s} dbname=x"\n', PASSWORD),
        "o.py": ('SECRET = "q" * 40\n', JWT),
    }
    for path, (text, role) in cases.items():
        found = scan_file(path, text)
        assert [(f.role, accepted(f)) for f in found] == [(role, True)], (path, found)
    # A listed sample, a reference, a placeholder and a Secret's name are no finding to fix.
    quiet = {
        "p.env": f"PARLEY_JWT_SECRET={listed}\n",
        "q.yaml": "x:\n  POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?run make secrets}\n",
        "r.yaml": "redis:\n  auth:\n    existingSecret: parley-redis\n",
        "s.py": 'SECRET = os.urandom(32).hex()\nB = f"redis://:{SECRET}@r/0"\n',
        "t.md": "postgresql://user:<password>@host/db and password=*** here\n",
        "u.tpl": '{{- $pgPassword = randAlphaNum 32 }} printf "redis://:%s@%s" $a $b\n',
        "v.py": 'if secret == "abc":\n    pass\n',
        "w.md": "--set secret.keys.redisPassword=redis\n",
    }
    for path, text in quiet.items():
        assert not [f for f in scan_file(path, text) if accepted(f)], path


def test_the_scan_reports_where_it_found_a_secret() -> None:
    s = _fresh()
    (found,) = scan_file("x.env", f"A=1\n\nREDIS_PASSWORD={s}\n")
    assert found == Found("x.env:3", PASSWORD, s)
    (found,) = scan_file("x.py", f'\n\nDB_PASSWORD = "{s}"\n')
    assert found == Found("x.py:3", PASSWORD, s)
