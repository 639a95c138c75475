"""Encryption of secrets at rest, and signing, from one operator secret.

Ciphertext format: ``kb1.<key id>.<base64url(nonce || AES-256-GCM ciphertext)>``.
The key id names which salt and purpose made it, so that during a rotation old
values stay readable and `keys rotate` can find what still needs re-sealing.
The record a value belongs to (say ``api_key:tavily``) is bound in as
associated data: a ciphertext copied onto another record does not decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import InvalidInput, KeybearerError
from proxy.names import KEY_PURPOSES

VERSION = "kb1"
MIN_SALT_LENGTH = 32
_PLACEHOLDERS = ("change", "secret", "example", "salt", "password", "default", "keybearer", "xxxx", "1234")
HOW_TO_MAKE_ONE = (
    "generate one with `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'` "
    "and pass it as KEYBEARER_SALT, or in a file named by KEYBEARER_SALT_FILE"
)


class SecretError(InvalidInput):
    """The operator secret is unusable; the message says how to fix it."""


class DecryptError(KeybearerError):
    """A stored value cannot be decrypted with any known key."""

    code = "decrypt_failed"


def check_salt(salt: str | None, name: str = "KEYBEARER_SALT") -> str:
    if not salt:
        raise SecretError(f"{name} is not set: {HOW_TO_MAKE_ONE}")
    if len(salt) < MIN_SALT_LENGTH:
        raise SecretError(
            f"{name} is too short ({len(salt)} characters, need {MIN_SALT_LENGTH}): {HOW_TO_MAKE_ONE}"
        )
    lowered = salt.lower()
    if len(set(salt)) < 12 or any(word in lowered for word in _PLACEHOLDERS):
        raise SecretError(f"{name} looks like a placeholder, not a random secret: {HOW_TO_MAKE_ONE}")
    return salt


def _derive(salt: str, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"keybearer/v1", info=info.encode()).derive(
        salt.encode()
    )


class _Generation:
    """The keys one salt yields: one AES key per purpose, and short ids for them."""

    def __init__(self, salt: str) -> None:
        self.keys = {p: _derive(salt, "keybearer:" + p) for p in KEY_PURPOSES}
        self.ids = {p: _derive(salt, "keybearer-id:" + p)[:6].hex() for p in KEY_PURPOSES}
        self.ciphers = {p: AESGCM(k) for p, k in self.keys.items()}


class Keyring:
    """Seals with the current salt; opens with the current or any previous one."""

    def __init__(self, salt: str, previous: Sequence[str] = ()) -> None:
        check_salt(salt)
        self.current = _Generation(salt)
        self.generations = [self.current, *(_Generation(s) for s in previous if s != salt)]

    def encrypt(self, purpose: str, plaintext: bytes, record: str) -> str:
        nonce = os.urandom(12)
        sealed = self.current.ciphers[purpose].encrypt(nonce, plaintext, _aad(purpose, record))
        body = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()
        return f"{VERSION}.{self.current.ids[purpose]}.{body}"

    def decrypt(self, purpose: str, token: str, record: str) -> bytes:
        version, _, rest = token.partition(".")
        key_id, _, body = rest.partition(".")
        if version != VERSION or not body:
            raise DecryptError(f"not a {VERSION} ciphertext")
        for gen in self.generations:
            if gen.ids[purpose] == key_id:
                raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
                try:
                    return gen.ciphers[purpose].decrypt(raw[:12], raw[12:], _aad(purpose, record))
                except InvalidTag:
                    raise DecryptError(f"ciphertext for {record} failed authentication") from None
        raise DecryptError(
            f"the key that sealed {record} is not configured; add the old salt to KEYBEARER_SALT_PREVIOUS"
        )

    def is_current(self, purpose: str, token: str) -> bool:
        return token.split(".", 2)[1:2] == [self.current.ids[purpose]]

    def sign(self, purpose: str, message: bytes) -> str:
        mac = hmac.new(self.current.keys[purpose], message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def verify(self, purpose: str, message: bytes, signature: str) -> bool:
        # A signature is base64url: anything else is simply wrong (and
        # compare_digest refuses non-ASCII str with a TypeError).
        if not signature.isascii():
            return False
        presented = signature.encode("ascii")
        for gen in self.generations:
            mac = hmac.new(gen.keys[purpose], message, hashlib.sha256).digest()
            if hmac.compare_digest(base64.urlsafe_b64encode(mac).rstrip(b"="), presented):
                return True
        return False


def _aad(purpose: str, record: str) -> bytes:
    return f"{VERSION}|{purpose}|{record}".encode()
