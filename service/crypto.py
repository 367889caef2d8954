"""Billing keys at rest: AES-256-GCM envelopes under a keyring that lives only in the environment.

The database stores the envelope, the key id and the sha256 of the billing key, so a dump alone
reveals no usable key. Envelope v1 (checked by ``billing.is_key_envelope``)::

    0x01 | len(key_id) | key_id (ASCII) | nonce (12 bytes) | ciphertext || tag (16 bytes)

The associated data is the payment method's customerKey: an envelope copied onto another
customer's row does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENVELOPE_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class KeyringError(ValueError):
    """The keyring configuration is unusable; the message says why (never a key)."""


class EnvelopeError(ValueError):
    """An envelope that is malformed, under an unknown key id, or does not authenticate."""


@dataclass(frozen=True, slots=True)
class SealedKey:
    """What the database stores for a billing key."""

    ciphertext: bytes
    key_id: str
    sha256: str


def billing_key_sha256(billing_key: str) -> str:
    """The lowercase hex sha256 that finds a payment method (BILLING_DELETED webhooks)."""
    return hashlib.sha256(billing_key.encode()).hexdigest()


class Keyring:
    """Data keys by id, one of them active for new envelopes; older ids still open theirs."""

    __slots__ = ("_active", "_keys")

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if not keys:
            raise KeyringError("the keyring has no keys")
        for key_id, key in keys.items():
            if not KEY_ID.fullmatch(key_id):
                raise KeyringError(f"key id {key_id!r} must match {KEY_ID.pattern}")
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key {key_id!r} must be {KEY_BYTES} bytes (AES-256)")
        if active not in keys:
            raise KeyringError(f"the active key id {active!r} is not in the keyring")
        self._keys = {k: AESGCM(v) for k, v in keys.items()}
        self._active = active

    @classmethod
    def parse(cls, spec: str, active: str | None = None) -> Keyring:
        """Reads ``id:base64key[,id:base64key…]``; the active id defaults to the first one."""
        keys: dict[str, bytes] = {}
        for item in (part.strip() for part in spec.split(",")):
            key_id, sep, encoded = item.partition(":")
            if not sep or not key_id:
                raise KeyringError("each keyring entry must be id:base64key")
            if key_id in keys:
                raise KeyringError(f"key id {key_id!r} appears twice")
            try:
                keys[key_id] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(f"key {key_id!r} is not valid base64") from None
        return cls(keys, active or next(iter(keys)))

    @staticmethod
    def generate_key() -> str:
        """A fresh base64 data key, for operators creating a keyring entry."""
        return base64.b64encode(os.urandom(KEY_BYTES)).decode()

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __repr__(self) -> str:
        return f"Keyring(key_ids={sorted(self._keys)}, active={self._active!r})"

    def seal(self, billing_key: str, customer_key: str) -> SealedKey:
        """Encrypts a billing key for one customer under the active key."""
        kid = self._active.encode()
        nonce = os.urandom(NONCE_BYTES)
        body = self._keys[self._active].encrypt(nonce, billing_key.encode(), customer_key.encode())
        envelope = bytes([ENVELOPE_VERSION, len(kid)]) + kid + nonce + body
        return SealedKey(envelope, self._active, billing_key_sha256(billing_key))

    def open(self, envelope: bytes, key_id: str, customer_key: str) -> str:
        """The billing key inside an envelope; raises EnvelopeError for anything else."""
        if len(envelope) < 2 or envelope[0] != ENVELOPE_VERSION:
            raise EnvelopeError("not a billing-key envelope v1")
        n = envelope[1]
        kid = envelope[2 : 2 + n].decode("ascii", errors="replace")
        if kid != key_id:
            raise EnvelopeError(f"envelope key id {kid!r} differs from its row's {key_id!r}")
        aead = self._keys.get(kid)
        if aead is None:
            raise EnvelopeError(f"key id {kid!r} is not in the keyring")
        nonce = envelope[2 + n : 2 + n + NONCE_BYTES]
        body = envelope[2 + n + NONCE_BYTES :]
        if len(nonce) != NONCE_BYTES or len(body) <= TAG_BYTES:
            raise EnvelopeError("truncated billing-key envelope")
        try:
            return aead.decrypt(nonce, body, customer_key.encode()).decode()
        except InvalidTag:
            raise EnvelopeError("billing-key envelope does not authenticate") from None

    def reseal(self, envelope: bytes, key_id: str, customer_key: str) -> SealedKey:
        """The same billing key under the active key (rotation)."""
        return self.seal(self.open(envelope, key_id, customer_key), customer_key)
