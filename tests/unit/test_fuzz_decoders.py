"""Property tests of the decoders' one invariant (issue 2 item 3; SPEC.md "Errors and drops"):

any byte string fed to any decoder yields a message or a ProtocolError — never another
exception — and a mutated envelope never verifies as a message.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import blobproto, codec, fuzz
from protocol.envelope import Signer, open_envelope
from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder, encode_frame
from protocol.messages import MESSAGE_TYPES
from protocol.peerid import public_key_from_peer_id

ROOT = Path(__file__).resolve().parents[2]
SIGNER = Signer(bytes(range(32)))
ENVELOPES = [SIGNER.seal(m) for m in fuzz.sample_messages()]
KINDS = sorted(MESSAGE_TYPES)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Tree-shaped inputs cost more to generate; fewer examples keep the file under a few seconds.
TREES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_protocol_errors(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ProtocolError:
        return None


@FAST
@given(st.binary(max_size=2048))
def test_open_envelope_on_arbitrary_bytes(data: bytes) -> None:
    _only_protocol_errors(open_envelope, data)


@FAST
@given(st.binary(max_size=2048))
def test_codec_unpack_on_arbitrary_bytes(data: bytes) -> None:
    obj = _only_protocol_errors(codec.unpack, data)
    if obj is not None:  # whatever is accepted is exactly the canonical encoding
        assert codec.pack(obj) == data


@FAST
@given(
    st.binary(max_size=4096), st.integers(min_value=1, max_value=64), st.integers(min_value=0, max_value=512)
)
def test_frame_decoder_on_arbitrary_bytes(data: bytes, step: int, cap: int) -> None:
    dec = FrameDecoder(max_frame=cap)
    try:
        for pos in range(0, len(data), step):
            dec.feed(data[pos : pos + step])
            for _ in range(len(data) + 1):
                frame = dec.next_frame()
                if frame is None:
                    break
                assert len(frame) <= cap
    except ProtocolError as exc:
        assert exc.reason == "oversized"


@FAST
@given(st.text(max_size=80))
def test_peer_id_parser_on_arbitrary_text(text: str) -> None:
    _only_protocol_errors(public_key_from_peer_id, text)


@FAST
@given(st.binary(max_size=1024))
def test_fuzz_entry_point_on_arbitrary_bytes(data: bytes) -> None:
    fuzz.TestOneInput(data)  # raises only on an invariant violation


@FAST
@given(st.sampled_from(fuzz.TARGETS), st.binary(max_size=512))
def test_every_fuzz_target(target: tuple[str, Any], data: bytes) -> None:
    _only_protocol_errors(target[1], data)


@FAST
@given(st.binary(max_size=600))
def test_blob_decoder_on_arbitrary_bytes(data: bytes) -> None:
    msg = _only_protocol_errors(blobproto.decode, data)
    if msg is not None:
        assert blobproto.encode(msg) == data


# Arbitrary msgpack trees, including values no canonical encoder would write.
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=70)
)
_trees = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40,
)


@TREES
@given(st.sampled_from(KINDS), _trees)
def test_from_wire_on_arbitrary_trees(kind: str, tree: Any) -> None:
    _only_protocol_errors(MESSAGE_TYPES[kind].from_wire, tree)


@TREES
@given(st.sampled_from(fuzz.sample_messages()), st.data())
def test_from_wire_on_sample_with_one_field_replaced(msg: Any, data: st.DataObject) -> None:
    wire = msg.to_wire()
    name = data.draw(st.sampled_from(sorted(wire)))
    wire[name] = data.draw(_trees)
    result = _only_protocol_errors(type(msg).from_wire, wire)
    if result is not None:  # whatever the validators accept survives sealing and opening intact
        try:
            raw = SIGNER.seal(result)
        except ProtocolError as exc:
            assert exc.reason == "oversized"
            return
        assert open_envelope(raw).message == result


@TREES
@given(st.sampled_from(KINDS), _trees)
def test_signed_hostile_payloads(kind: str, tree: Any) -> None:
    """Validly signed payloads reach the canonical and field checks: still only ProtocolError."""
    try:
        payload = msgpack.packb(tree, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    fuzz.TestOneInput(
        bytes([[n for n, _ in fuzz.TARGETS].index("signed_payload"), KINDS.index(kind)]) + payload
    )


@FAST
@given(
    st.sampled_from(range(len(ENVELOPES))),
    st.lists(st.integers(min_value=0), min_size=1, max_size=8),
)
def test_bit_flips_never_verify(index: int, flips: list[int]) -> None:
    raw = ENVELOPES[index]
    mutated = bytearray(raw)
    for f in flips:
        bit = f % (len(raw) * 8)
        mutated[bit // 8] ^= 1 << (bit % 8)
    if bytes(mutated) == raw:  # flips cancelled each other out
        return
    with pytest.raises(ProtocolError):
        open_envelope(bytes(mutated))


@FAST
@given(
    st.sampled_from(range(len(ENVELOPES))),
    st.integers(min_value=0),
    st.binary(min_size=1, max_size=16),
)
def test_splices_never_verify(index: int, where: int, junk: bytes) -> None:
    raw = ENVELOPES[index]
    i = where % (len(raw) + 1)
    for mutated in (raw[:i] + junk + raw[i:], raw[:i] + junk + raw[i + len(junk) :]):
        if mutated != raw:
            with pytest.raises(ProtocolError):
                open_envelope(mutated)


@FAST
@given(st.lists(st.sampled_from(range(len(ENVELOPES))), max_size=5), st.integers(min_value=1, max_value=40))
def test_framed_envelopes_survive_any_chunking(order: list[int], step: int) -> None:
    stream = b"".join(encode_frame(ENVELOPES[i]) for i in order)
    dec = FrameDecoder()
    got = []
    for pos in range(0, len(stream), step):
        dec.feed(stream[pos : pos + step])
        while (frame := dec.next_frame()) is not None:
            got.append(open_envelope(frame).raw)
    assert got == [ENVELOPES[i] for i in order]


def test_random_fuzzer_runs_clean() -> None:
    out = io.StringIO()
    assert fuzz.run(400, seed=1, out=out) == 0
    assert "0 invariant violation(s)" in out.getvalue()


def test_fuzz_module_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "protocol.fuzz", "--iterations", "300", "--seed", "7"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "300 iterations, seed 7: 0 invariant violation(s)" in proc.stdout


def test_fuzzer_reports_a_violation() -> None:
    """The fuzzer is not vacuous: a target raising a foreign exception is reported and fails."""
    original = list(fuzz.TARGETS)

    def broken(data: bytes) -> None:
        raise KeyError("boom")

    try:
        fuzz.TARGETS[:] = [(name, broken) for name, _ in original]
        out = io.StringIO()
        assert fuzz.run(3, seed=0, out=out) == 3
        assert "invariant violated" in out.getvalue()
        with pytest.raises(KeyError):
            fuzz.TestOneInput(b"\x00abc")
    finally:
        fuzz.TARGETS[:] = original
