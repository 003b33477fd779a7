"""`parley.proto.contract` against the .proto files: each value it defines is the one the
protos' comments state, and each name it gives exists on the wire."""

from __future__ import annotations

import json
from pathlib import Path

from parley.proto import chat_pb2, contract, user_pb2

PROTO = Path(__file__).resolve().parents[2] / "proto"
CHAT_PROTO = (PROTO / "chat.proto").read_text()


# The one key the protos do not name: every call's, which the chassis answers; the README's
# Operations section documents it.
CHASSIS_KEYS = {"REQUEST_ID_KEY"}


def test_every_metadata_key_is_documented_in_the_protos() -> None:
    protos = "\n".join(p.read_text() for p in PROTO.glob("*.proto"))
    keys = {name: getattr(contract, name) for name in contract.__all__ if name.endswith("_KEY")}
    assert CHASSIS_KEYS < set(keys) and len(keys) >= 5, keys
    missing = {
        name: key
        for name, key in keys.items()
        if name not in CHASSIS_KEYS and f"`{key}`" not in protos
    }
    assert not missing, f"metadata keys no .proto comment documents: {missing}"
    readme = (PROTO.parent / "README.md").read_text()
    assert all(f"`{getattr(contract, name)}`" in readme for name in CHASSIS_KEYS)
    declared = f"`{contract.IMPORT_COMMIT_KEY}: {contract.EXPLICIT_IMPORT_COMMIT}`"
    assert declared in protos, declared


def test_the_chat_limits_are_the_ones_chat_proto_states() -> None:
    assert f"1 to {contract.MAX_TEXT_BYTES} bytes of UTF-8" in CHAT_PROTO
    assert f"at most {contract.MAX_CLIENT_MESSAGE_ID} characters" in CHAT_PROTO
    assert f"at most {contract.MAX_TITLE_CHARS} characters" in CHAT_PROTO
    assert f"empty means `{contract.DEFAULT_ROOM}`" in CHAT_PROTO


def test_service_names_and_idempotent_methods_exist() -> None:
    services = {
        contract.USER_SERVICE: user_pb2.DESCRIPTOR.services_by_name["UserService"],
        contract.CHAT_SERVICE: chat_pb2.DESCRIPTOR.services_by_name["ChatService"],
    }
    assert set(contract.IDEMPOTENT_METHODS) == set(services)
    for name, methods in contract.IDEMPOTENT_METHODS.items():
        assert set(methods) <= set(services[name].methods_by_name), name
        # Only reads: every method that changes something stays out.
        assert not any(m.startswith(("Create", "Update", "Delete", "Add", "Remove", "Open"))
                       for m in methods), methods  # fmt: skip
        assert "StreamChat" not in methods and "ImportUsers" not in methods


def test_the_service_config_retries_only_what_it_is_given() -> None:
    config = json.loads(contract.service_config(contract.CHAT_SERVICE))
    names = config["methodConfig"][0]["name"]
    assert {n.get("method") for n in names if n["service"] == contract.CHAT_SERVICE} == set(
        contract.IDEMPOTENT_METHODS[contract.CHAT_SERVICE]
    )
    assert {"service": contract.HEALTH_SERVICE} in names
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    only = json.loads(contract.service_config(contract.USER_SERVICE, methods=["GetUser"]))
    assert [n.get("method") for n in only["methodConfig"][0]["name"]] == ["GetUser", None]
