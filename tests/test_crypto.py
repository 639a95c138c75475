"""Sealed secrets: AES-256-GCM, versioned, bound to their record, rotatable."""

from __future__ import annotations

import pytest

from proxy.crypto import DecryptError, Keyring

OLD = "Zt8r1Lq0xVb3NcMw7KpY2sDf6GhJ9aUe4IoRnTl5"
NEW = "Pp4Ee8Rr2Tt6Yy0Uu3Ii7Oo1Aa5Ss9Dd2Ff6Gg0Hh"


def test_round_trip_and_format() -> None:
    ring = Keyring(NEW)
    sealed = ring.encrypt("api_key", b"sk-live-123", "api_key:tavily")
    version, key_id, _body = sealed.split(".")
    assert version == "kb1" and len(key_id) == 12 and "sk-live" not in sealed
    assert ring.decrypt("api_key", sealed, "api_key:tavily") == b"sk-live-123"
    # a random nonce: the same plaintext never seals the same way twice
    assert ring.encrypt("api_key", b"sk-live-123", "api_key:tavily") != sealed


def test_bound_to_record_and_purpose() -> None:
    ring = Keyring(NEW)
    sealed = ring.encrypt("api_key", b"k", "api_key:tavily")
    with pytest.raises(DecryptError):
        ring.decrypt("api_key", sealed, "api_key:linear")  # copied onto another record
    with pytest.raises(DecryptError):
        ring.decrypt("oauth_token", sealed, "api_key:tavily")  # another purpose's key
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(DecryptError):
        ring.decrypt("api_key", tampered, "api_key:tavily")


def test_rotation_keeps_old_values_readable() -> None:
    old_sealed = Keyring(OLD).encrypt("api_key", b"k", "api_key:a")
    with pytest.raises(DecryptError, match="KEYBEARER_SALT_PREVIOUS"):
        Keyring(NEW).decrypt("api_key", old_sealed, "api_key:a")
    ring = Keyring(NEW, previous=[OLD])
    assert ring.decrypt("api_key", old_sealed, "api_key:a") == b"k"
    assert not ring.is_current("api_key", old_sealed)
    assert ring.is_current("api_key", ring.encrypt("api_key", b"k", "api_key:a"))
