"""peerd/identity.py: the key file's creation, permissions, stability and refusal rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from peerd.identity import KEY_FILE, Identity, IdentityError, identity_from_seed, load_or_create_identity
from protocol.peerid import peer_id_from_public_key


def test_first_start_creates_a_private_32_byte_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ident = load_or_create_identity(state)
    key = state / KEY_FILE
    assert key.read_bytes() == ident.seed and len(ident.seed) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert sorted(p.name for p in state.iterdir()) == [KEY_FILE]  # no temp file left behind


def test_same_peer_id_across_restarts(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    second = load_or_create_identity(tmp_path)
    assert first.peer_id == second.peer_id and first.seed == second.seed
    assert first.peer_id.startswith("12D3KooW")
    assert first.peer_id == peer_id_from_public_key(first.public_key)


def test_different_state_dirs_get_different_identities(tmp_path: Path) -> None:
    assert load_or_create_identity(tmp_path / "a").peer_id != load_or_create_identity(tmp_path / "b").peer_id


def test_signatures_verify_with_the_public_key(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    sig = ident.sign(b"advert bytes")
    assert len(sig) == 64
    Ed25519PublicKey.from_public_bytes(ident.public_key).verify(sig, b"advert bytes")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_key_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    load_or_create_identity(tmp_path)
    key = tmp_path / KEY_FILE
    key.chmod(mode)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(tmp_path)
    assert f"chmod 600 {key}" in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_a_key_of_the_wrong_size_is_refused_and_kept(tmp_path: Path) -> None:
    key = tmp_path / KEY_FILE
    for content in (b"", b"x" * 31, b"x" * 64):
        key.write_bytes(content)
        key.chmod(0o600)
        with pytest.raises(IdentityError, match="expected exactly 32"):
            load_or_create_identity(tmp_path)
        assert key.read_bytes() == content  # never silently replaced: that would change the peer ID


def test_a_symlinked_key_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.write_bytes(os.urandom(32))
    real.chmod(0o600)
    (tmp_path / KEY_FILE).symlink_to(real)
    with pytest.raises(IdentityError, match="cannot open"):
        load_or_create_identity(tmp_path)


def test_a_directory_in_place_of_the_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).mkdir()
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path)


def test_the_seed_never_appears_in_repr(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    assert ident.seed.hex() not in repr(ident)
    assert repr(ident.seed) not in repr(ident)


def test_identity_rejects_mismatched_parts() -> None:
    a, b = identity_from_seed(b"\1" * 32), identity_from_seed(b"\2" * 32)
    with pytest.raises(IdentityError):
        Identity(seed=a.seed, public_key=b.public_key, peer_id=b.peer_id)
    with pytest.raises(IdentityError):
        Identity(seed=a.seed, public_key=a.public_key, peer_id=b.peer_id)
    with pytest.raises(IdentityError):
        identity_from_seed(b"\1" * 31)


def test_creation_never_replaces_a_key_that_appeared_meanwhile(tmp_path: Path) -> None:
    """Two daemons starting at once on one state dir must end up with one identity."""
    from peerd import identity as mod

    existing = os.urandom(32)
    key = tmp_path / KEY_FILE
    key.write_bytes(existing)
    key.chmod(0o600)
    mod._create_seed(key)  # the loser of the race
    assert key.read_bytes() == existing
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]
