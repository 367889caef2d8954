"""Toss Payments billing client: the only module that speaks Toss's wire format.

Follows ``reference/toss-api.md``: Basic auth with ``base64(secretKey + ":")``, billing-key
issuance, charge, cancel, lookups, transactions and billing-key deletion. Results are frozen
dataclasses that ignore unknown fields (Toss adds fields without a version bump); money is int
KRW. What each answer means for the caller:

* a result: Toss answered 2xx with a body that matches the request (order, amount, customer,
  a ``DONE`` charge); one that does not is :class:`TossReplyMismatch`, never a success;
* :class:`TossError`: an error response, with Toss's ``code``, the HTTP status, its
  :class:`FailureClass` (see ``service.toss_errors``) and a 429's ``retry_after``;
* :class:`TossOutcomeUnknown`: no usable answer (timeout, transport error, the call's overall
  deadline, an unreadable 2xx): the request may or may not have run, so it is resolved by a
  lookup or by re-sending with the same Idempotency-Key, never read as a decline.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx

from service.toss_errors import (
    ERROR_CODES,
    CodeSpec,
    FailureClass,
    Operation,
    TossChargeFailed,
    TossError,
    TossException,
    TossMalformedResponse,
    TossOutcomeUnknown,
    TossReplyMismatch,
    classify,
    parse_retry_after,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "ERROR_CODES",
    "KST",
    "Billing",
    "BillingCard",
    "Cancel",
    "Card",
    "CodeSpec",
    "Failure",
    "FailureClass",
    "Operation",
    "Payment",
    "Receipt",
    "SecretKey",
    "TossChargeFailed",
    "TossClient",
    "TossError",
    "TossException",
    "TossMalformedResponse",
    "TossOutcomeUnknown",
    "TossReplyMismatch",
    "Transaction",
    "check_secret_key",
    "classify",
    "parse_time",
]

DEFAULT_BASE_URL = "https://api.tosspayments.com"
# Toss timestamps are Korea Standard Time; KST has no DST, so a fixed offset is exact.
KST = timezone(timedelta(hours=9), "KST")

_log = logging.getLogger(__name__)


class _RedactBillingKeys(logging.Filter):
    """httpx logs every request URL at INFO; a charge URL carries the billing key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _BILLING_PATH.sub(r"\1<billing-key>", str(a)) if "/v1/billing/" in str(a) else a
                for a in record.args
            )
        return True


_BILLING_PATH = re.compile(r"(/v1/billing/)(?!authorizations/)[^/?\s\"]+")
logging.getLogger("httpx").addFilter(_RedactBillingKeys())
_Result = TypeVar("_Result")


# --------------------------------------------------------------------------- secret key


def check_secret_key(value: str) -> str:
    """``value`` if it can be a Toss key, else ValueError saying what is wrong (not the key).

    Keys pasted from a file often carry a UTF-8 byte-order mark or a trailing newline; sent
    as they are they make a mangled Basic header that Toss answers with 401.
    """
    if not value:
        raise ValueError("the Toss secret key is empty")
    if "\ufeff" in value:
        raise ValueError(
            "the Toss secret key contains a byte-order mark (U+FEFF); "
            "save the key file as UTF-8 without BOM"
        )
    if any(ch.isspace() for ch in value):
        raise ValueError(
            "the Toss secret key contains whitespace or a line break "
            "(often the newline at the end of a key file); remove it"
        )
    if ":" in value:
        raise ValueError("the Toss secret key contains ':', which Basic credentials cannot carry")
    if not value.isascii() or not value.isprintable():
        raise ValueError("the Toss secret key contains characters other than printable ASCII")
    return value


class SecretKey:
    """A Toss secret key that never shows itself in reprs, logs or exception text.

    Refused when loaded (ValueError with a clear message) if it is empty or carries a BOM,
    whitespace, a line break, ':' or non-ASCII characters.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = check_secret_key(value)

    def reveal(self) -> str:
        return self._value

    @property
    def is_live(self) -> bool:
        return self._value.startswith("live_")

    def authorization(self) -> str:
        """``Authorization`` header value: the key is the user name, the password is empty."""
        token = base64.b64encode(f"{self._value}:".encode()).decode("ascii")
        return f"Basic {token}"

    def __repr__(self) -> str:
        return f"SecretKey({'live' if self.is_live else 'test'}, hidden)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretKey):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((SecretKey, self._value))


# --------------------------------------------------------------------------- results


class _Malformed(Exception):
    pass


def parse_time(value: str) -> datetime:
    """ISO 8601 as Toss sends it; a timestamp without offset is Korea time."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=KST)


class _Fields:
    """Typed reads from one JSON object; unknown keys are ignored, wrong types are malformed."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, dict):
            raise _Malformed(f"{what} is not an object")
        self._data: dict[str, Any] = data
        self._what = what

    def _get(self, key: str, kind: type | tuple[type, ...], required: bool) -> Any:
        value = self._data.get(key)
        if value is None:
            if required:
                raise _Malformed(f"{self._what}.{key} is missing")
            return None
        # bool is an int in Python but never a JSON number.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise _Malformed(f"{self._what}.{key} has the wrong type")
        return value

    def raw(self) -> Mapping[str, Any]:
        return self._data

    def text(self, key: str) -> str:
        value: str = self._get(key, str, True)
        return value

    def opt_text(self, key: str) -> str | None:
        value: str | None = self._get(key, str, False)
        return value

    def flag(self, key: str) -> bool:
        return bool(self._get(key, bool, False))

    def money(self, key: str, default: int | None = None) -> int:
        # Amounts are JSON numbers (floats since API 1.4); KRW amounts are always whole.
        value = self._get(key, (int, float), default is None)
        if value is None:
            assert default is not None
            return default
        if isinstance(value, float) and not value.is_integer():
            raise _Malformed(f"{self._what}.{key} is not a whole KRW amount")
        return int(value)

    def time(self, key: str) -> datetime:
        try:
            return parse_time(self.text(key))
        except ValueError as exc:
            raise _Malformed(f"{self._what}.{key} is not an ISO 8601 time") from exc

    def opt_time(self, key: str) -> datetime | None:
        return self.time(key) if self._data.get(key) is not None else None

    def sub(self, key: str) -> _Fields | None:
        value = self._data.get(key)
        return None if value is None else _Fields(value, f"{self._what}.{key}")

    def subs(self, key: str) -> Iterator[_Fields]:
        value = self._data.get(key)
        if value is None:
            return
        if not isinstance(value, list):
            raise _Malformed(f"{self._what}.{key} is not an array")
        for i, item in enumerate(value):
            yield _Fields(item, f"{self._what}.{key}[{i}]")


@dataclass(frozen=True, slots=True)
class BillingCard:
    issuer_code: str
    acquirer_code: str | None
    number: str  # masked
    card_type: str | None
    owner_type: str | None

    @classmethod
    def _parse(cls, f: _Fields) -> BillingCard:
        return cls(
            issuer_code=f.text("issuerCode"),
            acquirer_code=f.opt_text("acquirerCode"),
            number=f.text("number"),
            card_type=f.opt_text("cardType"),
            owner_type=f.opt_text("ownerType"),
        )


@dataclass(frozen=True, slots=True)
class Billing:
    """Result of billing-key issuance. The key cannot be fetched again: store it at once."""

    billing_key: str = field(repr=False)
    customer_key: str
    m_id: str
    method: str
    authenticated_at: datetime
    card: BillingCard | None

    @classmethod
    def _parse(cls, f: _Fields) -> Billing:
        card = f.sub("card")
        return cls(
            billing_key=f.text("billingKey"),
            customer_key=f.text("customerKey"),
            m_id=f.text("mId"),
            method=f.text("method"),
            authenticated_at=f.time("authenticatedAt"),
            card=BillingCard._parse(card) if card else None,
        )


@dataclass(frozen=True, slots=True)
class Card:
    amount: int
    issuer_code: str
    acquirer_code: str | None
    number: str  # masked
    installment_plan_months: int
    approve_no: str | None
    use_card_point: bool
    card_type: str | None
    owner_type: str | None
    acquire_status: str | None
    is_interest_free: bool
    interest_payer: str | None

    @classmethod
    def _parse(cls, f: _Fields) -> Card:
        return cls(
            amount=f.money("amount"),
            issuer_code=f.text("issuerCode"),
            acquirer_code=f.opt_text("acquirerCode"),
            number=f.text("number"),
            installment_plan_months=f.money("installmentPlanMonths", 0),
            approve_no=f.opt_text("approveNo"),
            use_card_point=f.flag("useCardPoint"),
            card_type=f.opt_text("cardType"),
            owner_type=f.opt_text("ownerType"),
            acquire_status=f.opt_text("acquireStatus"),
            is_interest_free=f.flag("isInterestFree"),
            interest_payer=f.opt_text("interestPayer"),
        )


@dataclass(frozen=True, slots=True)
class Cancel:
    transaction_key: str
    cancel_amount: int
    cancel_reason: str
    tax_free_amount: int
    tax_exemption_amount: int
    refundable_amount: int  # what is still refundable after this cancel
    canceled_at: datetime
    cancel_status: str
    receipt_key: str | None
    card_discount_amount: int
    transfer_discount_amount: int
    easy_pay_discount_amount: int

    @classmethod
    def _parse(cls, f: _Fields) -> Cancel:
        return cls(
            transaction_key=f.text("transactionKey"),
            cancel_amount=f.money("cancelAmount"),
            cancel_reason=f.opt_text("cancelReason") or "",
            tax_free_amount=f.money("taxFreeAmount", 0),
            tax_exemption_amount=f.money("taxExemptionAmount", 0),
            refundable_amount=f.money("refundableAmount", 0),
            canceled_at=f.time("canceledAt"),
            cancel_status=f.opt_text("cancelStatus") or "DONE",
            receipt_key=f.opt_text("receiptKey"),
            card_discount_amount=f.money("cardDiscountAmount", 0),
            transfer_discount_amount=f.money("transferDiscountAmount", 0),
            easy_pay_discount_amount=f.money("easyPayDiscountAmount", 0),
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    url: str


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Payment:
    payment_key: str
    order_id: str
    order_name: str
    status: str
    type: str
    method: str | None
    m_id: str
    currency: str
    total_amount: int
    balance_amount: int
    supplied_amount: int
    vat: int
    tax_free_amount: int
    tax_exemption_amount: int
    requested_at: datetime
    approved_at: datetime | None
    last_transaction_key: str | None
    is_partial_cancelable: bool
    use_escrow: bool
    card: Card | None
    cancels: tuple[Cancel, ...]
    receipt: Receipt | None
    checkout_url: str | None
    failure: Failure | None
    country: str | None
    version: str | None
    # Not in Toss's documented Payment object; checked against the request when present.
    customer_key: str | None = None
    # Webhook verification value: a PAYMENT_STATUS_CHANGED carrying it is genuine.
    secret: str | None = field(repr=False, default=None)
    # The object as Toss sent it: the billing core stores and reads this snapshot itself.
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def _parse(cls, f: _Fields) -> Payment:
        card = f.sub("card")
        receipt = f.sub("receipt")
        checkout = f.sub("checkout")
        failure = f.sub("failure")
        return cls(
            payment_key=f.text("paymentKey"),
            order_id=f.text("orderId"),
            order_name=f.opt_text("orderName") or "",
            status=f.text("status"),
            type=f.opt_text("type") or "",
            method=f.opt_text("method"),
            m_id=f.opt_text("mId") or "",
            currency=f.opt_text("currency") or "KRW",
            total_amount=f.money("totalAmount"),
            balance_amount=f.money("balanceAmount"),
            supplied_amount=f.money("suppliedAmount", 0),
            vat=f.money("vat", 0),
            tax_free_amount=f.money("taxFreeAmount", 0),
            tax_exemption_amount=f.money("taxExemptionAmount", 0),
            requested_at=f.time("requestedAt"),
            approved_at=f.opt_time("approvedAt"),
            last_transaction_key=f.opt_text("lastTransactionKey"),
            is_partial_cancelable=f.flag("isPartialCancelable"),
            use_escrow=f.flag("useEscrow"),
            card=Card._parse(card) if card else None,
            cancels=tuple(Cancel._parse(c) for c in f.subs("cancels")),
            receipt=Receipt(receipt.text("url")) if receipt else None,
            checkout_url=checkout.opt_text("url") if checkout else None,
            failure=Failure(failure.text("code"), failure.text("message")) if failure else None,
            country=f.opt_text("country"),
            version=f.opt_text("version"),
            customer_key=f.opt_text("customerKey"),
            secret=f.opt_text("secret"),
            raw=f.raw(),
        )


@dataclass(frozen=True, slots=True)
class Transaction:
    transaction_key: str
    payment_key: str
    order_id: str
    m_id: str
    method: str | None
    customer_key: str | None
    use_escrow: bool
    receipt_url: str | None
    status: str
    transaction_at: datetime
    currency: str
    amount: int

    @classmethod
    def _parse(cls, f: _Fields) -> Transaction:
        return cls(
            transaction_key=f.text("transactionKey"),
            payment_key=f.text("paymentKey"),
            order_id=f.text("orderId"),
            m_id=f.opt_text("mId") or "",
            method=f.opt_text("method"),
            customer_key=f.opt_text("customerKey"),
            use_escrow=f.flag("useEscrow"),
            receipt_url=f.opt_text("receiptUrl"),
            status=f.text("status"),
            transaction_at=f.time("transactionAt"),
            currency=f.opt_text("currency") or "KRW",
            amount=f.money("amount"),
        )


# --------------------------------------------------------------------------- client


def _path_segment(value: str) -> str:
    # Billing keys may contain '=' and orderIds '=' too; encode everything that is not plain.
    return quote(value, safe="")


def _transactions_time(value: datetime) -> str:
    """``yyyy-MM-dd'T'HH:mm:ss`` in Korea time, the format the transactions API takes."""
    local = value.astimezone(KST) if value.tzinfo else value
    return local.strftime("%Y-%m-%dT%H:%M:%S")


# Operations Toss documents as slow (up to 60 s) or that move money or keys.
_SLOW = frozenset(
    {
        Operation.ISSUE_BILLING_KEY,
        Operation.CHARGE,
        Operation.CANCEL,
        Operation.LIST_TRANSACTIONS,
    }
)
# What a lookup of a charge's orderId can say about that charge.
_CHARGED = frozenset({"DONE", "CANCELED", "PARTIAL_CANCELED"})
_FAILED = frozenset({"ABORTED", "EXPIRED"})


def _expect(operation: Operation, what: str, expected: object, actual: object) -> None:
    if expected != actual:
        raise TossReplyMismatch(operation, what, expected, actual)


class PooledTransport(httpx.AsyncBaseTransport):
    """Keep-alive connections for ``concurrency`` calls at once, in pools of a few each.

    httpcore looks at every connection of its pool (is it idle, has it expired, is its socket
    readable) on each request and each response, so one pool of 32 connections costs several
    times the CPU per call of four pools of 8; requests take the pools in turn.
    """

    def __init__(self, concurrency: int, per_pool: int = 8) -> None:
        pools = max(1, -(-concurrency // per_pool))
        # A spare connection or two per pool: a pool smaller than its share of the calls in
        # flight would open and close a connection for each call above it.
        keep = -(-concurrency // pools) + 2
        self._pools = [
            httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=keep)
            )
            for _ in range(pools)
        ]
        self._turn = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._turn = (self._turn + 1) % len(self._pools)
        return await self._pools[self._turn].handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class TossClient:
    """Async client for the Toss Payments billing API.

    ``http`` may be a shared ``httpx.AsyncClient`` (it is then left open); otherwise the
    client owns one. ``timeout`` is the overall deadline of a call that Toss documents as slow
    (issue, charge, cancel, transactions: up to 60 s, so it stays >= 60 in production);
    ``lookup_timeout`` that of the others. The deadline covers the whole exchange, so a server
    that trickles bytes cannot keep a call alive past it.
    """

    def __init__(
        self,
        secret_key: SecretKey | str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        http: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        lookup_timeout: float = 30.0,
    ) -> None:
        self._secret = secret_key if isinstance(secret_key, SecretKey) else SecretKey(secret_key)
        self._base_url = base_url.rstrip("/")
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._deadline = {True: timeout, False: lookup_timeout}

    def __repr__(self) -> str:
        return f"TossClient(base_url={self._base_url!r}, secret_key={self._secret!r})"

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---- API

    async def issue_billing_key(
        self, auth_key: str, customer_key: str, *, idempotency_key: str
    ) -> Billing:
        """Exchange the one-time authKey from the SDK redirect for a billing key.

        ``idempotency_key`` must be derived from the registration: the authKey works once,
        so after a timeout only a re-send under the same key can return the billing key.
        """
        if not idempotency_key:
            raise ValueError("issue_billing_key needs the registration's idempotency key")
        op = Operation.ISSUE_BILLING_KEY
        body = {"authKey": auth_key, "customerKey": customer_key}
        data = await self._call(
            op,
            "POST",
            "/v1/billing/authorizations/issue",
            json=body,
            idempotency_key=idempotency_key,
        )
        billing = self._parse(op, Billing._parse, data, "billing")
        _expect(op, "customerKey", customer_key, billing.customer_key)
        return billing

    async def charge(
        self,
        billing_key: str,
        customer_key: str,
        amount: int,
        order_id: str,
        order_name: str,
        *,
        customer_email: str | None = None,
        customer_name: str | None = None,
        idempotency_key: str,
    ) -> Payment:
        """Approve a billing charge. Re-send with the same order_id and key, never new ones,
        until the outcome is known (see :class:`TossOutcomeUnknown`).

        The reply must be a ``DONE`` payment of this order, amount and customer; anything else
        raises :class:`TossReplyMismatch`.
        """
        op = Operation.CHARGE
        body: dict[str, object] = {
            "customerKey": customer_key,
            "amount": amount,
            "orderId": order_id,
            "orderName": order_name,
        }
        if customer_email is not None:
            body["customerEmail"] = customer_email
        if customer_name is not None:
            body["customerName"] = customer_name
        data = await self._call(
            op,
            "POST",
            f"/v1/billing/{_path_segment(billing_key)}",
            json=body,
            idempotency_key=idempotency_key,
        )
        payment = self._parse(op, Payment._parse, data, "payment")
        self._check_charge(op, payment, order_id, amount, customer_key)
        _expect(op, "status", "DONE", payment.status)
        return payment

    async def cancel(
        self,
        payment_key: str,
        reason: str,
        amount: int | None = None,
        *,
        idempotency_key: str,
        refundable_amount: int | None = None,
    ) -> Payment:
        """Cancel ``amount`` (None = the whole remaining balance). ``refundable_amount`` is an
        optimistic lock: Toss refuses if its balance differs.

        The returned payment (its ``cancels`` and ``balanceAmount``) is the refund's record;
        webhooks are not needed to learn it.
        """
        op = Operation.CANCEL
        body: dict[str, object] = {"cancelReason": reason}
        if amount is not None:
            body["cancelAmount"] = amount
        if refundable_amount is not None:
            body["refundableAmount"] = refundable_amount
        data = await self._call(
            op,
            "POST",
            f"/v1/payments/{_path_segment(payment_key)}/cancel",
            json=body,
            idempotency_key=idempotency_key,
        )
        payment = self._parse(op, Payment._parse, data, "payment")
        _expect(op, "paymentKey", payment_key, payment.payment_key)
        if payment.status not in ("CANCELED", "PARTIAL_CANCELED") or not payment.cancels:
            raise TossReplyMismatch(op, "status", "CANCELED or PARTIAL_CANCELED", payment.status)
        return payment

    async def get_payment(self, payment_key: str) -> Payment:
        op = Operation.GET_PAYMENT
        data = await self._call(op, "GET", f"/v1/payments/{_path_segment(payment_key)}")
        payment = self._parse(op, Payment._parse, data, "payment")
        _expect(op, "paymentKey", payment_key, payment.payment_key)
        return payment

    async def get_payment_by_order(self, order_id: str) -> Payment | None:
        """The payment for ``order_id``, or None when Toss has none (404 NOT_FOUND_PAYMENT).

        Whatever its status: a failed charge may come back as ``ABORTED`` with ``failure``.
        :meth:`lookup_charge` reads the answer for a charge attempt.
        """
        op = Operation.GET_PAYMENT_BY_ORDER
        try:
            data = await self._call(op, "GET", f"/v1/payments/orders/{_path_segment(order_id)}")
        except TossError as exc:
            if exc.code == "NOT_FOUND_PAYMENT":
                return None
            raise
        payment = self._parse(op, Payment._parse, data, "payment")
        _expect(op, "orderId", order_id, payment.order_id)
        return payment

    async def lookup_charge(
        self, order_id: str, amount: int, customer_key: str | None = None
    ) -> Payment | None:
        """What became of the charge sent as ``order_id``: how an unknown outcome is resolved.

        * a Payment: it was approved (``DONE``, or refunded since), for this amount;
        * None: Toss has no payment for the order. That means "not charged" only once the
          original request can no longer be in flight at Toss (its 60 s window has passed);
        * :class:`TossChargeFailed`: it failed. Toss may keep a failed charge as ``ABORTED``
          with ``failure`` (undocumented); that is a failed charge, not a success and not
          "not found";
        * :class:`TossOutcomeUnknown`: still in progress at Toss;
        * :class:`TossReplyMismatch`: the payment is for another amount or customer.
        """
        op = Operation.GET_PAYMENT_BY_ORDER
        payment = await self.get_payment_by_order(order_id)
        if payment is None:
            return None
        self._check_charge(op, payment, order_id, amount, customer_key)
        if payment.status in _CHARGED:
            return payment
        if payment.status in _FAILED:
            # A failed payment without its reason: Toss's own generic failure code.
            failure = payment.failure or Failure("UNKNOWN_PAYMENT_ERROR", "결제에 실패했어요.")
            raise TossChargeFailed(
                failure.code, failure.message, op, payment.payment_key, payment.status
            )
        raise TossOutcomeUnknown(op, f"payment is {payment.status}")

    async def list_transactions(
        self, start: datetime, end: datetime, *, page_size: int = 100
    ) -> AsyncIterator[Transaction]:
        """Every approval and cancel with ``transactionAt`` in [start, end], page by page."""
        if not 1 <= page_size <= 5000:
            raise ValueError("page_size must be within 1..5000")
        op = Operation.LIST_TRANSACTIONS
        params = {
            "startDate": _transactions_time(start),
            "endDate": _transactions_time(end),
            "limit": str(page_size),
        }
        while True:
            data = await self._call(op, "GET", "/v1/transactions", params=params)
            if not isinstance(data, list):
                raise TossMalformedResponse(op, "expected an array")
            page = [self._parse(op, Transaction._parse, item, "transaction") for item in data]
            for transaction in page:
                yield transaction
            if len(page) < page_size:
                return
            params = {**params, "startingAfter": page[-1].transaction_key}

    async def delete_billing_key(self, billing_key: str) -> None:
        await self._call(
            Operation.DELETE_BILLING_KEY, "DELETE", f"/v1/billing/{_path_segment(billing_key)}"
        )

    # ---- plumbing

    @staticmethod
    def _check_charge(
        op: Operation, payment: Payment, order_id: str, amount: int, customer_key: str | None
    ) -> None:
        _expect(op, "orderId", order_id, payment.order_id)
        _expect(op, "totalAmount", amount, payment.total_amount)
        if customer_key is not None and payment.customer_key is not None:
            _expect(op, "customerKey", customer_key, payment.customer_key)

    async def _call(
        self,
        operation: Operation,
        method: str,
        path: str,
        *,
        json: Mapping[str, object] | None = None,
        params: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> object:
        headers = {"Authorization": self._secret.authorization()}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        deadline = self._deadline[operation in _SLOW]
        request = self._http.build_request(
            method,
            self._base_url + path,
            json=json,
            params=params,
            headers=headers,
            timeout=httpx.Timeout(deadline, connect=min(deadline, 10.0)),
        )
        try:
            # httpx's timeouts bound each read, not the exchange: this bounds the whole call.
            async with asyncio.timeout(deadline):
                response = await self._send(operation, request)
        except TimeoutError:
            _log.warning("toss %s: no complete response within %s s", operation, deadline)
            raise TossOutcomeUnknown(operation, "deadline exceeded") from None
        _log.debug("toss %s: HTTP %s", operation, response.status_code)
        if response.is_success:
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                raise TossMalformedResponse(operation, "2xx body is not JSON") from None
        raise self._error(operation, response)

    async def _send(self, operation: Operation, request: httpx.Request) -> httpx.Response:
        """The response with its body read; any failure to get both is outcome-unknown,
        except an error status whose body is unreadable (the status alone classifies it)."""
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            # Paths can hold billing keys, so neither the URL nor the exception text is logged.
            _log.warning("toss %s: no response (%s)", operation, type(exc).__name__)
            raise TossOutcomeUnknown(operation, type(exc).__name__) from None
        try:
            await response.aread()
        except (httpx.DecodingError, httpx.TransportError) as exc:
            _log.warning("toss %s: unreadable body (%s)", operation, type(exc).__name__)
            if response.is_success or isinstance(exc, httpx.TransportError):
                raise TossMalformedResponse(operation, type(exc).__name__) from None
            return httpx.Response(response.status_code, headers=response.headers)
        finally:
            await response.aclose()
        return response

    @staticmethod
    def _error(operation: Operation, response: httpx.Response) -> TossError:
        code, message = f"HTTP_{response.status_code}", response.reason_phrase
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            # v1 APIs answer {code, message}; v2 resource APIs wrap it in "error".
            nested = body.get("error")
            inner: dict[str, object] = nested if isinstance(nested, dict) else body
            if isinstance(inner.get("code"), str):
                code = str(inner["code"])
            if isinstance(inner.get("message"), str):
                message = str(inner["message"])
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        error = TossError(code, message, response.status_code, operation, retry_after=retry_after)
        _log.info("toss %s: %s %s (%s)", operation, response.status_code, code, error.error_class)
        return error

    @staticmethod
    def _parse(
        operation: Operation, parse: Callable[[_Fields], _Result], data: object, what: str
    ) -> _Result:
        try:
            return parse(_Fields(data, what))
        except _Malformed as exc:
            raise TossMalformedResponse(operation, str(exc)) from None
