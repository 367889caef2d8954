"""Webhook delivery the way Toss does it (reference §10).

Each event is POSTed as JSON ``{eventType, createdAt, data}`` with Toss's three transmission
headers; success is HTTP 200 within 10 s. A failed delivery is retried 7 times, 1, 4, 16, 64,
256, 1024 and 4096 minutes after the previous attempt, on the sandbox clock, then marked failed.
A background task delivers what is due; ``deliver_due`` does the same on demand so tests can
move the clock and flush without sleeping. All retries of one event share its transmission id.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx

from service.sandbox.clock import Clock, toss_time, webhook_time
from service.sandbox.errors import json_bytes
from service.sandbox.faults import FaultInjector, FaultKind
from service.sandbox.store import Json, new_id

RETRY_MINUTES = (1, 4, 16, 64, 256, 1024, 4096)
DELIVERY_TIMEOUT_SECONDS = 10.0
_POLL_SECONDS = 1.0


@dataclass(slots=True)
class Attempt:
    at: datetime
    retried_count: int
    status: int | None
    error: str | None

    def as_json(self) -> Json:
        return {
            "at": toss_time(self.at),
            "retriedCount": self.retried_count,
            "status": self.status,
            "error": self.error,
        }


@dataclass(slots=True)
class Delivery:
    transmission_id: str
    event_type: str
    body: bytes
    url: str | None
    next_at: datetime | None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.url is None:
            return "no_url"
        if self.next_at is not None:
            return "pending"
        return "delivered" if self.attempts and self.attempts[-1].status == 200 else "failed"

    def as_json(self) -> Json:
        return {
            "transmissionId": self.transmission_id,
            "eventType": self.event_type,
            "url": self.url,
            "state": self.state,
            "nextAttemptAt": toss_time(self.next_at) if self.next_at else None,
            "attempts": [a.as_json() for a in self.attempts],
            "body": self.body.decode("utf-8"),
        }


class WebhookDispatcher:
    def __init__(
        self,
        clock: Clock,
        url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        self._clock = clock
        self._faults = faults
        self.url = url
        self._transport = transport
        self._deliveries: list[Delivery] = []
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None

    # ---- lifecycle (the app's lifespan)

    async def start(self) -> None:
        self._http = httpx.AsyncClient(transport=self._transport)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="sandbox-webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.aclose()
        self._task = self._http = self._wake = self._lock = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _POLL_SECONDS)
            self._wake.clear()
            await self.deliver_due()

    # ---- events

    def emit(self, event_type: str, data: Json) -> None:
        """Queue an event; called by the store while it holds its lock, so never blocks."""
        now = self._clock.now()
        body = json_bytes({"eventType": event_type, "createdAt": webhook_time(now), "data": data})
        url = self.url
        self._deliveries.append(
            Delivery(new_id("whtrans"), event_type, body, url, now if url else None)
        )
        if self._wake is not None:
            # emit may run on a test thread; wake the loop-owned event safely.
            loop = self._task.get_loop() if self._task else None
            if loop is not None and loop.is_running():
                loop.call_soon_threadsafe(self._wake.set)

    def listing(self) -> list[Json]:
        return [d.as_json() for d in self._deliveries]

    def reset(self) -> None:
        self._deliveries = []

    async def deliver_due(self) -> list[Json]:
        """Attempt every delivery that is due now; returns those attempted."""
        if self._lock is None or self._http is None:
            raise RuntimeError("webhook dispatcher is not running")
        async with self._lock:
            now = self._clock.now()
            due = [d for d in self._deliveries if d.next_at is not None and d.next_at <= now]
            await asyncio.gather(*(self._attempt(d) for d in due))
            return [d.as_json() for d in due]

    async def _attempt(self, delivery: Delivery) -> None:
        assert self._http is not None
        assert delivery.url is not None
        now = self._clock.now()
        retried = len(delivery.attempts)
        headers = {
            "Content-Type": "application/json",
            "tosspayments-webhook-transmission-time": toss_time(now),
            "tosspayments-webhook-transmission-retried-count": str(retried),
            "tosspayments-webhook-transmission-id": delivery.transmission_id,
        }
        status: int | None = None
        error: str | None = None
        if retried == 0 and self._fire(FaultKind.DELAY):
            # As if the receiver's answer never came: Toss's retry schedule takes over.
            delivery.attempts.append(Attempt(now, retried, None, "delayed by a fault"))
            delivery.next_at = now + timedelta(minutes=RETRY_MINUTES[0])
            return
        try:
            response = await self._http.post(
                delivery.url,
                content=delivery.body,
                headers=headers,
                timeout=DELIVERY_TIMEOUT_SECONDS,
            )
            status = response.status_code
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        delivery.attempts.append(Attempt(now, retried, status, error))
        if status == 200:
            # A duplicate fault: Toss did not see this 200 in time and delivers the event again.
            delivery.next_at = now if self._fire(FaultKind.DUPLICATE) else None
        elif retried < len(RETRY_MINUTES):
            delivery.next_at = now + timedelta(minutes=RETRY_MINUTES[retried])
        else:
            delivery.next_at = None

    def _fire(self, kind: FaultKind) -> bool:
        return self._faults is not None and self._faults.fire("webhook", kind) is not None
