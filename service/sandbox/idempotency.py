"""Idempotency-Key as Toss documents it (reference §8).

A key is remembered for 15 days from its first use, per (key, secret key, URL path, method);
the body is not part of it. The first response, success or error, is replayed byte for byte;
while the first request is still being processed a duplicate gets 409
IDEMPOTENT_REQUEST_PROCESSING.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.sandbox.clock import Clock

TTL = timedelta(days=15)
MAX_KEY_LENGTH = 300


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: bytes
    media_type: str


@dataclass(frozen=True, slots=True)
class Slot:
    idempotency_key: str
    secret_digest: str
    path: str
    method: str


class InFlight:
    """Marker: the first request with this key has not finished yet."""


IN_FLIGHT = InFlight()


@dataclass(slots=True)
class _Entry:
    created: datetime
    response: StoredResponse | None  # None while in flight


def secret_digest(secret_key: str) -> str:
    # Only a digest is kept, so the sandbox's memory holds no usable secret key.
    return hashlib.sha256(secret_key.encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._entries: dict[Slot, _Entry] = {}
        self._lock = threading.Lock()

    def begin(self, slot: Slot) -> StoredResponse | InFlight | None:
        """The stored response, IN_FLIGHT, or None after claiming the slot for this request."""
        now = self._clock.now()
        with self._lock:
            entry = self._entries.get(slot)
            if entry is not None and now - entry.created < TTL:
                return entry.response if entry.response is not None else IN_FLIGHT
            self._entries[slot] = _Entry(now, None)
            return None

    def finish(self, slot: Slot, response: StoredResponse | None) -> None:
        """Store the first response, or forget the claim (None) when nothing was processed."""
        with self._lock:
            if response is None:
                self._entries.pop(slot, None)
            elif (entry := self._entries.get(slot)) is not None:
                entry.response = response

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()
