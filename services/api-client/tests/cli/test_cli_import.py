"""`parley users import` of CSV and JSON Lines files with good and bad rows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from parley.client import UserClient

if TYPE_CHECKING:
    from conftest import Person, RunningStack

    from parley.testing.cli import Ran

Run = Callable[..., "Ran"]


def emails_in_service(stack: RunningStack, emails: list[str]) -> dict[str, str]:
    """email -> name of the users among `emails` that exist."""
    wanted = set(emails)
    with UserClient(stack.user, token=stack.admin_token) as users:
        return {u.email: u.name for u in users.list_users(page_size=1000) if u.email in wanted}


def test_csv_with_good_and_bad_rows(
    parley: Run,
    stack: RunningStack,
    tmp_path: Path,
    email: Callable[[str], str],
    person: Callable[[str], Person],
) -> None:
    taken = person("Taken").user.email
    good = [email("csv") for _ in range(3)]
    path = tmp_path / "people.csv"
    path.write_text(
        "name,email,age\n"  # line 1
        f"Ada,{good[0]},36\n"  # 2: created
        "Bad Email,not-an-email,20\n"  # 3: refused by the server
        f"Bob,{good[1]},\n"  # 4: created, age 0
        f"Old,{email('old')},many\n"  # 5: refused here, not sent
        f"Dup,{taken},40\n"  # 6: the email is taken
        "\n"
        f"Cy,{good[2]},7\n"  # 8: created
    )
    ran = parley("users", "import", str(path), "-o", "json", token=stack.admin_token)
    assert ran.code == 3, ran
    assert ran.stderr == ""
    [report] = ran.json_lines()
    assert (report["created"], report["failed"]) == (3, 3)
    assert [(e["line"], e["code"], e["field"]) for e in report["errors"]] == [
        (3, "INVALID_ARGUMENT", "email"),
        (5, "INVALID_ARGUMENT", "age"),
        (6, "ALREADY_EXISTS", "email"),
    ]
    assert report["errors"][1]["message"] == "must be a whole number, got 'many'"
    assert emails_in_service(stack, good) == {good[0]: "Ada", good[1]: "Bob", good[2]: "Cy"}


def test_jsonl_report_as_a_table(
    cli: Run, stack: RunningStack, tmp_path: Path, email: Callable[[str], str]
) -> None:
    good = [email("jsonl") for _ in range(2)]
    path = tmp_path / "people.jsonl"
    lines = [
        json.dumps({"name": "Dee", "email": good[0], "age": 50}),  # 1
        "{not json",  # 2
        "",  # 3: blank, skipped
        json.dumps({"email": email("noname")}),  # 4: no name
        json.dumps({"name": "Eve", "email": good[1], "id": 99, "create_time": None}),  # 5
        json.dumps({"name": "Old", "email": email("old"), "age": 200}),  # 6
    ]
    path.write_text("\n".join(lines) + "\n")
    ran = cli("users", "import", str(path), token=stack.admin_token)
    assert ran.code == 3, ran
    assert ran.stdout.startswith("created 2 users, 3 rows failed\n")
    rows = re.findall(r"│\s*(\d+)\s*│\s*(\w+)\s*│\s*([\w,]*)\s*│\s*(.*?)\s*│", ran.stdout)
    assert [(line, code, field) for line, code, field, _ in rows] == [
        ("2", "INVALID_ARGUMENT", ""),
        ("4", "INVALID_ARGUMENT", "name"),
        ("6", "INVALID_ARGUMENT", "age"),
    ]
    assert rows[0][3].startswith("not valid JSON")
    assert emails_in_service(stack, good) == {good[0]: "Dee", good[1]: "Eve"}


def test_all_good_rows_from_stdin(
    cli: Run, stack: RunningStack, email: Callable[[str], str]
) -> None:
    good = [email("stdin") for _ in range(2)]
    text = "".join(json.dumps({"name": f"In {i}", "email": e}) + "\n" for i, e in enumerate(good))
    ran = cli("users", "import", "-", "--format", "jsonl", "-o", "json", input=text,
              token=stack.admin_token)  # fmt: skip
    assert ran.code == 0, ran
    assert ran.json_lines() == [{"created": 2, "failed": 0, "errors": []}]
    assert set(emails_in_service(stack, good)) == set(good)


def test_files_it_cannot_read(cli: Run, stack: RunningStack, tmp_path: Path) -> None:
    unknown = tmp_path / "people.txt"
    unknown.write_text("name,email\n")
    ran = cli("users", "import", str(unknown), token=stack.admin_token)
    assert ran.code == 2
    assert "add --format csv or --format jsonl" in ran.stderr

    no_header = tmp_path / "people.csv"
    no_header.write_text("Ada,ada@example.com,36\n")
    ran = cli("users", "import", str(no_header), token=stack.admin_token)
    assert ran.code == 2
    assert "the CSV header needs the columns name and email" in ran.stderr

    ran = cli("users", "import", str(tmp_path / "missing.csv"), token=stack.admin_token)
    assert ran.code == 2
    assert "cannot read" in ran.stderr
