"""Parley's protos stay wire-compatible with the seed contract, and the generated code is fresh.

The seed (`../shared/seed` next to the repository) is the tutorial's contract. Both sides are
compiled with grpcio-tools' protoc into FileDescriptorSets and compared field by field, so a
renumbered field, a changed type or a dropped method fails here with every difference listed.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from importlib.resources import as_file, files
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_DIR = REPO_ROOT.parent / "shared" / "seed"
PROJECT_PROTO_DIR = REPO_ROOT / "proto"
GENERATED_DIR = REPO_ROOT / "libs" / "proto" / "src" / "parley" / "proto"
CONTRACT_FILES = ("user.proto", "chat.proto")

FieldType = descriptor_pb2.FieldDescriptorProto.Type
FieldLabel = descriptor_pb2.FieldDescriptorProto.Label


@pytest.fixture(scope="module")
def seed_dir() -> Path:
    missing = [name for name in CONTRACT_FILES if not (SEED_DIR / name).is_file()]
    if missing:
        pytest.fail(
            f"the seed contract is missing: expected {', '.join(missing)} in {SEED_DIR} "
            f"(the seed lives at ../shared/seed relative to the repository root {REPO_ROOT})",
            pytrace=False,
        )
    return SEED_DIR


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


@pytest.fixture(scope="module")
def seed_set(
    seed_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("seed") / "seed.binpb"
    return compile_descriptor_set(seed_dir, CONTRACT_FILES, out)


@pytest.fixture(scope="module")
def project_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("project") / "project.binpb"
    return compile_descriptor_set(PROJECT_PROTO_DIR, CONTRACT_FILES, out)


class Index:
    """Messages and services of a FileDescriptorSet by full name (`.user.User`, as type_name)."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = {f.name: f for f in descriptor_set.file}
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
        for file in descriptor_set.file:
            prefix = f".{file.package}" if file.package else ""
            for message in file.message_type:
                self._add_message(prefix, message)
            for service in file.service:
                self.services[f"{prefix}.{service.name}"] = service

    def _add_message(self, prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        full_name = f"{prefix}.{message.name}"
        self.messages[full_name] = message
        for nested in message.nested_type:
            self._add_message(full_name, nested)


def _field_summary(field: descriptor_pb2.FieldDescriptorProto) -> str:
    kind = FieldType.Name(field.type)
    if field.type_name:
        kind += f" {field.type_name.lstrip('.')}"
    return f"{FieldLabel.Name(field.label)} {kind} {field.name} = {field.number}"


def compatibility_problems(
    seed: descriptor_pb2.FileDescriptorSet, project: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    """Every way in which `project` is not wire-compatible with `seed`, one line each."""
    seed_index, project_index = Index(seed), Index(project)
    problems: list[str] = []

    for name, seed_file in seed_index.files.items():
        project_file = project_index.files.get(name)
        if project_file is None:
            problems.append(f"{name}: file is missing from the project")
        elif project_file.package != seed_file.package:
            problems.append(
                f"{name}: package is {project_file.package!r}, the seed has {seed_file.package!r}"
            )

    for service_name, seed_service in seed_index.services.items():
        where = service_name.lstrip(".")
        project_service = project_index.services.get(service_name)
        if project_service is None:
            problems.append(f"service {where}: missing")
            continue
        project_methods = {m.name: m for m in project_service.method}
        for seed_method in seed_service.method:
            method = project_methods.get(seed_method.name)
            if method is None:
                problems.append(f"rpc {where}.{seed_method.name}: missing")
                continue
            for attribute in ("input_type", "output_type", "client_streaming", "server_streaming"):
                expected = getattr(seed_method, attribute)
                actual = getattr(method, attribute)
                if actual != expected:
                    problems.append(
                        f"rpc {where}.{seed_method.name}: {attribute} is {actual!r}, "
                        f"the seed has {expected!r}"
                    )

    for message_name, seed_message in seed_index.messages.items():
        where = message_name.lstrip(".")
        project_message = project_index.messages.get(message_name)
        if project_message is None:
            problems.append(f"message {where}: missing")
            continue
        project_fields = {f.number: f for f in project_message.field}
        for seed_field in seed_message.field:
            field = project_fields.get(seed_field.number)
            if field is None:
                problems.append(
                    f"message {where}: field number {seed_field.number} is missing "
                    f"(seed: {_field_summary(seed_field)})"
                )
                continue
            for attribute in ("name", "type", "label", "type_name"):
                if getattr(field, attribute) != getattr(seed_field, attribute):
                    problems.append(
                        f"message {where}: field {seed_field.number} {attribute} differs: "
                        f"project has {_field_summary(field)}, "
                        f"seed has {_field_summary(seed_field)}"
                    )
    return problems


def appended_only_problems(
    seed: descriptor_pb2.FileDescriptorSet, project: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    """Fields the project added to a seed message with a number not above the seed's highest."""
    seed_index, project_index = Index(seed), Index(project)
    problems: list[str] = []
    for message_name, seed_message in seed_index.messages.items():
        project_message = project_index.messages.get(message_name)
        if project_message is None:
            continue
        seed_numbers = {f.number for f in seed_message.field}
        highest = max(seed_numbers, default=0)
        for field in project_message.field:
            if field.number not in seed_numbers and field.number <= highest:
                problems.append(
                    f"message {message_name.lstrip('.')}: added field {_field_summary(field)} "
                    f"must be numbered above the seed's highest field number {highest}"
                )
    return problems


def test_seed_contract_compiles_to_the_expected_services(
    seed_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    index = Index(seed_set)
    assert set(index.files) == set(CONTRACT_FILES)
    assert set(index.services) == {".user.UserService", ".chat.ChatService"}
    assert {".user.User", ".chat.ChatMessage"} <= set(index.messages)


def test_project_protos_are_wire_compatible_with_the_seed(
    seed_set: descriptor_pb2.FileDescriptorSet, project_set: descriptor_pb2.FileDescriptorSet
) -> None:
    problems = compatibility_problems(seed_set, project_set)
    assert not problems, (
        f"proto/ is not wire-compatible with the seed in {SEED_DIR}:\n  " + "\n  ".join(problems)
    )


def test_project_additions_are_appended_after_the_seed_fields(
    seed_set: descriptor_pb2.FileDescriptorSet, project_set: descriptor_pb2.FileDescriptorSet
) -> None:
    problems = appended_only_problems(seed_set, project_set)
    assert not problems, "proto/ inserts fields among the seed's:\n  " + "\n  ".join(problems)


def _message(
    descriptor_set: descriptor_pb2.FileDescriptorSet, file: str, name: str
) -> descriptor_pb2.DescriptorProto:
    proto_file = next(f for f in descriptor_set.file if f.name == file)
    return next(m for m in proto_file.message_type if m.name == name)


def test_the_comparison_reports_every_incompatibility(
    project_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    broken = copy.deepcopy(project_set)
    chat_file = next(f for f in broken.file if f.name == "chat.proto")
    chat_file.package = "chats"
    user_file = next(f for f in broken.file if f.name == "user.proto")
    service = next(s for s in user_file.service if s.name == "UserService")
    create = next(m for m in service.method if m.name == "CreateUser")
    service.method.remove(create)
    next(m for m in service.method if m.name == "ListUsers").server_streaming = False
    user = _message(broken, "user.proto", "User")
    next(f for f in user.field if f.name == "email").number = 30
    next(f for f in user.field if f.name == "age").type = FieldType.TYPE_INT64
    response = _message(broken, "user.proto", "GetUserResponse")
    response.field[0].type_name = ".user.UpdateUserResponse"

    problems = "\n".join(compatibility_problems(project_set, broken))

    assert "chat.proto: package is 'chats'" in problems
    assert "rpc user.UserService.CreateUser: missing" in problems
    assert "rpc user.UserService.ListUsers: server_streaming is False" in problems
    assert "message user.User: field number 3 is missing" in problems
    assert "message user.User: field 4 type differs" in problems
    assert "message user.GetUserResponse: field 1 type_name differs" in problems
    assert "service chat.ChatService: missing" in problems
    assert "message chat.ChatMessage: missing" in problems


def test_the_append_check_reports_fields_numbered_among_the_seeds(
    seed_set: descriptor_pb2.FileDescriptorSet, project_set: descriptor_pb2.FileDescriptorSet
) -> None:
    # A seed whose User left numbers 4 to 9 free: the project's fields 4 to 6 sit in that gap.
    gapped_seed = copy.deepcopy(seed_set)
    user = _message(gapped_seed, "user.proto", "User")
    next(f for f in user.field if f.name == "age").number = 10

    problems = appended_only_problems(gapped_seed, project_set)

    assert problems == [
        f"message user.User: added field {field} must be numbered above the seed's highest "
        "field number 10"
        for field in (
            "LABEL_OPTIONAL TYPE_INT32 age = 4",
            "LABEL_OPTIONAL TYPE_MESSAGE google.protobuf.Timestamp create_time = 5",
            "LABEL_OPTIONAL TYPE_MESSAGE google.protobuf.Timestamp update_time = 6",
        )
    ]


def _relative_files(root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
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
