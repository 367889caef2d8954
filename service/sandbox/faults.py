"""Fault injection for chaos tests: deterministic, per endpoint, added through the control API.

A fault applies to one endpoint (``charge``, ``cancel``, ``issue_billing_key``,
``issue_billing_key_by_card``, ``get_payment``, ``get_payment_by_order``,
``list_transactions``, ``delete_billing_key``) or to all (``*``). It fires for the next
``count`` matching requests, or with probability ``rate`` drawn from an RNG seeded at build and
reset time, or (neither given) on every matching request until cleared. When several faults
of one kind match a request, the first added that fires is applied.

kinds:

* ``error``: answer ``{code, message}`` with ``status`` before anything is processed; such an
  answer is not stored under the Idempotency-Key (it models a failure in front of Toss's
  processing; use ``TossPayments-Test-Code`` for an error Toss itself returns and replays).
  ``status`` 429 without a code answers ``TOO_MANY_REQUESTS``, with ``Retry-After`` of
  ``seconds`` rounded up (at least 1).
* ``latency``: the request is processed after ``seconds`` (it is in flight meanwhile, so a
  duplicate with the same Idempotency-Key gets 409).
* ``hold``: like latency, but waits until ``POST /_sandbox/faults/release``.
* ``latency_after_commit``: processed and stored at once, answered after ``seconds``
  (a client with a shorter timeout sees a timeout although the charge happened).
* ``drop_after_commit``: processed and stored, then the connection is closed without a
  complete response (the client sees a transport error).
* ``processed_error``: answer ``{code, message}`` with ``status`` as Toss's own processing does
  (e.g. 400 ``PROVIDER_ERROR``): stored under the Idempotency-Key and replayed for it, like a
  ``TossPayments-Test-Code`` error, but without the client asking for it.

Webhook faults (endpoint ``webhook``), on the delivery of an event:

* ``duplicate``: after a delivery answered 200, the same event (same transmission id, retried
  count + 1) is delivered once more, as Toss does when the answer did not reach it in time.
* ``delay``: the delivery attempt is counted as failed without reaching the receiver, so Toss's
  retry schedule (1, 4, 16, … minutes of the sandbox clock) delivers it later, after events
  emitted meanwhile: deliveries arrive out of order.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from dataclasses import asdict, dataclass
from enum import StrEnum

from service.sandbox.errors import ApiError

ENDPOINTS = frozenset(
    {
        "issue_billing_key",
        "issue_billing_key_by_card",
        "charge",
        "cancel",
        "get_payment",
        "get_payment_by_order",
        "list_transactions",
        "delete_billing_key",
        "webhook",
        "*",
    }
)


class FaultKind(StrEnum):
    ERROR = "error"
    LATENCY = "latency"
    HOLD = "hold"
    LATENCY_AFTER_COMMIT = "latency_after_commit"
    DROP_AFTER_COMMIT = "drop_after_commit"
    PROCESSED_ERROR = "processed_error"
    DUPLICATE = "duplicate"
    DELAY = "delay"


# Kinds that act on webhook deliveries; every other kind acts on API requests.
WEBHOOK_KINDS = frozenset({FaultKind.DUPLICATE, FaultKind.DELAY})


@dataclass(slots=True)
class Fault:
    id: int
    endpoint: str
    kind: FaultKind
    count: int | None = None  # remaining firings; None = unlimited
    rate: float | None = None
    seconds: float = 0.0
    status: int = 500
    code: str = "FAILED_INTERNAL_SYSTEM_PROCESSING"
    message: str | None = None
    fired: int = 0

    def as_json(self) -> dict[str, object]:
        return asdict(self)

    def error(self) -> ApiError:
        return ApiError(self.code, self.message, self.status)


def _number(spec: dict[str, object], key: str, default: float | None) -> float | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ApiError("INVALID_REQUEST", f"{key} must be a non-negative number")
    return float(value)


class FaultInjector:
    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._release = asyncio.Event()
        self._held_changed = asyncio.Condition()
        self._held = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seed = seed
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.release()  # nothing stays stuck in a hold across a reset
        with self._lock:
            if seed is not None:
                self._seed = seed
            self._rng = random.Random(self._seed)  # noqa: S311 - determinism, not secrecy
            self._faults: list[Fault] = []
            self._ids = itertools.count(1)

    def add(self, spec: dict[str, object]) -> Fault:
        endpoint = spec.get("endpoint", "*")
        if endpoint not in ENDPOINTS:
            raise ApiError("INVALID_REQUEST", f"endpoint must be one of {sorted(ENDPOINTS)}")
        try:
            kind = FaultKind(str(spec.get("kind")))
        except ValueError:
            raise ApiError("INVALID_REQUEST", "unknown fault kind") from None
        if (kind in WEBHOOK_KINDS) != (endpoint == "webhook"):
            raise ApiError("INVALID_REQUEST", "duplicate and delay are the webhook's kinds only")
        count = _number(spec, "count", None)
        rate = _number(spec, "rate", None)
        if rate is not None and rate > 1:
            raise ApiError("INVALID_REQUEST", "rate must be within 0..1")
        status = int(_number(spec, "status", 500) or 500)
        default_code = "TOO_MANY_REQUESTS" if status == 429 else "FAILED_INTERNAL_SYSTEM_PROCESSING"
        code = spec.get("code", default_code)
        message = spec.get("message")
        if not isinstance(code, str) or not (message is None or isinstance(message, str)):
            raise ApiError("INVALID_REQUEST", "code and message must be strings")
        with self._lock:
            fault = Fault(
                id=next(self._ids),
                endpoint=str(endpoint),
                kind=kind,
                count=None if count is None else int(count),
                rate=rate,
                seconds=_number(spec, "seconds", 0.0) or 0.0,
                status=status,
                code=code,
                message=message,
            )
            self._faults.append(fault)
            return fault

    def fire(self, endpoint: str, kind: FaultKind) -> Fault | None:
        """The fault of ``kind`` that fires for this request, if any; the first one wins."""
        with self._lock:
            for fault in self._faults:
                if fault.kind is not kind or fault.endpoint not in (endpoint, "*"):
                    continue
                if fault.count is not None and fault.count <= 0:
                    continue
                if fault.rate is not None and self._rng.random() >= fault.rate:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                fault.fired += 1
                return fault
        return None

    def listing(self) -> dict[str, object]:
        with self._lock:
            return {"faults": [f.as_json() for f in self._faults], "held": self._held}

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    async def hold(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._held += 1
            event, changed = self._release, self._held_changed
        async with changed:
            changed.notify_all()
        try:
            await event.wait()
        finally:
            with self._lock:
                self._held -= 1

    async def wait_held(self, count: int) -> None:
        """Return once at least ``count`` requests are held."""
        changed = self._held_changed
        async with changed:
            await changed.wait_for(lambda: self._held >= count)

    def release(self) -> int:
        """Let every held request continue; later holds wait for the next release.

        Callable from any thread: the event is set on the loop the held requests wait on.
        """
        with self._lock:
            released, event, loop = self._held, self._release, self._loop
            self._release = asyncio.Event()
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)
        return released
