"""The history retention signal's wire values: defined once in `parley.proto.contract`, stated
in chat.proto's comments, and the field ListMessagesResponse gained for it."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from parley.proto import chat_pb2, contract

CHAT_PROTO = (Path(__file__).resolve().parents[2] / "proto" / "chat.proto").read_text()


def test_the_expiry_reason_and_its_metadata_key_are_the_ones_chat_proto_states() -> None:
    assert contract.RESUME_EXPIRED == "RESUME_POINT_EXPIRED"
    assert contract.FIRST_SEQUENCE_KEY == "first_sequence"
    assert f"reason {contract.RESUME_EXPIRED}" in CHAT_PROTO
    assert f"metadata\n  // `{contract.FIRST_SEQUENCE_KEY}`" in CHAT_PROTO
    assert "OUT_OF_RANGE" in CHAT_PROTO


def test_list_messages_response_appends_first_sequence_as_field_4() -> None:
    fields = chat_pb2.ListMessagesResponse.DESCRIPTOR.fields_by_number
    assert {number: field.name for number, field in fields.items()} == {
        1: "messages",
        2: "has_more",
        3: "last_sequence",
        4: "first_sequence",
    }
    assert fields[4].type == FieldDescriptor.TYPE_INT64
    # An old client's bytes still parse, and a new server's reach an old client unharmed.
    old = chat_pb2.ListMessagesResponse(has_more=True, last_sequence=9).SerializeToString()
    assert chat_pb2.ListMessagesResponse.FromString(old).first_sequence == 0
