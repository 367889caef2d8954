"""The sandbox's merchant state and the business rules of billing, charging and cancelling.

Requests arrive here already validated for shape (see ``api``); these methods apply Toss's
business rules and raise :class:`ApiError` with Toss's codes. All state sits behind one lock so
the store can be used from the server's event loop and from a test thread at once.
"""

from __future__ import annotations

import base64
import secrets
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from service.sandbox.cards import Card
from service.sandbox.clock import Clock, toss_time
from service.sandbox.errors import ApiError

API_VERSION = "2022-11-16"
_ISSUER_NAMES = {"11": "국민", "21": "하나", "31": "BC", "41": "신한", "61": "현대", "71": "롯데"}
_ALNUM = string.ascii_letters + string.digits
_LOWER = string.ascii_lowercase + string.digits
_FINAL = ("DONE", "CANCELED", "PARTIAL_CANCELED")
_API = "https://api.tosspayments.com"

Json = dict[str, object]
EventSink = Callable[[str, Json], None]


def _random(alphabet: str, size: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(size))


def new_id(prefix: str) -> str:
    """Ids shaped like Toss's newer ones, e.g. ``txrd_a01…`` and ``whtrans_a01…``."""
    return f"{prefix}_a01{_random(_LOWER, 24)}"


def split_vat(amount: int, tax_free: int) -> tuple[int, int]:
    """(suppliedAmount, vat) with vat = round((amount - taxFree) / 11).

    (amount - taxFree) / 11 is never exactly .5, so Python's half-even rounding is the same
    as half-up here.
    """
    vat = round((amount - tax_free) / 11)
    return amount - tax_free - vat, vat


@dataclass(slots=True)
class _AuthKey:
    customer_key: str
    card: Card
    used: bool = False


@dataclass(slots=True)
class _BillingKey:
    billing_key: str
    customer_key: str
    card: Card
    authenticated_at: datetime
    deleted: bool = False


@dataclass(slots=True)
class _Payment:
    payment_key: str
    order_id: str
    order_name: str
    customer_key: str
    billing_key: str
    card: Card
    total: int
    tax_free: int
    tax_exemption: int
    requested_at: datetime
    approved_at: datetime | None
    status: str
    secret: str
    approve_no: str
    last_transaction_key: str | None
    balance: int = 0
    cancels: list[Json] = field(default_factory=list)
    failure: Json | None = None


@dataclass(frozen=True, slots=True)
class _Transaction:
    kind: Literal["approval", "cancel"]
    transaction_key: str
    payment_key: str
    at: datetime
    amount: int
    status: str


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    customer_key: str
    amount: int
    order_id: str
    order_name: str
    tax_free_amount: int = 0
    tax_exemption_amount: int = 0


class Store:
    def __init__(
        self,
        clock: Clock,
        emit: EventSink,
        *,
        m_id: str = "tvivarepublica",
        second_delete: Literal["error", "ok"] = "error",
        record_failed_charges: bool = False,
        cancel_webhooks: Literal["status_change", "every_cancel", "none"] = "status_change",
    ) -> None:
        self._clock = clock
        self._emit = emit
        self._m_id = m_id
        self._cancel_webhooks = cancel_webhooks
        self._second_delete = second_delete
        self._record_failed = record_failed_charges
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._auth_keys: dict[str, _AuthKey] = {}
            self._billing_keys: dict[str, _BillingKey] = {}
            self._payments: dict[str, _Payment] = {}
            self._by_order: dict[str, str] = {}
            self._transactions: list[_Transaction] = []
            self._approvals_by_card: dict[str, int] = {}

    # ---- billing keys

    def mint_auth_key(self, customer_key: str, card: Card) -> str:
        """A one-time authKey, as the SDK window hands to successUrl."""
        with self._lock:
            auth_key = f"bln_{_random(_ALNUM, 24)}"
            self._auth_keys[auth_key] = _AuthKey(customer_key, card)
            return auth_key

    def issue_from_auth_key(self, auth_key: str, customer_key: str) -> Json:
        with self._lock:
            record = self._auth_keys.get(auth_key)
            if record is None or record.used:
                raise ApiError("INVALID_BILLING_AUTH")
            if record.customer_key != customer_key:
                # Which code Toss uses here is undocumented; the mismatch is the caller's bug.
                raise ApiError("NOT_MATCHES_CUSTOMER_KEY")
            record.used = True
            return self._new_billing_key(customer_key, record.card)

    def issue_from_card(self, customer_key: str, card: Card) -> Json:
        with self._lock:
            return self._new_billing_key(customer_key, card)

    def _new_billing_key(self, customer_key: str, card: Card) -> Json:
        billing_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")
        record = _BillingKey(billing_key, customer_key, card, self._clock.now())
        self._billing_keys[billing_key] = record
        return {
            "mId": self._m_id,
            "customerKey": customer_key,
            "authenticatedAt": toss_time(record.authenticated_at),
            "method": "카드",
            "billingKey": billing_key,
            "card": {
                "issuerCode": card.issuer_code,
                "acquirerCode": card.issuer_code,
                "number": card.masked,
                "cardType": card.card_type,
                "ownerType": card.owner_type,
            },
            "transfers": None,
            # Still present in API version 2022-11-16 (removed from 2024-06-01).
            "cardCompany": _ISSUER_NAMES.get(card.issuer_code, "국민"),
            "cardNumber": card.masked,
        }

    def delete_billing_key(self, billing_key: str) -> None:
        with self._lock:
            record = self._billing_keys.get(billing_key)
            if record is None:
                raise ApiError("NOT_FOUND_BILLING")
            if record.deleted:
                # Undocumented. Default "error" answers ALREADY_REMOVED_BILLING_KEY so callers
                # must treat "already gone" as done; "ok" answers 200 again, with no webhook.
                if self._second_delete == "error":
                    raise ApiError("ALREADY_REMOVED_BILLING_KEY")
                return
            record.deleted = True
            self._emit("BILLING_DELETED", {"billingKey": billing_key, "reason": "삭제 API 요청"})

    # ---- charge

    def charge(self, billing_key: str, request: ChargeRequest) -> Json:
        with self._lock:
            record = self._billing_keys.get(billing_key)
            if record is None:
                # Toss documents both 404 NOT_FOUND_BILLING and 400 INVALID_BILL_KEY_REQUEST
                # for this; both mean "register the card again".
                raise ApiError("NOT_FOUND_BILLING")
            if record.deleted:
                raise ApiError("ALREADY_REMOVED_BILLING_KEY")
            if record.customer_key != request.customer_key:
                raise ApiError("NOT_MATCHES_CUSTOMER_KEY")
            previous = self._payment_for_order(request.order_id)
            # Only approved (or later cancelled) orders block the orderId; whether a failed
            # orderId may be reused is undocumented and Toss's wording suggests it may.
            if previous is not None and previous.status in _FINAL:
                raise ApiError("DUPLICATED_ORDER_ID")
            now = self._clock.now()
            payment = _Payment(
                payment_key=self._new_payment_key(now),
                order_id=request.order_id,
                order_name=request.order_name,
                customer_key=request.customer_key,
                billing_key=billing_key,
                card=record.card,
                total=request.amount,
                tax_free=request.tax_free_amount,
                tax_exemption=request.tax_exemption_amount,
                requested_at=now,
                approved_at=None,
                status="ABORTED",
                secret=f"ps_{_random(_ALNUM, 20)}",
                approve_no="",
                last_transaction_key=None,
            )
            failure = record.card.charge_failure(self._approvals_by_card.get(record.card.number, 0))
            if failure is not None:
                error = ApiError(failure)
                if self._record_failed:
                    payment.failure = {"code": error.code, "message": error.message}
                    self._store_payment(payment)
                raise error
            payment.status = "DONE"
            payment.approved_at = now
            payment.balance = request.amount
            payment.approve_no = _random(string.digits, 8)
            payment.last_transaction_key = self._record_transaction(
                "approval", payment, request.amount
            )
            self._approvals_by_card[record.card.number] = (
                self._approvals_by_card.get(record.card.number, 0) + 1
            )
            self._store_payment(payment)
            # Billing approvals send no webhook: Toss approves them in the same call.
            return self._payment_json(payment)

    def _new_payment_key(self, now: datetime) -> str:
        while True:
            key = f"{self._m_id[:5]}{now.strftime('%Y%m%d%H%M%S')}{_random(_ALNUM, 5)}"
            if key not in self._payments:
                return key

    def _store_payment(self, payment: _Payment) -> None:
        self._payments[payment.payment_key] = payment
        self._by_order[payment.order_id] = payment.payment_key

    def _payment_for_order(self, order_id: str) -> _Payment | None:
        payment_key = self._by_order.get(order_id)
        return self._payments[payment_key] if payment_key else None

    def _record_transaction(
        self, kind: Literal["approval", "cancel"], payment: _Payment, amount: int
    ) -> str:
        key = new_id("txrd")
        self._transactions.append(
            _Transaction(kind, key, payment.payment_key, self._clock.now(), amount, payment.status)
        )
        return key

    # ---- cancel

    def cancel(
        self,
        payment_key: str,
        reason: str,
        amount: int | None,
        refundable_amount: int | None,
        tax_free_amount: int,
    ) -> Json:
        with self._lock:
            payment = self._payments.get(payment_key)
            if payment is None:
                raise ApiError("NOT_FOUND_PAYMENT")
            if payment.status not in _FINAL:
                raise ApiError("NOT_CANCELABLE_PAYMENT")
            if payment.status == "CANCELED":
                raise ApiError("ALREADY_CANCELED_PAYMENT")
            if refundable_amount is not None and refundable_amount != payment.balance:
                raise ApiError("NOT_MATCHES_REFUNDABLE_AMOUNT")
            cancel_amount = payment.balance if amount is None else amount
            # After partial cancels have used the whole balance the status stays
            # PARTIAL_CANCELED and a further cancel is NOT_CANCELABLE_AMOUNT (measured).
            if payment.balance == 0 or cancel_amount > payment.balance:
                raise ApiError("NOT_CANCELABLE_AMOUNT")
            if cancel_amount < payment.balance and payment.tax_exemption > 0:
                raise ApiError("NOT_ALLOWED_PARTIAL_REFUND")
            full = cancel_amount == payment.balance
            if full:
                tax_free_amount = payment.tax_free  # the rest of everything goes
            # The tax-free part of a cancel is part of the cancelled amount, and what stays
            # tax-free cannot exceed what stays paid (the error code is undocumented).
            if tax_free_amount > cancel_amount or not (
                0 <= payment.tax_free - tax_free_amount <= payment.balance - cancel_amount
            ):
                raise ApiError("INVALID_REQUEST", "취소할 면세 금액이 올바르지 않습니다.")
            first_and_full = full and not payment.cancels
            exemption = payment.tax_exemption if full else 0
            status_before = payment.status
            payment.balance -= cancel_amount
            payment.tax_free -= tax_free_amount
            payment.tax_exemption -= exemption
            payment.status = "CANCELED" if first_and_full else "PARTIAL_CANCELED"
            transaction_key = self._record_transaction("cancel", payment, cancel_amount)
            payment.last_transaction_key = transaction_key
            payment.cancels.append(
                {
                    "transactionKey": transaction_key,
                    "cancelReason": reason,
                    "taxExemptionAmount": exemption,
                    "canceledAt": toss_time(self._clock.now()),
                    "cardDiscountAmount": 0,
                    "transferDiscountAmount": 0,
                    "easyPayDiscountAmount": 0,
                    "receiptKey": None,
                    "cancelAmount": cancel_amount,
                    "taxFreeAmount": tax_free_amount,
                    "refundableAmount": payment.balance,
                    "cancelStatus": "DONE",
                    "cancelRequestId": None,
                }
            )
            body = self._payment_json(payment)
            # Whether Toss sends this for billing cancels is undocumented. The default is the
            # documented minimum: only when the status changes (not for a further partial
            # cancel, PARTIAL_CANCELED -> PARTIAL_CANCELED).
            changed = payment.status != status_before
            if self._cancel_webhooks == "every_cancel" or (
                self._cancel_webhooks == "status_change" and changed
            ):
                self._emit("PAYMENT_STATUS_CHANGED", body)
            return body

    # ---- lookups

    def payment(self, payment_key: str) -> Json:
        with self._lock:
            payment = self._payments.get(payment_key)
            if payment is None:
                raise ApiError("NOT_FOUND_PAYMENT")
            return self._payment_json(payment)

    def payment_by_order(self, order_id: str) -> Json:
        with self._lock:
            payment = self._payment_for_order(order_id)
            if payment is None:
                raise ApiError("NOT_FOUND_PAYMENT")
            return self._payment_json(payment)

    def transactions(
        self, start: datetime, end: datetime, starting_after: str | None, limit: int
    ) -> list[Json]:
        with self._lock:
            rows = self._transactions
            if starting_after is not None:
                index = next(
                    (i for i, t in enumerate(rows) if t.transaction_key == starting_after), None
                )
                if index is None:
                    raise ApiError("INVALID_REQUEST", "startingAfter 값이 올바르지 않습니다.")
                rows = rows[index + 1 :]
            selected = [t for t in rows if start <= t.at <= end][:limit]
            return [self._transaction_json(t) for t in selected]

    def ledger(self) -> Json:
        """Every approval and cancel, for invariant checks in tests and benchmarks."""
        with self._lock:
            entries: list[Json] = []
            approved = canceled = 0
            for t in self._transactions:
                payment = self._payments[t.payment_key]
                entries.append(
                    {
                        "kind": t.kind,
                        "transactionKey": t.transaction_key,
                        "paymentKey": t.payment_key,
                        "orderId": payment.order_id,
                        "customerKey": payment.customer_key,
                        "billingKey": payment.billing_key,
                        "amount": t.amount,
                        "at": toss_time(t.at),
                    }
                )
                if t.kind == "approval":
                    approved += t.amount
                else:
                    canceled += t.amount
            return {
                "entries": entries,
                "approvedAmount": approved,
                "canceledAmount": canceled,
                "netAmount": approved - canceled,
            }

    # ---- wire format

    def _transaction_json(self, t: _Transaction) -> Json:
        payment = self._payments[t.payment_key]
        return {
            "mId": self._m_id,
            "transactionKey": t.transaction_key,
            "paymentKey": t.payment_key,
            "orderId": payment.order_id,
            "method": "카드",
            "customerKey": payment.customer_key,
            "useEscrow": False,
            "receiptUrl": _receipt_url(payment.payment_key),
            # The payment's status right after this transaction; a cancel's amount is the
            # cancelled amount, positive (the sign Toss uses is undocumented).
            "status": t.status,
            "transactionAt": toss_time(t.at),
            "currency": "KRW",
            "amount": t.amount,
        }

    def _payment_json(self, p: _Payment) -> Json:
        done = p.status != "ABORTED"
        supplied, vat = split_vat(p.balance, p.tax_free) if done else (0, 0)
        return {
            "mId": self._m_id,
            "lastTransactionKey": p.last_transaction_key,
            "paymentKey": p.payment_key,
            "orderId": p.order_id,
            "orderName": p.order_name,
            "taxExemptionAmount": p.tax_exemption,
            "status": p.status,
            "requestedAt": toss_time(p.requested_at),
            "approvedAt": toss_time(p.approved_at) if p.approved_at else None,
            "useEscrow": False,
            "cultureExpense": False,
            "card": {
                "issuerCode": p.card.issuer_code,
                "acquirerCode": p.card.issuer_code,
                "number": p.card.masked,
                "installmentPlanMonths": 0,
                "isInterestFree": False,
                "interestPayer": None,
                "approveNo": p.approve_no if done else None,
                "useCardPoint": False,
                "cardType": p.card.card_type,
                "ownerType": p.card.owner_type,
                "acquireStatus": "READY",
                "amount": p.total,
            },
            "virtualAccount": None,
            "transfer": None,
            "mobilePhone": None,
            "giftCertificate": None,
            "cashReceipt": None,
            "cashReceipts": None,
            "discount": None,
            "cancels": list(p.cancels) if p.cancels else None,
            "secret": p.secret,
            "type": "BILLING",
            "easyPay": None,
            "country": "KR",
            "failure": p.failure,
            "isPartialCancelable": p.tax_exemption == 0,
            "receipt": {"url": _receipt_url(p.payment_key)} if done else None,
            "checkout": {"url": f"{_API}/v1/payments/{p.payment_key}/checkout"},
            "currency": "KRW",
            # Easy-pay only; null on a card billing payment.
            "easyPayAmount": None,
            "easyPayDiscountAmount": None,
            "totalAmount": p.total,
            "balanceAmount": p.balance,
            "suppliedAmount": supplied,
            "vat": vat,
            "taxFreeAmount": p.tax_free,
            "metadata": None,
            "method": "카드",
            "version": API_VERSION,
            # Documented like lastTransactionKey but null in recent real bodies.
            "transactionKey": None,
        }


def _receipt_url(payment_key: str) -> str:
    return (
        "https://dashboard-sandbox.tosspayments.com/receipt/redirection"
        f"?transactionId={payment_key}&ref=PX"
    )
