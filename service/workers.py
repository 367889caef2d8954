"""The work loop: pull every queue the database filled, execute against Toss, record the results.

The database decides; this module only claims (with a lease and a fencing token), calls Toss and
writes back through ``service/db.py``. A doorbell ring (pg_net) or the poll timer starts a drain;
rings that arrive during a drain are coalesced into one more pass. Toss calls are bounded by a
concurrency limit and a per-API rate limit (Toss's test environment allows about 100 requests a
minute per API), and a 429 pauses that API for its Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import standardwebhooks
from aiolimiter import AsyncLimiter
from psycopg_pool import AsyncConnectionPool

from service import db
from service.crypto import EnvelopeError, Keyring
from service.metrics import Metrics
from service.settings import Settings
from service.toss import (
    Failure,
    FailureClass,
    Operation,
    Payment,
    TossClient,
    TossError,
    TossException,
    TossOutcomeUnknown,
    TossReplyMismatch,
    classify,
)

_log = logging.getLogger("saju_billing.workers")
T = TypeVar("T")

# Codes that mean a billing key is already gone at Toss: its deletion is done.
_KEY_ALREADY_GONE = frozenset(
    {"ALREADY_REMOVED_BILLING_KEY", "NOT_FOUND_BILLING", "BILLING_KEY_NOT_FOUND"}
)
_APPROVED = frozenset({"DONE", "CANCELED", "PARTIAL_CANCELED"})
_FAILED = frozenset({"ABORTED", "EXPIRED"})


def paced_limiter(rate_per_minute: int, burst: int) -> AsyncLimiter:
    """A limiter that keeps every sliding minute under ``rate_per_minute`` calls.

    Toss counts calls per API in any sliding minute. A leaky bucket as deep as the whole minute
    (``AsyncLimiter(rate, 60)``) lets a minute's worth through at once and then the steady rate
    behind it, twice the limit in the first minute: 429s. This bucket is ``burst`` deep and
    leaks the rest of the minute's allowance evenly, less another ``burst`` kept back for the
    jitter between sending a call and Toss counting it: at most ``rate - burst`` calls in any
    minute, and a steady ``rate - 2 * burst`` a minute.
    """
    burst = max(1, min(burst, rate_per_minute // 20))
    steady = max(1, rate_per_minute - 2 * burst)
    return AsyncLimiter(burst, 60 * burst / steady)


@dataclass
class Throttle:
    """Concurrency and per-API rate limits for Toss calls, with 429 back-off."""

    concurrency: int
    rate_per_minute: int
    metrics: Metrics
    _slots: asyncio.Semaphore = field(init=False)
    _limits: dict[Operation, AsyncLimiter] = field(init=False, default_factory=dict)
    _paused_until: dict[Operation, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)

    async def call(self, operation: Operation, fn: Callable[[], Awaitable[T]]) -> T:
        limiter = self._limits.get(operation)
        if limiter is None:
            limiter = self._limits[operation] = paced_limiter(
                self.rate_per_minute, self.concurrency
            )
        async with self._slots:
            loop = asyncio.get_running_loop()
            wait = self._paused_until.get(operation, 0.0) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            async with limiter:
                started = loop.time()
                try:
                    return await fn()
                except TossError as exc:
                    if exc.http_status == 429:
                        self.metrics.toss_429.labels(operation).inc()
                        pause = exc.retry_after if exc.retry_after is not None else 5.0
                        self._paused_until[operation] = loop.time() + min(pause, 60.0)
                    raise
                finally:
                    self.metrics.toss_latency.labels(operation).observe(loop.time() - started)


class Worker:
    """Drains every work queue; one per service process (replicas fence each other in SQL)."""

    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool[Any],
        toss: TossClient,
        keyring: Keyring,
        http: httpx.AsyncClient,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.toss = toss
        self.keyring = keyring
        self.http = http
        self.metrics = metrics
        self.throttle = Throttle(settings.concurrency, settings.rate_per_minute, metrics)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._signer = (
            standardwebhooks.Webhook(settings.notify_secret.get_secret_value())
            if settings.notify_url and settings.notify_secret
            else None
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="saju-billing-worker")

    def ring(self) -> None:
        """A doorbell: drain now (rings during a drain make one more pass)."""
        self.metrics.doorbell_rings.inc()
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, give in-flight calls the grace period, then leave the rest to leases."""
        self._stopping.set()
        self._wake.set()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._loop_task), self.settings.shutdown_grace_s
                )
            except TimeoutError:
                self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await self.drain()
            except Exception:  # a bad pass must not end the loop; the next one retries
                _log.exception("drain failed")
            if self._stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    async def drain(self) -> dict[str, int]:
        """One pass over every queue until none has claimable work; returns what was done."""
        done = {
            "attempts": 0,
            "refunds": 0,
            "webhooks": 0,
            "key_deletions": 0,
            "notifications": 0,
            "reconciliations": 0,
        }
        while not self._stopping.is_set():
            counts = await asyncio.gather(
                self._queue(db.service_claim_webhooks, self._webhook),
                self._queue(db.service_claim_attempts, self._attempt),
                self._queue(db.service_claim_refunds, self._refund),
                self._queue(db.service_claim_key_deletions, self._key_deletion),
                self._queue(db.service_claim_notifications, self._notification),
                self._reconciliations(),
            )
            for key, n in zip(done, counts, strict=True):
                done[key] += n
            if not any(counts):
                return done
        return done

    async def _queue(
        self,
        claim: Callable[..., db.Call[list[T]]],
        handle: Callable[[T], Awaitable[None]],
    ) -> int:
        """Claims and handles until the queue has nothing claimable; returns how many items.

        Pipelined: a new claim goes out as soon as a few slots are free rather than after the
        slowest item of the previous batch, so up to ``concurrency`` items stay in flight. A
        claim that comes back short means the queue is empty for now: what runs is finished
        and the pass ends (``drain`` starts another while any queue had work).
        """
        s = self.settings
        running: set[asyncio.Task[None]] = set()
        # Claim in groups of at least half a batch: fewer claim round trips per item.
        threshold = max(1, min(s.batch, s.concurrency) // 2)
        total = 0
        exhausted = False
        try:
            while not exhausted and not self._stopping.is_set():
                free = s.concurrency - len(running)
                if free >= threshold or not running:
                    want = min(s.batch, free)
                    async with self.pool.connection() as conn:
                        items = await db.run(conn, claim(s.worker_name, want, s.lease))
                    total += len(items)
                    running.update(asyncio.create_task(self._guard(handle, item)) for item in items)
                    exhausted = len(items) < want
                    if not exhausted and s.concurrency - len(running) >= threshold:
                        continue
                if running and not exhausted:
                    _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (the shutdown grace ran out): what is in flight is left to its lease.
            for task in running:
                task.cancel()
            raise
        if running:
            await asyncio.wait(running)
        return total

    async def _guard(self, handle: Callable[[T], Awaitable[None]], item: T) -> None:
        try:
            await handle(item)
        except db.Conflict as exc:
            # Another holder has the lease now (ours expired): its result counts, ours does not.
            self.metrics.lease_conflicts.inc()
            _log.warning("result refused: %s", exc)
        except Exception:
            # Left to the lease: once it expires the work is claimable again.
            _log.exception("work item failed; its lease will expire")

    async def _record(self, call: db.Call[T]) -> T:
        async with self.pool.connection() as conn:
            return await db.run(conn, call)

    # ------------------------------------------------------------------ charges

    async def _attempt(self, a: db.ClaimedAttempt) -> None:
        log = {"attempt_id": str(a.attempt_id), "order_id": a.order_id, "mode": str(a.mode)}
        if a.mode is db.AttemptMode.LOOKUP:
            await self._lookup(a)
            return
        try:
            billing_key = self.keyring.open(
                a.billing_key_ciphertext, a.billing_key_key_id, a.customer_key
            )
        except EnvelopeError as exc:
            await self._record(
                db.service_record_charge_failure(
                    a.attempt_id, a.lease_token, "KEY_UNREADABLE", str(exc), FailureClass.BUG
                )
            )
            return
        try:
            payment = await self.throttle.call(
                Operation.CHARGE,
                lambda: self.toss.charge(
                    billing_key,
                    a.customer_key,
                    a.amount,
                    a.order_id,
                    a.order_name,
                    customer_email=a.customer_email,
                    customer_name=a.customer_name,
                    idempotency_key=str(a.idempotency_key),
                ),
            )
        except TossReplyMismatch as exc:
            # Not an answer to this request (a bug or a key collision): never a success. The
            # order is looked up, which finds what really happened to it.
            self.metrics.charges.labels("reply_mismatch", "").inc()
            _log.error("charge reply does not match the request: %s", exc, extra=log)
            await self._record(
                db.service_record_charge_unknown(a.attempt_id, a.lease_token, str(exc)[:510])
            )
            return
        except TossOutcomeUnknown as exc:
            self.metrics.charges.labels("unknown", "").inc()
            _log.warning("charge outcome unknown", extra=log)
            await self._record(
                db.service_record_charge_unknown(a.attempt_id, a.lease_token, str(exc)[:510])
            )
            return
        except TossError as exc:
            self.metrics.charges.labels(str(exc.error_class), exc.code).inc()
            _log.info("charge failed: %s (%s)", exc.code, exc.error_class, extra=log)
            await self._record(
                db.service_record_charge_failure(
                    a.attempt_id, a.lease_token, exc.code, exc.message[:510], exc.error_class
                )
            )
            return
        self.metrics.charges.labels("approved", "").inc()
        _log.info("charge approved", extra=log)
        await self._record(
            db.service_record_charge_success(a.attempt_id, a.lease_token, payment.raw)
        )

    async def _lookup(self, a: db.ClaimedAttempt) -> None:
        try:
            payment = await self.throttle.call(
                Operation.GET_PAYMENT_BY_ORDER, lambda: self.toss.get_payment_by_order(a.order_id)
            )
        except TossException as exc:
            # The lookup itself failed: still unknown, looked up again after a backoff.
            await self._record(
                db.service_record_charge_unknown(a.attempt_id, a.lease_token, str(exc)[:510])
            )
            return
        if payment is None:
            await self._record(db.service_record_lookup_not_found(a.attempt_id, a.lease_token))
        elif payment.status in _APPROVED and payment.approved_at is not None:
            await self._record(
                db.service_record_charge_success(a.attempt_id, a.lease_token, payment.raw)
            )
        elif payment.status in _FAILED:
            # Toss kept the charge as a failed payment (undocumented, but possible): the attempt
            # failed with that code, classified like the answer the charge itself got.
            failure = payment.failure or Failure("UNKNOWN_PAYMENT_ERROR", "결제에 실패했어요.")
            await self._record(
                db.service_record_charge_failure(
                    a.attempt_id,
                    a.lease_token,
                    failure.code,
                    failure.message[:510],
                    classify(failure.code),
                )
            )
        else:
            await self._record(
                db.service_record_charge_unknown(
                    a.attempt_id, a.lease_token, f"payment is {payment.status}"
                )
            )

    # ------------------------------------------------------------------ refunds

    async def _refund(self, r: db.ClaimedRefund) -> None:
        try:
            payment = await self.throttle.call(
                Operation.CANCEL,
                lambda: self.toss.cancel(
                    r.payment_key,
                    r.cancel_reason,
                    r.cancel_amount,
                    idempotency_key=str(r.idempotency_key),
                ),
            )
        except TossOutcomeUnknown as exc:
            # Not known to be processed: the same cancel under the same key settles it.
            await self._record(
                db.service_record_refund_result(
                    r.refund_id,
                    r.lease_token,
                    error_code="NO_RESPONSE",
                    error_message=str(exc)[:510],
                    classification=FailureClass.UNPROCESSED,
                )
            )
            return
        except TossError as exc:
            await self._record(
                db.service_record_refund_result(
                    r.refund_id,
                    r.lease_token,
                    error_code=exc.code,
                    error_message=exc.message[:510],
                    classification=exc.error_class,
                )
            )
            return
        await self._record(
            db.service_record_refund_result(r.refund_id, r.lease_token, payment=payment.raw)
        )

    # ------------------------------------------------------------------ webhooks

    async def _webhook(self, w: db.ClaimedWebhook) -> None:
        try:
            outcome = await self._apply_webhook(w)
        except TossException as exc:
            await self._record(
                db.service_record_webhook_result(
                    w.webhook_event_id, w.lease_token, db.WebhookOutcome.RETRY, str(exc)[:2000]
                )
            )
            return
        await self._record(
            db.service_record_webhook_result(w.webhook_event_id, w.lease_token, outcome)
        )

    async def _apply_webhook(self, w: db.ClaimedWebhook) -> db.WebhookOutcome:
        data = w.payload.get("data")
        data = data if isinstance(data, Mapping) else {}
        if w.event_type == "PAYMENT_STATUS_CHANGED":
            key = data.get("paymentKey")
            if not isinstance(key, str):
                return db.WebhookOutcome.IGNORED
            # Never applied as sent: the payment as Toss holds it, fetched with our key.
            payment = await self.throttle.call(
                Operation.GET_PAYMENT, lambda: self.toss.get_payment(key)
            )
            await self._apply_snapshot(payment)
            return db.WebhookOutcome.PROCESSED
        if w.event_type == "DEPOSIT_CALLBACK":
            order = w.payload.get("orderId")
            if not isinstance(order, str):
                return db.WebhookOutcome.IGNORED
            found = await self.throttle.call(
                Operation.GET_PAYMENT_BY_ORDER, lambda: self.toss.get_payment_by_order(order)
            )
            if found is None:
                return db.WebhookOutcome.IGNORED
            await self._apply_snapshot(found)
            return db.WebhookOutcome.PROCESSED
        if w.event_type == "BILLING_DELETED":
            sha = data.get("billingKeySha256")
            if not isinstance(sha, str):
                return db.WebhookOutcome.IGNORED
            reason = data.get("reason")
            await self._record(
                db.service_mark_payment_method_deleted(
                    sha, reason[:200] if isinstance(reason, str) else None
                )
            )
            return db.WebhookOutcome.PROCESSED
        return db.WebhookOutcome.IGNORED

    async def _apply_snapshot(self, payment: Payment) -> None:
        await self._record(db.service_apply_payment_snapshot(payment.raw))

    # ------------------------------------------------------------------ billing keys

    async def _key_deletion(self, k: db.ClaimedKeyDeletion) -> None:
        try:
            billing_key = self.keyring.open(
                k.billing_key_ciphertext, k.billing_key_key_id, k.customer_key
            )
        except EnvelopeError as exc:
            await self._record(
                db.service_record_key_deleted(
                    k.key_deletion_id, k.lease_token, "KEY_UNREADABLE", str(exc)[:510]
                )
            )
            return
        try:
            await self.throttle.call(
                Operation.DELETE_BILLING_KEY, lambda: self.toss.delete_billing_key(billing_key)
            )
        except TossError as exc:
            if exc.code not in _KEY_ALREADY_GONE:
                await self._record(
                    db.service_record_key_deleted(
                        k.key_deletion_id, k.lease_token, exc.code, exc.message[:510]
                    )
                )
                return
        except TossOutcomeUnknown as exc:
            await self._record(
                db.service_record_key_deleted(
                    k.key_deletion_id, k.lease_token, "NO_RESPONSE", str(exc)[:510]
                )
            )
            return
        await self._record(db.service_record_key_deleted(k.key_deletion_id, k.lease_token))

    # ------------------------------------------------------------------ reconciliation

    async def _reconciliations(self) -> int:
        s = self.settings
        async with self.pool.connection() as conn:
            runs = await db.run(conn, db.service_claim_reconciliations(s.worker_name))
        for run in runs:
            await self._guard(self._reconcile, run)
        return len(runs)

    async def _reconcile(self, run: db.ClaimedReconciliation) -> None:
        try:
            keys: list[str] = []
            async for t in self.toss.list_transactions(run.window_start, run.window_end):
                keys.append(t.payment_key)
            unknown = await self._record(db.service_unknown_payment_keys(keys))
            for key in unknown:
                # Fetched with our key and applied like a late approval (or kept unmatched).
                payment = await self.throttle.call(
                    Operation.GET_PAYMENT, functools.partial(self.toss.get_payment, key)
                )
                await self._apply_snapshot(payment)
        except TossException as exc:
            await self._record(
                db.service_record_reconciliation(
                    run.reconciliation_id,
                    run.lease_token,
                    error_code=getattr(exc, "code", "NO_RESPONSE"),
                    error_message=str(exc)[:510],
                )
            )
            return
        result = await self._record(
            db.service_record_reconciliation(run.reconciliation_id, run.lease_token, keys)
        )
        _log.info("reconciliation %s: %s", run.reconciliation_id, dict(result.detail))

    # ------------------------------------------------------------------ notifications

    async def _notification(self, n: db.ClaimedNotification) -> None:
        body = {
            "type": f"billing.{n.kind}",
            "timestamp": n.created_at.isoformat(),
            "data": {**n.payload, "userId": n.user_id, "notificationId": n.notification_id},
        }
        if self._signer is None or not self.settings.notify_url:
            _log.info("notification %s %s (no notify URL set)", n.notification_id, n.kind)
        else:
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str)
            # The id is stable across re-sends, so the receiver can drop duplicates.
            msg_id = f"msg_{n.notification_id}"
            now = datetime.now(UTC)
            headers = {
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": self._signer.sign(msg_id, now, payload),
                "content-type": "application/json",
            }
            response = await self.http.post(
                self.settings.notify_url, content=payload, headers=headers, timeout=10.0
            )
            if response.status_code >= 300:
                # Not delivered: the lease expires and the notification is claimed again.
                _log.warning("notification %s: HTTP %s", n.notification_id, response.status_code)
                return
        await self._record(
            db.service_record_notification_delivered(n.notification_id, n.lease_token)
        )
