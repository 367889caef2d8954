"""The service's SQL, and the only module that has any.

One typed function per ``billing.service_*`` function, named as in SQL, with the SQL's parameter
names and explicit casts. Each returns a ``Call``: the literal statement, its parameters and how
to read its rows, so the same call runs on an async connection (the service: ``run``) or a sync
one (operator tools and tests: ``run_sync``). Errors come back as the exceptions below, chosen by
SQLSTATE and constraint name, never by message text.

Fencing: every ``service_claim_*`` row carries a ``lease_token``; pass it back to the matching
``service_record_*``. A token that is no longer current is refused with ``Conflict`` (SB409) and
nothing changes, except for facts (an approval, a refund made, a key deleted, a notification
delivered), which are recorded from anyone.
"""

from __future__ import annotations

import select
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, LiteralString, TypeVar
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from service.crypto import SealedKey

T = TypeVar("T")
Row = dict[str, Any]
Json = Mapping[str, Any]

DEFAULT_LEASE = timedelta(minutes=2)


# --------------------------------------------------------------------------------------- enums
# The SQL enum labels are the names; tests pin each class to enum_range() of its type.


class AttemptStatus(StrEnum):
    """billing.attempt_status"""

    QUEUED = "queued"
    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    UNKNOWN = "unknown"
    FAILED = "failed"
    CANCELED = "canceled"
    DUPLICATE = "duplicate"


class AttemptMode(StrEnum):
    """billing.attempt_mode: what a claimed attempt asks the service to do."""

    CHARGE = "charge"
    LOOKUP = "lookup"


class WebhookOutcome(StrEnum):
    """The outcomes billing.service_record_webhook_result accepts."""

    PROCESSED = "processed"
    IGNORED = "ignored"
    RETRY = "retry"
    FAILED = "failed"


# -------------------------------------------------------------------------------------- errors


class BillingError(Exception):
    """A billing function refused the call; nothing was changed."""

    def __init__(self, message: str, sqlstate: str | None, constraint: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint = constraint


class InvalidInput(BillingError):
    """SB400, or a value the schema refuses (class 22, check violations)."""


class NotSignedIn(BillingError):
    """SB401"""


class Forbidden(BillingError):
    """SB403"""


class NotFound(BillingError):
    """SB404"""


class Conflict(BillingError):
    """SB409 (a stale lease, a state that does not allow it) or a unique constraint."""


class RuleRefused(BillingError):
    """SB422: valid input that the billing rules refuse."""


_BY_SQLSTATE: Mapping[str, type[BillingError]] = {
    "SB400": InvalidInput,
    "SB401": NotSignedIn,
    "SB403": Forbidden,
    "SB404": NotFound,
    "SB409": Conflict,
    "SB422": RuleRefused,
    "23505": Conflict,  # unique_violation: e.g. charge_attempts_one_in_flight_per_period_key
    "23514": InvalidInput,  # check_violation: e.g. payment_methods_billing_key_envelope_check
}


def translate(exc: psycopg.Error) -> BillingError | None:
    """The billing exception for a database error, or None when it is not a refusal of ours."""
    state = exc.sqlstate
    if state is None:
        return None
    kind = _BY_SQLSTATE.get(state)
    if kind is None and state.startswith("22"):
        kind = InvalidInput  # data exceptions: a malformed uuid, interval or JSON
    if kind is None:
        return None
    return kind(exc.diag.message_primary or str(exc), state, exc.diag.constraint_name)


# ------------------------------------------------------------------------------------ the call


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One SQL function call: its literal statement, parameters and how to read the rows."""

    name: str
    query: LiteralString
    params: Mapping[str, object]
    read: Callable[[list[Row]], T]


async def run(conn: psycopg.AsyncConnection[Any], call: Call[T]) -> T:
    """Runs a call on an async connection (in the caller's transaction, if any)."""
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(call.query, call.params)
            rows = await cur.fetchall()
    except psycopg.Error as exc:
        mapped = translate(exc)
        if mapped is None:
            raise
        raise mapped from exc
    return call.read(rows)


def run_sync(conn: psycopg.Connection[Any], call: Call[T]) -> T:
    """Runs a call on a sync connection (in the caller's transaction, if any)."""
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(call.query, call.params)
            rows = cur.fetchall()
    except psycopg.Error as exc:
        mapped = translate(exc)
        if mapped is None:
            raise
        raise mapped from exc
    return call.read(rows)


def _one(rows: list[Row]) -> Row:
    if len(rows) != 1:
        raise RuntimeError(f"expected one row, got {len(rows)}")
    return rows[0]


def _json(value: Json | None) -> Jsonb | None:
    return None if value is None else Jsonb(dict(value))


# ------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Recorded:
    """billing.recorded: what every service_record_* returns."""

    id: str
    status: str
    changed: bool
    detail: Json

    @classmethod
    def read(cls, rows: list[Row]) -> Recorded:
        r = _one(rows)
        return cls(id=r["id"], status=r["status"], changed=r["changed"], detail=r["detail"] or {})


@dataclass(frozen=True, slots=True)
class Registration:
    """billing.service_complete_registration's result."""

    registration_id: UUID
    subscription_id: UUID
    payment_method_id: UUID
    attempt_id: UUID | None
    replaced_payment_method_id: UUID | None
    replay: bool

    @classmethod
    def read(cls, rows: list[Row]) -> Registration:
        r = _one(rows)["result"]
        return cls(
            registration_id=UUID(r["registrationId"]),
            subscription_id=UUID(r["subscriptionId"]),
            payment_method_id=UUID(r["paymentMethodId"]),
            attempt_id=UUID(r["attemptId"]) if r.get("attemptId") else None,
            replaced_payment_method_id=(
                UUID(r["replacedPaymentMethodId"]) if r.get("replacedPaymentMethodId") else None
            ),
            replay=bool(r["replay"]),
        )


@dataclass(frozen=True, slots=True)
class FailedRegistration:
    registration_id: UUID
    status: str
    changed: bool

    @classmethod
    def read(cls, rows: list[Row]) -> FailedRegistration:
        r = _one(rows)["result"]
        return cls(UUID(r["registrationId"]), r["status"], bool(r["changed"]))


@dataclass(frozen=True, slots=True)
class ClaimedAttempt:
    attempt_id: UUID
    lease_token: UUID
    mode: AttemptMode
    order_id: str
    idempotency_key: UUID
    amount: int
    order_name: str
    customer_key: str
    billing_key_ciphertext: bytes
    billing_key_key_id: str
    customer_email: str | None
    customer_name: str | None
    subscription_id: UUID
    period_id: UUID
    attempt_number: int
    lease_expires_at: datetime

    @classmethod
    def read(cls, rows: list[Row]) -> list[ClaimedAttempt]:
        return [cls(**{**r, "mode": AttemptMode(r["mode"])}) for r in rows]


@dataclass(frozen=True, slots=True)
class ClaimedRefund:
    refund_id: UUID
    lease_token: UUID
    idempotency_key: UUID
    payment_key: str
    cancel_amount: int
    cancel_reason: str
    balance_amount: int
    lease_expires_at: datetime

    @classmethod
    def read(cls, rows: list[Row]) -> list[ClaimedRefund]:
        return [cls(**r) for r in rows]


@dataclass(frozen=True, slots=True)
class ClaimedWebhook:
    webhook_event_id: UUID
    lease_token: UUID
    transmission_id: str
    event_type: str
    payload: Json
    headers: Json
    attempts: int
    lease_expires_at: datetime

    @classmethod
    def read(cls, rows: list[Row]) -> list[ClaimedWebhook]:
        return [cls(**r) for r in rows]


@dataclass(frozen=True, slots=True)
class ClaimedKeyDeletion:
    key_deletion_id: UUID
    lease_token: UUID
    payment_method_id: UUID
    customer_key: str
    billing_key_ciphertext: bytes
    billing_key_key_id: str
    lease_expires_at: datetime

    @classmethod
    def read(cls, rows: list[Row]) -> list[ClaimedKeyDeletion]:
        return [cls(**r) for r in rows]


@dataclass(frozen=True, slots=True)
class ClaimedNotification:
    notification_id: int
    lease_token: UUID
    kind: str
    user_id: str | None
    customer_email: str | None
    customer_name: str | None
    subscription_id: UUID | None
    payload: Json
    created_at: datetime
    lease_expires_at: datetime

    @classmethod
    def read(cls, rows: list[Row]) -> list[ClaimedNotification]:
        return [cls(**r) for r in rows]


@dataclass(frozen=True, slots=True)
class IngestedWebhook:
    webhook_event_id: UUID
    status: str
    resolved_event_type: str
    duplicate: bool

    @classmethod
    def read(cls, rows: list[Row]) -> IngestedWebhook:
        return cls(**_one(rows))


@dataclass(frozen=True, slots=True)
class SnapshotApplied:
    """billing.service_apply_payment_snapshot's result: what the payment matched and what
    followed (``detail`` holds the rest of the documented object)."""

    matched: str
    action: str | None
    attempt_id: UUID | None
    detail: Json

    @classmethod
    def read(cls, rows: list[Row]) -> SnapshotApplied:
        r = dict(_one(rows)["result"])
        attempt = r.pop("attemptId", None)
        return cls(
            matched=r.pop("matched"),
            action=r.pop("action", None),
            attempt_id=UUID(attempt) if attempt else None,
            detail=r,
        )


@dataclass(frozen=True, slots=True)
class PaymentMethodDeleted:
    found: bool
    changed: bool
    payment_method_id: UUID | None
    subscription_id: UUID | None

    @classmethod
    def read(cls, rows: list[Row]) -> PaymentMethodDeleted:
        r = _one(rows)["result"]
        pm, sub = r.get("paymentMethodId"), r.get("subscriptionId")
        return cls(
            bool(r["found"]),
            bool(r["changed"]),
            UUID(pm) if pm else None,
            UUID(sub) if sub else None,
        )


# ------------------------------------------------------------------------- card registration


def service_check_registration(customer_key: str) -> Call[str]:
    """'pending' or 'completed' (a retried redirect); NotFound or Conflict otherwise."""
    return Call(
        "service_check_registration",
        "select billing.service_check_registration(customer_key => %(customer_key)s::text)"
        " as result",
        {"customer_key": customer_key},
        lambda rows: str(_one(rows)["result"]),
    )


def service_complete_registration(
    customer_key: str, sealed: SealedKey, card: Json | None
) -> Call[Registration]:
    return Call(
        "service_complete_registration",
        "select billing.service_complete_registration("
        "customer_key => %(customer_key)s::text, "
        "billing_key_ciphertext => %(billing_key_ciphertext)s::bytea, "
        "billing_key_key_id => %(billing_key_key_id)s::text, "
        "billing_key_sha256 => %(billing_key_sha256)s::text, "
        "card => %(card)s::jsonb) as result",
        {
            "customer_key": customer_key,
            "billing_key_ciphertext": sealed.ciphertext,
            "billing_key_key_id": sealed.key_id,
            "billing_key_sha256": sealed.sha256,
            "card": _json(card),
        },
        Registration.read,
    )


def service_fail_registration(
    customer_key: str, code: str, message: str | None
) -> Call[FailedRegistration]:
    return Call(
        "service_fail_registration",
        "select billing.service_fail_registration(customer_key => %(customer_key)s::text, "
        "code => %(code)s::text, message => %(message)s::text) as result",
        {"customer_key": customer_key, "code": code, "message": message},
        FailedRegistration.read,
    )


# ----------------------------------------------------------------------------- charge attempts


def service_claim_attempts(
    worker: str, batch: int, lease: timedelta = DEFAULT_LEASE
) -> Call[list[ClaimedAttempt]]:
    return Call(
        "service_claim_attempts",
        "select * from billing.service_claim_attempts(worker => %(worker)s::text, "
        "batch => %(batch)s::integer, lease => %(lease)s::interval)",
        {"worker": worker, "batch": batch, "lease": lease},
        ClaimedAttempt.read,
    )


def service_record_charge_success(
    attempt_id: UUID, lease_token: UUID, payment: Json
) -> Call[Recorded]:
    return Call(
        "service_record_charge_success",
        "select * from billing.service_record_charge_success(attempt_id => %(attempt_id)s::uuid, "
        "lease_token => %(lease_token)s::uuid, payment => %(payment)s::jsonb)",
        {"attempt_id": attempt_id, "lease_token": lease_token, "payment": _json(payment)},
        Recorded.read,
    )


def service_record_charge_failure(
    attempt_id: UUID, lease_token: UUID, code: str, message: str | None, classification: str
) -> Call[Recorded]:
    """``classification`` is ``toss.classify``'s label (a billing.failure_class)."""
    return Call(
        "service_record_charge_failure",
        "select * from billing.service_record_charge_failure(attempt_id => %(attempt_id)s::uuid, "
        "lease_token => %(lease_token)s::uuid, code => %(code)s::text, "
        "message => %(message)s::text, classification => %(classification)s::text)",
        {
            "attempt_id": attempt_id,
            "lease_token": lease_token,
            "code": code,
            "message": message,
            "classification": str(classification),
        },
        Recorded.read,
    )


def service_record_charge_unknown(
    attempt_id: UUID, lease_token: UUID, detail: str | None
) -> Call[Recorded]:
    """No readable answer from the charge or from the lookup itself (timeout, transport)."""
    return Call(
        "service_record_charge_unknown",
        "select * from billing.service_record_charge_unknown(attempt_id => %(attempt_id)s::uuid, "
        "lease_token => %(lease_token)s::uuid, detail => %(detail)s::text)",
        {"attempt_id": attempt_id, "lease_token": lease_token, "detail": detail},
        Recorded.read,
    )


def service_record_lookup_not_found(attempt_id: UUID, lease_token: UUID) -> Call[Recorded]:
    return Call(
        "service_record_lookup_not_found",
        "select * from billing.service_record_lookup_not_found("
        "attempt_id => %(attempt_id)s::uuid, lease_token => %(lease_token)s::uuid)",
        {"attempt_id": attempt_id, "lease_token": lease_token},
        Recorded.read,
    )


def service_apply_payment_snapshot(payment: Json) -> Call[SnapshotApplied]:
    return Call(
        "service_apply_payment_snapshot",
        "select billing.service_apply_payment_snapshot(payment => %(payment)s::jsonb) as result",
        {"payment": _json(payment)},
        SnapshotApplied.read,
    )


# ------------------------------------------------------------------------------------- refunds


def service_claim_refunds(
    worker: str, batch: int, lease: timedelta = DEFAULT_LEASE
) -> Call[list[ClaimedRefund]]:
    return Call(
        "service_claim_refunds",
        "select * from billing.service_claim_refunds(worker => %(worker)s::text, "
        "batch => %(batch)s::integer, lease => %(lease)s::interval)",
        {"worker": worker, "batch": batch, "lease": lease},
        ClaimedRefund.read,
    )


def service_record_refund_result(
    refund_id: UUID,
    lease_token: UUID,
    payment: Json | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    classification: str | None = None,
) -> Call[Recorded]:
    """Either the Payment the cancel returned, or an error with ``toss.classify``'s label."""
    return Call(
        "service_record_refund_result",
        "select * from billing.service_record_refund_result(refund_id => %(refund_id)s::uuid, "
        "lease_token => %(lease_token)s::uuid, payment => %(payment)s::jsonb, "
        "error_code => %(error_code)s::text, error_message => %(error_message)s::text, "
        "classification => %(classification)s::text)",
        {
            "refund_id": refund_id,
            "lease_token": lease_token,
            "payment": _json(payment),
            "error_code": error_code,
            "error_message": error_message,
            "classification": None if classification is None else str(classification),
        },
        Recorded.read,
    )


# ------------------------------------------------------------------------------------ webhooks


def service_ingest_webhook(
    transmission_id: str,
    event_type: str | None,
    payload: Json,
    headers: Mapping[str, str] | None = None,
) -> Call[IngestedWebhook]:
    return Call(
        "service_ingest_webhook",
        "select * from billing.service_ingest_webhook("
        "transmission_id => %(transmission_id)s::text, event_type => %(event_type)s::text, "
        "payload => %(payload)s::jsonb, headers => %(headers)s::jsonb)",
        {
            "transmission_id": transmission_id,
            "event_type": event_type,
            "payload": _json(payload),
            "headers": _json(headers or {}),
        },
        IngestedWebhook.read,
    )


def service_claim_webhooks(
    worker: str, batch: int, lease: timedelta = DEFAULT_LEASE
) -> Call[list[ClaimedWebhook]]:
    return Call(
        "service_claim_webhooks",
        "select * from billing.service_claim_webhooks(worker => %(worker)s::text, "
        "batch => %(batch)s::integer, lease => %(lease)s::interval)",
        {"worker": worker, "batch": batch, "lease": lease},
        ClaimedWebhook.read,
    )


def service_record_webhook_result(
    webhook_event_id: UUID, lease_token: UUID, outcome: WebhookOutcome, error: str | None = None
) -> Call[Recorded]:
    return Call(
        "service_record_webhook_result",
        "select * from billing.service_record_webhook_result("
        "webhook_event_id => %(webhook_event_id)s::uuid, lease_token => %(lease_token)s::uuid, "
        "outcome => %(outcome)s::text, error => %(error)s::text)",
        {
            "webhook_event_id": webhook_event_id,
            "lease_token": lease_token,
            "outcome": str(outcome),
            "error": error,
        },
        Recorded.read,
    )


def service_mark_payment_method_deleted(
    billing_key_sha256: str, reason: str | None
) -> Call[PaymentMethodDeleted]:
    return Call(
        "service_mark_payment_method_deleted",
        "select billing.service_mark_payment_method_deleted("
        "billing_key_sha256 => %(billing_key_sha256)s::text, reason => %(reason)s::text) as result",
        {"billing_key_sha256": billing_key_sha256, "reason": reason},
        PaymentMethodDeleted.read,
    )


# ------------------------------------------------------------------------------ key deletions


def service_claim_key_deletions(
    worker: str, batch: int, lease: timedelta = DEFAULT_LEASE
) -> Call[list[ClaimedKeyDeletion]]:
    return Call(
        "service_claim_key_deletions",
        "select * from billing.service_claim_key_deletions(worker => %(worker)s::text, "
        "batch => %(batch)s::integer, lease => %(lease)s::interval)",
        {"worker": worker, "batch": batch, "lease": lease},
        ClaimedKeyDeletion.read,
    )


def service_record_key_deleted(
    key_deletion_id: UUID,
    lease_token: UUID,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Call[Recorded]:
    return Call(
        "service_record_key_deleted",
        "select * from billing.service_record_key_deleted("
        "key_deletion_id => %(key_deletion_id)s::uuid, lease_token => %(lease_token)s::uuid, "
        "error_code => %(error_code)s::text, error_message => %(error_message)s::text)",
        {
            "key_deletion_id": key_deletion_id,
            "lease_token": lease_token,
            "error_code": error_code,
            "error_message": error_message,
        },
        Recorded.read,
    )


# ------------------------------------------------------------------------------- notifications


def service_claim_notifications(
    worker: str, batch: int, lease: timedelta = DEFAULT_LEASE
) -> Call[list[ClaimedNotification]]:
    return Call(
        "service_claim_notifications",
        "select * from billing.service_claim_notifications(worker => %(worker)s::text, "
        "batch => %(batch)s::integer, lease => %(lease)s::interval)",
        {"worker": worker, "batch": batch, "lease": lease},
        ClaimedNotification.read,
    )


def service_record_notification_delivered(
    notification_id: int, lease_token: UUID
) -> Call[Recorded]:
    return Call(
        "service_record_notification_delivered",
        "select * from billing.service_record_notification_delivered("
        "notification_id => %(notification_id)s::bigint, lease_token => %(lease_token)s::uuid)",
        {"notification_id": notification_id, "lease_token": lease_token},
        Recorded.read,
    )


# ------------------------------------------------------------------------------ reconciliation


@dataclass(frozen=True, slots=True)
class ClaimedReconciliation:
    reconciliation_id: UUID
    lease_token: UUID
    window_start: datetime
    window_end: datetime
    lease_expires_at: datetime

    @classmethod
    def read(cls, rows: list[Row]) -> list[ClaimedReconciliation]:
        return [cls(**r) for r in rows]


def service_claim_reconciliations(
    worker: str, batch: int = 1, lease: timedelta = timedelta(minutes=10)
) -> Call[list[ClaimedReconciliation]]:
    return Call(
        "service_claim_reconciliations",
        "select * from billing.service_claim_reconciliations(worker => %(worker)s::text, "
        "batch => %(batch)s::integer, lease => %(lease)s::interval)",
        {"worker": worker, "batch": batch, "lease": lease},
        ClaimedReconciliation.read,
    )


def service_unknown_payment_keys(payment_keys: list[str]) -> Call[list[str]]:
    return Call(
        "service_unknown_payment_keys",
        "select payment_key from billing.service_unknown_payment_keys("
        "payment_keys => %(payment_keys)s::text[])",
        {"payment_keys": payment_keys},
        lambda rows: [r["payment_key"] for r in rows],
    )


def service_record_reconciliation(
    reconciliation_id: UUID,
    lease_token: UUID,
    payment_keys: list[str] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Call[Recorded]:
    return Call(
        "service_record_reconciliation",
        "select * from billing.service_record_reconciliation("
        "reconciliation_id => %(reconciliation_id)s::uuid, lease_token => %(lease_token)s::uuid, "
        "payment_keys => %(payment_keys)s::text[], error_code => %(error_code)s::text, "
        "error_message => %(error_message)s::text)",
        {
            "reconciliation_id": reconciliation_id,
            "lease_token": lease_token,
            "payment_keys": payment_keys,
            "error_code": error_code,
            "error_message": error_message,
        },
        Recorded.read,
    )


# ------------------------------------------------------------------------------- key rotation


@dataclass(frozen=True, slots=True)
class SealedMethod:
    payment_method_id: UUID
    customer_key: str
    billing_key_ciphertext: bytes
    billing_key_key_id: str

    @classmethod
    def read(cls, rows: list[Row]) -> list[SealedMethod]:
        return [cls(**r) for r in rows]


def service_keys_to_rotate(active_key_id: str, batch: int = 100) -> Call[list[SealedMethod]]:
    return Call(
        "service_keys_to_rotate",
        "select * from billing.service_keys_to_rotate(active_key_id => %(active_key_id)s::text, "
        "batch => %(batch)s::integer)",
        {"active_key_id": active_key_id, "batch": batch},
        SealedMethod.read,
    )


def service_record_key_rotated(
    payment_method_id: UUID, old_key_id: str, sealed: SealedKey
) -> Call[Recorded]:
    return Call(
        "service_record_key_rotated",
        "select * from billing.service_record_key_rotated("
        "payment_method_id => %(payment_method_id)s::uuid, old_key_id => %(old_key_id)s::text, "
        "billing_key_ciphertext => %(billing_key_ciphertext)s::bytea, "
        "billing_key_key_id => %(billing_key_key_id)s::text)",
        {
            "payment_method_id": payment_method_id,
            "old_key_id": old_key_id,
            "billing_key_ciphertext": sealed.ciphertext,
            "billing_key_key_id": sealed.key_id,
        },
        Recorded.read,
    )


# ------------------------------------------------------------------------------------ metrics


def service_queue_depths() -> Call[dict[str, dict[str, int]]]:
    """Per queue: rows ready to claim now, under a lease, and leased past their expiry."""
    return Call(
        "service_queue_depths",
        "select queue, ready, leased, expired from billing.service_queue_depths()",
        {},
        lambda rows: {
            r["queue"]: {"ready": r["ready"], "leased": r["leased"], "expired": r["expired"]}
            for r in rows
        },
    )


# ---------------------------------------------------------------------------------- operators


def ops_configure_doorbell(service_url: str, doorbell_token: str) -> Call[Json]:
    """Owner only: where billing.tick's doorbell rings (Vault secrets), safe to repeat."""
    return Call(
        "ops_configure_doorbell",
        "select billing.ops_configure_doorbell(service_url => %(service_url)s::text, "
        "doorbell_token => %(doorbell_token)s::text) as result",
        {"service_url": service_url, "doorbell_token": doorbell_token},
        lambda rows: dict(_one(rows)["result"]),
    )


def _rows(rows: list[Row]) -> list[Row]:
    return rows


def ops_status() -> Call[Json]:
    return Call(
        "ops_status", "select billing.ops_status() as result", {}, lambda r: _one(r)["result"]
    )


def ops_history(subscriber: str) -> Call[list[Row]]:
    return Call(
        "ops_history",
        "select * from billing.ops_history(subscriber => %(subscriber)s::text)",
        {"subscriber": subscriber},
        _rows,
    )


def ops_alerts(since: datetime | None = None, max_rows: int = 100) -> Call[list[Row]]:
    return Call(
        "ops_alerts",
        "select * from billing.ops_alerts(since => %(since)s::timestamptz, "
        "max_rows => %(max_rows)s::integer)",
        {"since": since, "max_rows": max_rows},
        _rows,
    )


def request_refund(payment_id: UUID, amount: int | None, reason: str) -> Call[UUID]:
    return Call(
        "request_refund",
        "select billing.request_refund(payment_id => %(payment_id)s::uuid, "
        "amount => %(amount)s::bigint, reason => %(reason)s::text) as result",
        {"payment_id": payment_id, "amount": amount, "reason": reason},
        lambda r: UUID(str(_one(r)["result"])),
    )


def cancel_subscription_now(subscription_id: UUID, prorate_refund: bool, reason: str) -> Call[Json]:
    return Call(
        "cancel_subscription_now",
        "select billing.cancel_subscription_now(subscription_id => %(subscription_id)s::uuid, "
        "prorate_refund => %(prorate_refund)s::boolean, reason => %(reason)s::text) as result",
        {"subscription_id": subscription_id, "prorate_refund": prorate_refund, "reason": reason},
        lambda r: _one(r)["result"],
    )


def retry_subscription_charge(subscription_id: UUID, reason: str) -> Call[UUID]:
    return Call(
        "retry_subscription_charge",
        "select billing.retry_subscription_charge(subscription_id => %(subscription_id)s::uuid, "
        "reason => %(reason)s::text) as result",
        {"subscription_id": subscription_id, "reason": reason},
        lambda r: UUID(str(_one(r)["result"])),
    )


def request_reconciliation(window_start: datetime, window_end: datetime) -> Call[UUID]:
    return Call(
        "request_reconciliation",
        "select billing.request_reconciliation(window_start => %(window_start)s::timestamptz, "
        "window_end => %(window_end)s::timestamptz) as result",
        {"window_start": window_start, "window_end": window_end},
        lambda r: UUID(str(_one(r)["result"])),
    )


def schedule_reconciliation() -> Call[UUID]:
    """The previous Asia/Seoul day, by the database's clock, rung to the service at once."""
    return Call(
        "schedule_reconciliation",
        "select billing.schedule_reconciliation() as result",
        {},
        lambda r: UUID(str(_one(r)["result"])),
    )


def ops_reconciliation_report(days: int = 30) -> Call[list[Row]]:
    return Call(
        "ops_reconciliation_report",
        "select * from billing.ops_reconciliation_report(days => %(days)s::integer)",
        {"days": days},
        _rows,
    )


# ------------------------------------------------------------------------------ chaos checks


def lose_queued_doorbells() -> Call[int]:
    """Owner, local runtime only: drops the doorbells still queued in ``net`` (what a pg_net
    crash does to its unlogged queue); in the transaction of a tick, that tick's ring is lost."""
    return Call(
        "lose_queued_doorbells",
        "with lost as (delete from net.http_request_queue q"
        " where q.url like '%%/internal/doorbell' returning 1)"
        " select count(*)::integer as result from lost",
        {},
        lambda rows: int(_one(rows)["result"]),
    )


# Each column counts rows that break a rule once every queue is drained; all must be 0.
_CONSISTENCY = """
  select
    (select count(*) from billing.charge_attempts where status = 'claimed')
    + (select count(*) from billing.refunds where status = 'claimed')
    + (select count(*) from billing.webhook_events where status = 'processing')
    + (select count(*) from billing.key_deletions where status = 'claimed')
    + (select count(*) from billing.reconciliation_runs where status = 'claimed')
      as leases_left,
    (select count(*) from billing.refunds where status in ('requested', 'claimed'))
      as refunds_open,
    (select count(*) from billing.reconciliation_runs where status <> 'done')
      as reconciliations_not_done,
    (select count(*) from billing.billing_periods bp
      where bp.status = 'paid' and not exists (
        select 1 from billing.credit_grants g
         where g.period_id = bp.id and g.payment_id = bp.payment_id))
      as paid_periods_without_credits,
    (select count(*) from billing.credit_grants g
       join billing.billing_periods bp on bp.id = g.period_id
      where bp.status <> 'paid' or bp.payment_id is distinct from g.payment_id)
      as credits_without_a_paid_period,
    (select count(*) from billing.credit_grants g
       join billing.payments p on p.id = g.payment_id
      where p.balance_amount = 0 and (g.status = 'active' or g.remaining > 0))
      as credits_kept_after_full_refund,
    (select count(*) from billing.credit_grants g
       join billing.payments p on p.id = g.payment_id
      where p.balance_amount > 0 and g.status = 'revoked')
      as credits_revoked_without_full_refund,
    (select count(*) from billing.credit_grants g
      where g.remaining <> (select coalesce(sum(e.amount), 0) from billing.credit_entries e
                             where e.grant_id = g.id))
      as credit_balances_off,
    (select count(*) from billing.credit_grants g
      where g.status = 'active' and g.expires_at <= billing.now())
      as credits_past_expiry
"""


def consistency_violations() -> Call[dict[str, int]]:
    """Owner: the ledger's own consistency after every queue is drained (leases, refunds,
    reconciliation, credits against paid periods and refunds); each count must be 0."""
    return Call(
        "consistency_violations",
        _CONSISTENCY,
        {},
        lambda rows: {k: int(v) for k, v in _one(rows).items()},
    )


def run_totals() -> Call[dict[str, int]]:
    """Owner: how much a run left behind: customers, attempts, refunds Toss made, webhooks."""
    return Call(
        "run_totals",
        "select (select count(*) from billing.customers)::integer as customers,"
        " (select count(*) from billing.charge_attempts)::integer as attempts,"
        " (select count(*) from billing.refunds where status = 'succeeded')::integer"
        " as refunds_succeeded,"
        " (select count(*) from billing.webhook_events)::integer as webhooks_received",
        {},
        lambda rows: {k: int(v) for k, v in _one(rows).items()},
    )


# ------------------------------------------------------------------------------- connections


def set_role(role: str) -> Call[None]:
    """Acts as the service's role for the rest of the session (a login that is a member)."""
    return Call(
        "set_role",
        "select pg_catalog.set_config('role', %(role)s::text, false)",
        {"role": role},
        lambda rows: None,
    )


async def configure_session(conn: psycopg.AsyncConnection[Any], role: str) -> None:
    """Every pooled connection acts as the service's role."""
    await run(conn, set_role(role))


def _server_spoke(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle pooled connection has something to read, or is known broken. The server
    speaks on an idle connection only to end it (a restart, a terminated backend, a timeout), so
    a connection with nothing to read is handed out without a round trip of its own (a tenth of
    the service's CPU per charge when every checkout sent one)."""
    if conn.closed or conn.pgconn.status != psycopg.pq.ConnStatus.OK:
        return True
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    return bool(readable)


def connection_pool(
    conninfo: str, role: str, max_size: int, timeout: float = 30.0
) -> AsyncConnectionPool[Any]:
    """The service's connections (opened by the caller): each acts as ``role``, and a connection
    the database dropped is replaced before it is handed out, not found halfway through a
    registration or a result. A caller waits up to ``timeout`` seconds for one, then gets
    PoolTimeout."""

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await configure_session(conn, role)

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        if not _server_spoke(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            # A restart or failover drops every pooled connection at once. Left to itself the pool
            # finds them one by one, backing off 1, 2, 4, 8, 16 s between them, and a caller gives
            # up before it reaches a live one; one sweep replaces them all together.
            await pool.check()
            raise

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        timeout=timeout,
        kwargs={"autocommit": True},
        configure=configure,
        check=check,
        open=False,
    )
    return pool


async def ping(conn: psycopg.AsyncConnection[Any]) -> bool:
    """True when the database answers and the session may call the service functions."""
    cur = await conn.execute(
        "select pg_catalog.has_function_privilege("
        "'billing.service_claim_attempts(text, integer, interval)', 'execute')"
    )
    row = await cur.fetchone()
    return bool(row and row[0])
