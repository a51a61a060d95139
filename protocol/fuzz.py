"""Fuzz every decoder of the protocol against one invariant (issue 2, item 3).

    Any byte string fed to any decoder yields a message or a ProtocolError — never another
    exception, and never a message other than the one that was signed.

Two ways to run it:

* ``python -m protocol.fuzz [--iterations N] [--seed S]`` — a self-contained, deterministic
  random fuzzer (stdlib ``random``): random bytes, mutated valid envelopes, hostile payloads
  under *valid* signatures, random msgpack trees. Exit status 0 when the invariant held, 1 with
  the failing input in hex otherwise. 20 000 iterations take a few seconds.
* coverage-guided, with atheris (not a dependency; install it yourself)::

      import atheris, sys
      with atheris.instrument_imports():
          from protocol.fuzz import TestOneInput
      atheris.Setup(sys.argv, TestOneInput); atheris.Fuzz()

:func:`TestOneInput` uses the first byte of its input to pick a target and feeds it the rest,
the way h11's ``fuzz/afl-server.py`` drives one parser per input.
"""

from __future__ import annotations

import argparse
import collections
import random
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import PROTOCOL_VERSION, blobproto, codec, tensors
from protocol.envelope import Signer, open_envelope, signing_bytes
from protocol.errors import ProtocolError
from protocol.framing import MAX_FRAME, FrameDecoder, encode_frame
from protocol.messages import (
    MESSAGE_TYPES,
    Advert,
    Award,
    Bid,
    Cancel,
    Lease,
    Message,
    Result,
    TaskAnnounce,
    Vote,
)
from protocol.peerid import public_key_from_peer_id
from protocol.replay import ReplayGuard

#: Fixed fuzzing identity. Its key signs hostile payloads so that the decoding that happens
#: only *after* a valid signature is fuzzed too (random bytes would never get that far).
FUZZ_SEED = bytes(range(200, 232))
_SIGNER = Signer(FUZZ_SEED)
_KEY = Ed25519PrivateKey.from_private_bytes(FUZZ_SEED)
_KINDS = tuple(sorted(MESSAGE_TYPES))
T0 = 1_700_000_000_000
_TASK = "0123456789abcdef0123456789abcdef"
_SHA = "ab" * 32


def sample_messages(now_ms: int = T0, seq: int = 1) -> list[Message]:
    """One valid message of every kind, issued at ``now_ms`` (mutation seeds and test fixtures)."""
    t: dict[str, Any] = {"seq": seq, "issued_at": now_ms, "expires_at": now_ms + 30_000}
    pid = _SIGNER.peer_id
    ref = {"sha256": _SHA, "size": 10}
    net = {"k": 0.2, "dc_min": 0.0, "dc_max": None}
    return [
        Advert(
            **t,
            c0=100.0,
            load=0.25,
            cpu={"cores": 4, "model": "cpu", "gflops": 100.0},
            memory={"total_mb": 8000, "available_mb": 4000},
            gpus=(
                {
                    "index": 0,
                    "model": "gpu",
                    "vram_total_mb": 16000,
                    "vram_free_mb": 8000,
                    "util_pct": 5.0,
                    "gflops": 1e4,
                },
            ),
            offer={
                "cores": 2,
                "gpus": [0],
                "memory_mb": 4000,
                "kinds": ["echo"],
                "draining": False,
                "slots": 1,
                "busy": 0,
            },
            params=net,
            addrs=("/ip4/127.0.0.1/tcp/4001",),
            version="0.1.0",
        ),
        TaskAnnounce(
            **t,
            task_id=_TASK,
            kind="echo",
            work=10.0,
            deadline_ms=1000,
            max_shards=2,
            resources={"gpu": False, "memory_mb": 0},
            aggregation="none",
            rounds=1,
            params={"text": "hi", "nested": {"a": [1, 2.5, None, b"x"]}},
            inputs={"data": ref},
            bid_window_ms=200,
            net=net,
        ),
        Bid(**t, task_id=_TASK, c0=100.0, load=0.25),
        Award(
            **t,
            task_id=_TASK,
            epoch=0,
            bids=(b"\x00" * 8,),
            assignments=({"shard": 0, "peer_id": pid, "share": 1.0, "inputs": {}},),
            under_capacity=False,
            excluded=(),
            certified={"round": 1, "output": ref, "signers": (pid,)},
            caps={pid: 5.0},
        ),
        Lease(**t, task_id=_TASK, epoch=0, shard=0, round=0, state="running", detail="ok"),
        Result(
            **t,
            task_id=_TASK,
            epoch=0,
            shard=0,
            round=0,
            ok=True,
            error=None,
            outputs={"out": ref},
            weight=1.0,
            metrics={"loss": 0.5},
        ),
        Vote(
            **t,
            task_id=_TASK,
            round=0,
            rule="sum",
            committee=(pid,),
            inputs=({"peer_id": pid, "shard": 0, "sha256": _SHA, "weight": 1.0},),
            excluded=(),
            output=ref,
            attempt=0,
        ),
        Cancel(**t, task_id=_TASK, reason="test"),
    ]


_SAMPLES = [_SIGNER.seal(m) for m in sample_messages()]


# --- targets: each takes bytes and must only ever raise ProtocolError -----------------------


def _check_opened(raw: bytes) -> None:
    """open_envelope, plus the second half of the invariant: what verifies is what was signed."""
    signed = open_envelope(raw)
    outer = msgpack.unpackb(raw, raw=False)
    if signed.raw != raw or codec.pack(signed.message.to_wire()) != outer["payload"]:
        raise AssertionError("an envelope verified as something other than its signed payload")
    if signed.public_key != outer["key"]:
        raise AssertionError("the reported signer is not the envelope's key")


def _target_codec(data: bytes) -> None:
    obj = codec.unpack(data)
    if codec.pack(obj) != data:
        raise AssertionError("codec.unpack accepted a non-canonical encoding")


def _target_frames(data: bytes) -> None:
    """Feed the decoder in pieces whose sizes come from the data itself, then open each frame."""
    dec = FrameDecoder(max_frame=4096)
    pos = 0
    step = 1 + (data[0] % 7 if data else 0)
    for _ in range(len(data) + 1):  # bounded: every pass consumes at least one byte or stops
        if pos >= len(data):
            break
        dec.feed(data[pos : pos + step])
        pos += step
        for _ in range(len(data) + 1):
            frame = dec.next_frame()
            if frame is None:
                break
            if len(frame) > 4096:
                raise AssertionError("FrameDecoder returned a frame above its cap")
            try:
                _check_opened(frame)
            except ProtocolError:
                pass


def _target_signed_payload(data: bytes) -> None:
    """The rest of the input as a payload, validly signed for a kind picked by its first byte."""
    if not data:
        return
    kind = _KINDS[data[0] % len(_KINDS)]
    payload = data[1:]
    sig = _KEY.sign(signing_bytes(kind, PROTOCOL_VERSION, payload))
    raw = codec.pack(
        {"key": _SIGNER.public_key, "payload": payload, "sig": sig, "type": kind, "v": PROTOCOL_VERSION}
    )
    _check_opened(raw)


def _target_from_wire(data: bytes) -> None:
    """Arbitrary (even non-canonical) msgpack trees straight into each message's validators."""
    if not data:
        return
    try:
        obj = msgpack.unpackb(data[1:], raw=False, strict_map_key=False)
    except Exception:  # not our decoder: only inputs msgpack itself can parse are interesting
        return
    MESSAGE_TYPES[_KINDS[data[0] % len(_KINDS)]].from_wire(obj)


def _target_peer_id(data: bytes) -> None:
    public_key_from_peer_id(data.decode("utf-8", "replace"))


def _target_replay(data: bytes) -> None:
    """Open an envelope and run it through a receiver whose clock comes from the input."""
    if len(data) < 8:
        return
    (clock,) = struct.unpack(">Q", data[:8])
    now = T0 - 100_000 + clock % 200_000  # around the samples' issue time, where the rules bite
    guard = ReplayGuard()
    signed = open_envelope(data[8:])
    guard.accept(signed, now)
    try:
        guard.accept(signed, now)
    except ProtocolError as exc:
        if exc.reason != "replayed":
            raise AssertionError(f"a replay was reported as {exc.reason}") from None
    else:
        raise AssertionError("the same message was accepted twice")
    guard.forget_expired(now)


_BLOB_SAMPLES = [
    blobproto.encode(m)
    for m in (
        blobproto.GetRequest(_SHA, 0),
        blobproto.GetHeader("ok", 10),
        blobproto.Chunk(b"0123456789"),
        blobproto.Ack(10),
        blobproto.End(_SHA),
    )
]


def _target_blob(data: bytes) -> None:
    msg = blobproto.decode(data)
    if blobproto.encode(msg) != data:
        raise AssertionError("blobproto.decode accepted a non-canonical encoding")


def _target_tensors(data: bytes) -> None:
    arrays = tensors.decode_arrays(data, max_bytes=1 << 16, max_arrays=64)
    if tensors.encode_arrays(arrays) != data:
        raise AssertionError("decode_arrays accepted a non-canonical encoding")


_TENSOR_SAMPLES = [
    tensors.encode_arrays([np.arange(6, dtype="<f4").reshape(2, 3), np.array(7, dtype="<i8")]),
    tensors.encode_arrays([np.zeros((0, 2), dtype="|u1")]),
]


TARGETS: list[tuple[str, Callable[[bytes], None]]] = [
    ("envelope", _check_opened),
    ("codec", _target_codec),
    ("frames", _target_frames),
    ("signed_payload", _target_signed_payload),
    ("from_wire", _target_from_wire),
    ("peer_id", _target_peer_id),
    ("replay", _target_replay),
    ("blob", _target_blob),
    ("tensors", _target_tensors),
]


def TestOneInput(data: bytes) -> None:
    """atheris entry point: byte 0 picks the target, the rest is its input.

    Returns normally when the target produced a message or a ProtocolError; any other
    exception propagates (that is the bug the fuzzer is looking for).
    """
    if not data:
        return
    _, target = TARGETS[data[0] % len(TARGETS)]
    try:
        target(bytes(data[1:]))
    except ProtocolError:
        pass


# --- the self-contained random fuzzer ---------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip one bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # overwrite a byte with an "interesting" value
            buf[rng.randrange(len(buf))] = rng.choice(
                [0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCA, 0xCB, 0xDC, 0xDE, 0xFF]
            )
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:  # delete a run
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 8)]
        elif op == 4:  # truncate
            del buf[rng.randrange(len(buf) + 1) :]
        else:  # splice in a piece of another sample
            other = rng.choice(_SAMPLES)
            i = rng.randrange(len(other))
            j = rng.randrange(len(buf) + 1)
            buf[j:j] = other[i : i + rng.randint(1, 32)]
    return bytes(buf)


def _random_tree(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(11 if depth < 4 else 8)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([0, 1, -1, 2**31, -(2**63), 2**63 - 1, rng.randint(-(2**64), 2**64 - 1)])
    if pick == 3:
        return rng.choice([0.0, -0.0, 1e300, -1e300, float("nan"), float("inf"), rng.uniform(-1e6, 1e6)])
    if pick == 4:
        return rng.choice(["", "echo", "12D3KooW" + "A" * 44, _TASK, "x" * rng.randint(0, 600)])
    if pick == 5:
        return rng.randbytes(rng.randint(0, 80))
    if pick in (6, 7):
        return rng.choice(sorted(sample_messages()[0].to_wire()))
    if pick in (8, 9):
        return {
            str(_random_tree(rng, depth + 1))[:20]: _random_tree(rng, depth + 1)
            for _ in range(rng.randint(0, 6))
        }
    return [_random_tree(rng, depth + 1) for _ in range(rng.randint(0, 6))]


def _random_payload(rng: random.Random) -> tuple[str, bytes]:
    """(kind, near-valid payload): a sample's wire map with fields dropped, added or replaced."""
    sample = rng.choice(sample_messages())
    base = sample.to_wire()
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(3)
        if op == 0 and base:
            base.pop(rng.choice(sorted(base)))
        elif op == 1:
            base[rng.choice([*sorted(base), "extra"])] = _random_tree(rng)
        else:
            key = rng.choice(sorted(base)) if base else "x"
            base[key] = _random_tree(rng)
    try:
        if rng.random() < 0.8:  # mostly canonical, so decoding gets past the codec to the fields
            return sample.KIND, codec.pack(base)
        return sample.KIND, msgpack.packb(base, use_bin_type=True, use_single_float=rng.random() < 0.5)
    except Exception:  # the tree may not be packable (int beyond 64 bits): send raw bytes instead
        return sample.KIND, rng.randbytes(16)


def generate(rng: random.Random) -> bytes:
    """One fuzz input for :func:`TestOneInput` (selector byte + body)."""
    names = [n for n, _ in TARGETS]
    strategy = rng.randrange(5)
    if strategy == 0:
        name, body = rng.choice(names), rng.randbytes(rng.randint(0, 300))
    elif strategy == 1:
        name, body = "envelope", _mutate(rng, rng.choice(_SAMPLES))
    elif strategy == 2:
        name = "signed_payload"
        if rng.random() < 0.7:
            kind, payload = _random_payload(rng)
        else:
            outer = msgpack.unpackb(rng.choice(_SAMPLES))
            kind, payload = outer["type"], _mutate(rng, outer["payload"])
        # Usually sign it as its own kind (field validation is reached), sometimes as another.
        pick = _KINDS.index(kind) if rng.random() < 0.8 else rng.randrange(len(_KINDS))
        body = bytes([pick]) + payload
    elif strategy == 3:
        name = rng.choice(["from_wire", "codec"])
        try:
            packed = msgpack.packb(_random_tree(rng), use_bin_type=True)
        except Exception:  # unpackable tree: fall back to random bytes
            packed = rng.randbytes(32)
        body = (bytes([rng.randrange(256)]) + packed) if name == "from_wire" else packed
    else:
        name = rng.choice(["frames", "replay", "blob", "tensors"])
        if name == "frames":
            body = bytes([rng.randrange(256)]) + b"".join(
                encode_frame(
                    _mutate(rng, rng.choice(_SAMPLES)) if rng.random() < 0.5 else rng.choice(_SAMPLES)
                )
                for _ in range(rng.randint(0, 3))
            )
            if rng.random() < 0.3:
                body += struct.pack(">I", rng.choice([MAX_FRAME + 1, 4097, 2**32 - 1, rng.randrange(5000)]))
        elif name == "replay":
            body = rng.randbytes(8) + (
                rng.choice(_SAMPLES) if rng.random() < 0.5 else _mutate(rng, rng.choice(_SAMPLES))
            )
        elif name == "blob":
            body = _mutate(rng, rng.choice(_BLOB_SAMPLES))
        else:
            body = _mutate(rng, rng.choice(_TENSOR_SAMPLES))
    return bytes([names.index(name)]) + body


def run(iterations: int, seed: int, *, out: Any = sys.stdout) -> int:
    """Run the random fuzzer; returns the number of invariant violations (0 = clean)."""
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    names = [n for n, _ in TARGETS]
    failures = 0
    for i in range(iterations):
        data = generate(rng)
        name = names[data[0] % len(names)]
        _, target = TARGETS[data[0] % len(TARGETS)]
        try:
            target(data[1:])
            outcomes[f"{name}:ok"] += 1
            if name == "envelope" and data[1:] not in _SAMPLES:
                raise AssertionError("a mutated envelope verified")
        except ProtocolError as exc:
            outcomes[f"{name}:{exc.reason}"] += 1
        except Exception:
            failures += 1
            print(f"iteration {i}: invariant violated by input {data.hex()}", file=out)
            traceback.print_exc(file=out)
            if failures >= 5:
                break
    for key, n in sorted(outcomes.items()):
        print(f"{n:8d}  {key}", file=out)
    print(f"{iterations} iterations, seed {seed}: {failures} invariant violation(s)", file=out)
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m protocol.fuzz", description="Fuzz peerd's protocol decoders."
    )
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return 1 if run(args.iterations, args.seed) else 0


if __name__ == "__main__":
    sys.exit(main())
