"""The sandbox's clock: wall time or a frozen start, plus an offset that tests move forward."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from service.toss import KST


class Clock:
    """``Clock()`` follows wall time; ``Clock(start)`` stands still at ``start``.

    Either way ``advance`` moves it forward, which is how idempotency expiry and webhook
    retries are exercised without sleeping.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError("Clock start must be timezone-aware")
        self._start = start
        self._offset = timedelta()
        self._lock = threading.Lock()

    def now(self) -> datetime:
        base = self._start if self._start is not None else datetime.now(KST)
        with self._lock:
            return (base + self._offset).astimezone(KST)

    def advance(self, delta: timedelta) -> datetime:
        if delta < timedelta():
            raise ValueError("the sandbox clock only moves forward")
        with self._lock:
            self._offset += delta
        return self.now()

    def reset(self) -> None:
        with self._lock:
            self._offset = timedelta()


def toss_time(moment: datetime) -> str:
    """``yyyy-MM-dd'T'HH:mm:ss+09:00``, the format of every timestamp in API responses."""
    return moment.astimezone(KST).strftime("%Y-%m-%dT%H:%M:%S+09:00")


def webhook_time(moment: datetime) -> str:
    """Webhook ``createdAt``: Korea local time with microseconds and no offset."""
    return moment.astimezone(KST).strftime("%Y-%m-%dT%H:%M:%S.%f")
