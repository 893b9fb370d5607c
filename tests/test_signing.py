"""Signed frames: forged, re-keyed, stale and replayed envelopes are refused by name."""

import msgpack
import numpy as np
import pytest

from protocol import (
    BadSignatureError,
    Envelope,
    Heartbeat,
    ProtocolError,
    ReplayError,
    Signer,
    StaleError,
    TaskResult,
    Verifier,
    decode,
    encode,
    encode_parts,
)

KEY = b"k" * 32
OTHER = b"o" * 32


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def beat(seq: int = 1) -> Envelope:
    return Envelope.new(src="edge-1", dst="orchestrator", body=Heartbeat(seq=seq))


def test_a_signed_envelope_verifies_and_carries_its_key_id() -> None:
    env = decode(encode(beat(), signer=Signer("k1", KEY)), verifier=Verifier({"k1": KEY}))
    assert env.kid == "k1" and env.sig is not None and len(env.sig) == 32


def test_large_signed_frames_verify_from_their_parts() -> None:
    arr = np.arange(1 << 18, dtype=np.float32)
    env = Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=arr))
    parts = encode_parts(env, signer=Signer("k1", KEY))
    got = decode(b"".join(parts), verifier=Verifier({"k1": KEY}))
    assert np.array_equal(got.body.value, arr)


def test_any_flipped_byte_breaks_the_signature() -> None:
    frame = encode(beat(), signer=Signer("k1", KEY))
    verifier = Verifier({"k1": KEY})
    refused = 0
    for pos in range(len(frame)):
        forged = bytearray(frame)
        forged[pos] ^= 0x01
        try:
            decode(bytes(forged), verifier=verifier)
        except ProtocolError:
            refused += 1
    assert refused == len(frame)


def test_unsigned_unknown_key_and_wrong_key_are_told_apart() -> None:
    verifier = Verifier({"k1": KEY})
    with pytest.raises(BadSignatureError, match="is unsigned"):
        decode(encode(beat()), verifier=verifier)
    with pytest.raises(BadSignatureError, match="unknown key id 'k9'"):
        decode(encode(beat(), signer=Signer("k9", KEY)), verifier=verifier)
    with pytest.raises(BadSignatureError, match="does not match key 'k1'"):
        decode(encode(beat(), signer=Signer("k1", OTHER)), verifier=verifier)


def test_a_body_swapped_under_a_valid_signature_is_refused() -> None:
    frame = encode(beat(), signer=Signer("k1", KEY))
    plain = msgpack.unpackb(frame)
    plain["body"]["seq"] = 99
    with pytest.raises(BadSignatureError, match="does not match"):
        decode(msgpack.packb(plain), verifier=Verifier({"k1": KEY}))


def test_replayed_ids_are_refused() -> None:
    verifier = Verifier({"k1": KEY})
    frame = encode(beat(), signer=Signer("k1", KEY))
    decode(frame, verifier=verifier)
    with pytest.raises(ReplayError, match="already accepted"):
        decode(frame, verifier=verifier)


def test_timestamps_outside_the_skew_are_stale() -> None:
    env = beat()
    frame = encode(env, signer=Signer("k1", KEY))
    with pytest.raises(StaleError, match=r"\+45\.0s from this clock; accepted skew is \+-30s"):
        decode(frame, verifier=Verifier({"k1": KEY}, clock=Clock(env.ts + 45)))
    with pytest.raises(StaleError, match=r"-45\.0s"):
        decode(frame, verifier=Verifier({"k1": KEY}, clock=Clock(env.ts - 45)))


def test_an_envelope_from_a_long_transfer_is_accepted_within_its_grace_once() -> None:
    env = beat()
    frame = encode(env, signer=Signer("k1", KEY))
    verifier = Verifier({"k1": KEY}, clock=Clock(env.ts + 45))
    with pytest.raises(StaleError, match=r"accepted skew is \+-30s \(\+10s for its transfer\)"):
        decode(frame, verifier=verifier, grace_s=10)
    assert decode(frame, verifier=verifier, grace_s=20).id == env.id
    with pytest.raises(ReplayError):
        decode(frame, verifier=verifier, grace_s=20)
    with pytest.raises(StaleError, match=r"-45\.0s"):  # grace never admits a timestamp from the future
        decode(frame, verifier=Verifier({"k1": KEY}, clock=Clock(env.ts - 45)), grace_s=100)


def test_envelopes_taken_with_grace_never_shut_out_fresh_ones() -> None:
    """A graced id is remembered apart: even evicted from a full cache it cannot raise the floor."""
    clock = Clock(1_000_000.0)
    verifier = Verifier({"k1": KEY}, replay_capacity=2, clock=clock)
    signer = Signer("k1", KEY)
    for seq in range(3):  # graced ids overflow their cache
        old = beat(seq).model_copy(update={"ts": clock.now - 40})
        decode(encode(old, signer=signer), verifier=verifier, grace_s=60)
    for seq in range(3, 8):  # and fresh envelopes, overflowing the other cache, still pass
        fresh = beat(seq).model_copy(update={"ts": clock.now + seq * 0.001})
        decode(encode(fresh, signer=signer), verifier=verifier)


def test_the_replay_cache_is_bounded_yet_no_replay_slips_through() -> None:
    clock = Clock(1_000_000.0)
    verifier = Verifier({"k1": KEY}, replay_capacity=10, clock=clock)
    signer = Signer("k1", KEY)
    frames = []
    for seq in range(50):
        env = beat(seq).model_copy(update={"ts": clock.now + seq * 0.001})
        frames.append(encode(env, signer=signer))
        decode(frames[-1], verifier=verifier)
    assert len(verifier._seen) <= 10
    for frame in frames:
        with pytest.raises(ReplayError):
            decode(frame, verifier=verifier)


def test_ids_older_than_the_skew_window_are_forgotten() -> None:
    clock = Clock(1_000_000.0)
    verifier = Verifier({"k1": KEY}, max_skew_s=5, clock=clock)
    signer = Signer("k1", KEY)
    for seq in range(20):
        fresh = beat(seq).model_copy(update={"ts": clock.now + seq * 0.001})
        decode(encode(fresh, signer=signer), verifier=verifier)
        clock.now += 1
    assert len(verifier._seen) <= 6


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Signer("k1", b"short")


def test_retained_frames_can_be_checked_for_their_signature_alone() -> None:
    env = beat()
    frame = encode(env, signer=Signer("k1", KEY))
    late = Verifier({"k1": KEY}, clock=Clock(env.ts + 3600))
    assert decode(frame, verifier=late, fresh=False) == decode(frame)
    assert decode(frame, verifier=late, fresh=False).id == env.id  # and again: no replay memory
    with pytest.raises(BadSignatureError):
        decode(encode(env, signer=Signer("k1", OTHER)), verifier=late, fresh=False)
