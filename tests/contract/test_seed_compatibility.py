"""Parley's protos stay wire-compatible with the seed contract, and the generated code is fresh.

The seed tutorial's contract is recorded in `seed_record.py`. proto/ is compiled with
grpcio-tools' protoc and its facts compared with the record, so a renumbered field, a changed
type or a dropped method fails here with every difference listed, on any clone. Where the seed
itself sits next to the repository (`../shared/seed`, as in CI), the record is also checked
against it; elsewhere that one test is skipped with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.resources import as_file, files
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from .seed_record import SEED, Contract, Field, ProtoFile, Rpc

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_DIR = REPO_ROOT.parent / "shared" / "seed"
PROJECT_PROTO_DIR = REPO_ROOT / "proto"
GENERATED_DIR = REPO_ROOT / "libs" / "proto" / "src" / "parley" / "proto"
CONTRACT_FILES = tuple(SEED)

FieldType = descriptor_pb2.FieldDescriptorProto.Type
FieldLabel = descriptor_pb2.FieldDescriptorProto.Label


def compile_descriptor_set(
    proto_dir: Path, names: tuple[str, ...], out: Path
) -> descriptor_pb2.FileDescriptorSet:
    """Runs protoc in-process and returns the FileDescriptorSet of `names` and their imports."""
    with as_file(files("grpc_tools") / "_proto") as well_known_types:
        exit_code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={proto_dir}",
                f"--proto_path={well_known_types}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                *names,
            ]
        )
    assert exit_code == 0, (
        f"protoc failed (exit {exit_code}) on {', '.join(names)} in {proto_dir}; "
        "its error is in the captured stderr"
    )
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _field_type(proto: descriptor_pb2.FieldDescriptorProto) -> str:
    if proto.type_name:
        return proto.type_name.lstrip(".")
    return FieldType.Name(proto.type).removeprefix("TYPE_").lower()


def _messages(
    message: descriptor_pb2.DescriptorProto, prefix: str = ""
) -> Iterator[tuple[str, dict[int, Field]]]:
    """A message and its nested ones, named `Outer.Inner`, with their fields by number."""
    yield (
        prefix + message.name,
        {
            f.number: Field(f.name, _field_type(f), repeated=f.label == FieldLabel.LABEL_REPEATED)
            for f in message.field
        },
    )
    for nested in message.nested_type:
        yield from _messages(nested, f"{prefix}{message.name}.")


def contract_of(
    descriptor_set: descriptor_pb2.FileDescriptorSet, names: tuple[str, ...]
) -> Contract:
    """The facts of the files `names` in a compiled set, in the record's shape."""
    contract: Contract = {}
    for proto_file in descriptor_set.file:
        if proto_file.name not in names:
            continue
        services = {
            service.name: {
                m.name: Rpc(
                    m.input_type.lstrip("."),
                    m.output_type.lstrip("."),
                    client_streaming=m.client_streaming,
                    server_streaming=m.server_streaming,
                )
                for m in service.method
            }
            for service in proto_file.service
        }
        messages = dict(item for m in proto_file.message_type for item in _messages(m))
        contract[proto_file.name] = ProtoFile(proto_file.package, services, messages)
    return contract


def _describe(number: int, field: Field) -> str:
    return f"{'repeated ' if field.repeated else ''}{field.type} {field.name} = {number}"


def facts(contract: Contract) -> set[str]:
    """A contract as one line per fact, for a readable difference of two contracts."""
    lines = set()
    for name, proto_file in contract.items():
        lines.add(f"{name}: package {proto_file.package}")
        for service, methods in proto_file.services.items():
            for method, rpc in methods.items():
                lines.add(f"{name}: rpc {service}.{method} {rpc}")
        for message, fields in proto_file.messages.items():
            lines |= {f"{name}: {message} {_describe(n, f)}" for n, f in fields.items()}
    return lines


def compatibility_problems(seed: Contract, project: Contract) -> list[str]:
    """Every way in which `project` is not wire-compatible with `seed`, one line each."""
    problems: list[str] = []
    for name, seed_file in seed.items():
        project_file = project.get(name)
        if project_file is None:
            problems.append(f"{name}: file is missing from the project")
            continue
        if project_file.package != seed_file.package:
            problems.append(
                f"{name}: package is {project_file.package!r}, the seed has {seed_file.package!r}"
            )
        for service_name, seed_methods in seed_file.services.items():
            where = f"{seed_file.package}.{service_name}"
            project_methods = project_file.services.get(service_name)
            if project_methods is None:
                problems.append(f"service {where}: missing")
                continue
            for method_name, seed_rpc in seed_methods.items():
                rpc = project_methods.get(method_name)
                if rpc is None:
                    problems.append(f"rpc {where}.{method_name}: missing")
                    continue
                for attribute in ("input", "output", "client_streaming", "server_streaming"):
                    expected, actual = getattr(seed_rpc, attribute), getattr(rpc, attribute)
                    if actual != expected:
                        problems.append(
                            f"rpc {where}.{method_name}: {attribute} is {actual!r}, "
                            f"the seed has {expected!r}"
                        )
        for message_name, seed_fields in seed_file.messages.items():
            where = f"{seed_file.package}.{message_name}"
            project_fields = project_file.messages.get(message_name)
            if project_fields is None:
                problems.append(f"message {where}: missing")
                continue
            for number, seed_field in seed_fields.items():
                field = project_fields.get(number)
                if field is None:
                    problems.append(
                        f"message {where}: field number {number} is missing "
                        f"(seed: {_describe(number, seed_field)})"
                    )
                elif field != seed_field:
                    problems.append(
                        f"message {where}: field {number} differs: project has "
                        f"{_describe(number, field)}, seed has {_describe(number, seed_field)}"
                    )
    return problems


def appended_only_problems(seed: Contract, project: Contract) -> list[str]:
    """Fields the project added to a seed message with a number not above the seed's highest."""
    problems: list[str] = []
    for name, seed_file in seed.items():
        project_file = project.get(name)
        if project_file is None:
            continue
        for message_name, seed_fields in seed_file.messages.items():
            highest = max(seed_fields, default=0)
            for number, field in project_file.messages.get(message_name, {}).items():
                if number not in seed_fields and number <= highest:
                    problems.append(
                        f"message {seed_file.package}.{message_name}: added field "
                        f"{_describe(number, field)} must be numbered above the seed's "
                        f"highest field number {highest}"
                    )
    return problems


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Contract:
    out = tmp_path_factory.mktemp("project") / "project.binpb"
    return contract_of(
        compile_descriptor_set(PROJECT_PROTO_DIR, CONTRACT_FILES, out), CONTRACT_FILES
    )


def test_the_record_names_the_seed_services() -> None:
    assert set(SEED) == {"user.proto", "chat.proto"}
    assert set(SEED["user.proto"].services) == {"UserService"}
    assert set(SEED["chat.proto"].services) == {"ChatService"}
    assert {"User"} <= set(SEED["user.proto"].messages)


def test_the_record_is_the_seed_itself(tmp_path: Path) -> None:
    missing = [name for name in CONTRACT_FILES if not (SEED_DIR / name).is_file()]
    if missing:
        pytest.skip(
            f"no seed to compare the record with: {', '.join(missing)} not in {SEED_DIR} "
            "(only a workspace with ../shared/seed next to the clone has it)"
        )
    seed = contract_of(
        compile_descriptor_set(SEED_DIR, CONTRACT_FILES, tmp_path / "seed.binpb"), CONTRACT_FILES
    )

    only_seed, only_record = sorted(facts(seed) - facts(SEED)), sorted(facts(SEED) - facts(seed))
    assert seed == SEED, (
        f"tests/contract/seed_record.py differs from the seed in {SEED_DIR}:\n"
        + "".join(f"  seed only:   {fact}\n" for fact in only_seed)
        + "".join(f"  record only: {fact}\n" for fact in only_record)
    )


def test_project_protos_are_wire_compatible_with_the_seed(project: Contract) -> None:
    problems = compatibility_problems(SEED, project)
    assert not problems, (
        "proto/ is not wire-compatible with the seed contract (tests/contract/seed_record.py):"
        "\n  " + "\n  ".join(problems)
    )


def test_project_additions_are_appended_after_the_seed_fields(project: Contract) -> None:
    problems = appended_only_problems(SEED, project)
    assert not problems, "proto/ inserts fields among the seed's:\n  " + "\n  ".join(problems)


def test_the_comparison_reports_every_incompatibility(project: Contract) -> None:
    broken = copy.deepcopy(project)
    broken["chat.proto"] = dataclasses.replace(broken["chat.proto"], package="chats")
    del broken["chat.proto"].services["ChatService"]
    del broken["chat.proto"].messages["ChatMessage"]
    user_file = broken["user.proto"]
    methods = user_file.services["UserService"]
    del methods["CreateUser"]
    methods["ListUsers"] = dataclasses.replace(methods["ListUsers"], server_streaming=False)
    user = user_file.messages["User"]
    user[30] = user.pop(3)
    user[4] = dataclasses.replace(user[4], type="int64")
    user_file.messages["GetUserResponse"][1] = Field("user", "user.UpdateUserResponse")

    problems = "\n".join(compatibility_problems(project, broken))

    assert "chat.proto: package is 'chats'" in problems
    assert "rpc user.UserService.CreateUser: missing" in problems
    assert "rpc user.UserService.ListUsers: server_streaming is False" in problems
    assert "message user.User: field number 3 is missing" in problems
    assert "message user.User: field 4 differs: project has int64 age = 4" in problems
    assert "message user.GetUserResponse: field 1 differs" in problems
    assert "service chat.ChatService: missing" in problems
    assert "message chat.ChatMessage: missing" in problems


def test_the_append_check_reports_fields_numbered_among_the_seeds(project: Contract) -> None:
    # A seed whose User left numbers 4 to 9 free: the project's fields 4 to 6 sit in that gap.
    gapped_seed = copy.deepcopy(SEED)
    user = gapped_seed["user.proto"].messages["User"]
    user[10] = user.pop(4)

    problems = appended_only_problems(gapped_seed, project)

    assert problems == [
        f"message user.User: added field {field} must be numbered above the seed's highest "
        "field number 10"
        for field in (
            "int32 age = 4",
            "google.protobuf.Timestamp create_time = 5",
            "google.protobuf.Timestamp update_time = 6",
        )
    ]


# Written by hand beside the generated code (make proto leaves it alone).
HAND_WRITTEN = {"contract.py"}


def _relative_files(root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix != ".pyc"
        and path.relative_to(root).as_posix() not in HAND_WRITTEN
    }


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    # The venv's python and its protoc plugins (protoc-gen-mypy_grpc) come first on PATH.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(
        ["bash", "scripts/gen-proto.sh", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"scripts/gen-proto.sh failed:\n{result.stdout}{result.stderr}"

    fresh_dir = tmp_path / "parley" / "proto"
    fresh, committed = _relative_files(fresh_dir), _relative_files(GENERATED_DIR)
    assert fresh, f"scripts/gen-proto.sh generated nothing into {fresh_dir}"
    problems = [
        f"{name}: generated but not in {GENERATED_DIR}" for name in sorted(fresh - committed)
    ]
    problems += [
        f"{name}: in {GENERATED_DIR} but not generated" for name in sorted(committed - fresh)
    ]
    problems += [
        f"{name}: differs from what proto/ generates"
        for name in sorted(fresh & committed)
        if (fresh_dir / name).read_bytes() != (GENERATED_DIR / name).read_bytes()
    ]
    assert not problems, (
        "the generated code in libs/proto is stale; run `make proto` and commit:\n  "
        + "\n  ".join(problems)
    )


def test_generated_package_imports_by_absolute_path(tmp_path: Path) -> None:
    # A fresh interpreter in an empty directory: nothing but the installed package can resolve.
    script = (
        "from parley.proto import user_pb2, user_pb2_grpc, chat_pb2, chat_pb2_grpc\n"
        "for module in (user_pb2, user_pb2_grpc, chat_pb2, chat_pb2_grpc):\n"
        "    print(module.__name__, module.__file__)\n"
        "print(user_pb2.DESCRIPTOR.package, chat_pb2.DESCRIPTOR.package)\n"
        "print(user_pb2_grpc.UserServiceStub.__name__, chat_pb2_grpc.ChatServiceStub.__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"importing parley.proto failed:\n{result.stderr}"
    lines = result.stdout.splitlines()
    modules = ("user_pb2", "user_pb2_grpc", "chat_pb2", "chat_pb2_grpc")
    for line, module in zip(lines[:4], modules, strict=True):
        name, _, file = line.partition(" ")
        assert name == f"parley.proto.{module}"
        assert Path(file).resolve() == (GENERATED_DIR / f"{module}.py").resolve()
    assert lines[4:] == ["user chat", "UserServiceStub ChatServiceStub"]

    relative_import = re.compile(r"^\s*(import \w+_pb2\b|from \w+_pb2 import|from \. import)", re.M)
    offenders = [
        path.name
        for path in sorted(GENERATED_DIR.glob("*.py*"))
        if relative_import.search(path.read_text())
    ]
    assert not offenders, f"generated modules with non-absolute imports: {', '.join(offenders)}"
