"""docs/protocol.md is generated from the code and must not drift from it."""

from pathlib import Path

import msgpack

from protocol import Signer, Verifier, decode
from protocol.docgen import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_protocol_page_matches_the_code() -> None:
    assert DOC.read_text() == render(), "docs/protocol.md is stale: run `make docs` and commit it"


def test_the_worked_example_frame_on_the_page_verifies() -> None:
    text = DOC.read_text()
    hex_block = text.split("is this frame (hex):\n\n```\n")[1].split("```")[0]
    frame = bytes.fromhex(hex_block.replace("\n", " "))
    assert msgpack.unpackb(frame)["body"]["kind"] == "heartbeat"
    verifier = Verifier({"k1": bytes(range(32))}, max_skew_s=1e10)
    env = decode(frame, verifier=verifier)
    assert env.src == "edge-1"
    assert Signer("k1", bytes(range(32))).mac([frame[:-34]]) == frame[-32:]


def test_every_message_kind_is_documented() -> None:
    from protocol import MESSAGE_KINDS

    text = DOC.read_text()
    for kind in MESSAGE_KINDS:
        assert f"### `{kind}`" in text
