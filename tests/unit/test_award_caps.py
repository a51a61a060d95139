"""The award's optional ``caps`` field (SPEC §7.5, §10.2): absent is the old bytes, present is
checked against the quoted bids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol import codec
from protocol.envelope import open_envelope
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import Award

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def _cases() -> dict[str, Any]:
    data = json.loads((VECTORS / "awards.json").read_text(encoding="utf-8"))
    return {c["name"]: c for c in data["cases"]}


def _award(name: str) -> Award:
    msg = open_envelope(bytes.fromhex(_cases()[name]["award_hex"]), kinds=frozenset({"award"})).message
    assert isinstance(msg, Award)
    return msg


def test_an_award_without_caps_has_no_caps_key_on_the_wire() -> None:
    award = _award("epoch0")
    assert award.caps is None and "caps" not in award.to_wire()


def test_caps_round_trip() -> None:
    award = _award("epoch0_caps")
    assert award.caps is not None and list(award.caps.values()) == [1600.0]
    wire = award.to_wire()
    assert Award.from_wire(codec.unpack(codec.pack(wire))) == award


def test_explicit_nil_caps_is_not_canonical_and_empty_caps_is_malformed() -> None:
    wire = _award("epoch0").to_wire()
    # nil decodes to "no caps", whose canonical form has no key: re-encoding differs.
    msg = Award.from_wire({**wire, "caps": None})
    assert codec.pack(msg.to_wire()) != codec.pack({**wire, "caps": None})
    with pytest.raises(RemoteProtocolError) as exc:
        Award.from_wire({**wire, "caps": {}})
    assert exc.value.reason == "malformed"


@pytest.mark.parametrize(("value", "reason"), [(-1.0, "absurd"), (2e6, "absurd"), ("x", "malformed")])
def test_caps_values_are_bounded(value: object, reason: str) -> None:
    wire = _award("epoch0_caps").to_wire()
    peer = next(iter(wire["caps"]))
    with pytest.raises(RemoteProtocolError) as exc:
        Award.from_wire({**wire, "caps": {peer: value}})
    assert exc.value.reason == reason


def test_caps_keys_must_be_peer_ids() -> None:
    wire = _award("epoch0").to_wire()
    with pytest.raises(LocalProtocolError):
        Award(**{**wire, "caps": {"not-a-peer": 1.0}})
