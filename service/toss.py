"""Toss Payments billing client: the only module that speaks Toss's wire format.

Follows ``reference/toss-api.md``: Basic auth with ``base64(secretKey + ":")``, billing-key
issuance, charge, cancel, lookups, transactions and billing-key deletion. Results are frozen
dataclasses that ignore unknown fields (Toss adds fields without a version bump); money is int
KRW. Every error response becomes a :class:`TossError` carrying Toss's ``code``, the HTTP
status and an :class:`ErrorClass` that says what the caller may do next. No response at all
(timeout, dropped connection, unreadable 2xx) is :class:`TossOutcomeUnknown`: the request may or
may not have been executed, so it is resolved by a lookup or by re-sending with the same
Idempotency-Key, never by treating it as a decline.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx

__all__ = [
    "DEFAULT_BASE_URL",
    "ERROR_CODES",
    "KST",
    "Billing",
    "BillingCard",
    "Cancel",
    "Card",
    "CodeSpec",
    "ErrorClass",
    "Failure",
    "Operation",
    "Outcome",
    "Payment",
    "Receipt",
    "SecretKey",
    "TossClient",
    "TossError",
    "TossException",
    "TossMalformedResponse",
    "TossOutcomeUnknown",
    "Transaction",
    "classify",
    "classify_decline_code",
    "outcome_of",
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


class SecretKey:
    """A Toss secret key that never shows itself in reprs, logs or exception text."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value or ":" in value or value != value.strip():
            # A ':' would corrupt the Basic credentials; whitespace usually means a paste error.
            raise ValueError("invalid Toss secret key format")
        self._value = value

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


# --------------------------------------------------------------------------- error taxonomy


class ErrorClass(StrEnum):
    """What a caller may do after an error response."""

    # Re-send the identical request with the same Idempotency-Key after a backoff. 409 and 429
    # were not processed, so the re-send runs; an error Toss did process (PROVIDER_ERROR, a
    # 5xx) is replayed under that key for 15 days, and a replay means: reconcile, then start
    # a new attempt (new orderId and key).
    TRANSIENT = "transient"
    # The card refused this charge; a later dunning attempt (new orderId and key) may succeed.
    DECLINE = "decline"
    # The billing key or card is unusable (or blocked until the subscriber calls the issuer):
    # no automatic retry; the subscriber must register a card again.
    NEEDS_NEW_CARD = "needs_new_card"
    # Toss's state differs from ours (order exists, already cancelled ...): look it up first.
    RECONCILE_FIRST = "reconcile_first"
    # Our request or configuration is wrong; retrying cannot help.
    BUG_OR_CONFIG = "bug_or_config"


class Operation(StrEnum):
    ISSUE_BILLING_KEY = "issue_billing_key"
    CHARGE = "charge"
    CANCEL = "cancel"
    GET_PAYMENT = "get_payment"
    GET_PAYMENT_BY_ORDER = "get_payment_by_order"
    LIST_TRANSACTIONS = "list_transactions"
    DELETE_BILLING_KEY = "delete_billing_key"

    @property
    def moves_money(self) -> bool:
        return self in (Operation.CHARGE, Operation.CANCEL)


@dataclass(frozen=True, slots=True)
class CodeSpec:
    """One row of the error table: HTTP status Toss uses, class, and Toss's (Korean) message."""

    http_status: int
    error_class: ErrorClass
    message: str


def _group(error_class: ErrorClass, rows: Mapping[str, tuple[int, str]]) -> dict[str, CodeSpec]:
    return {code: CodeSpec(status, error_class, msg) for code, (status, msg) in rows.items()}


# The code table (reference §9b): HTTP status, class and message of every known code, in one
# place. Statuses marked [UNC] in the reference use its recommendation. Messages are Toss's
# wording where the reference quotes it, otherwise a close paraphrase.
ERROR_CODES: Mapping[str, CodeSpec] = {
    **_group(
        ErrorClass.BUG_OR_CONFIG,
        {
            "UNAUTHORIZED_KEY": (401, "인증되지 않은 시크릿 키 혹은 클라이언트 키 입니다."),
            "INVALID_API_KEY": (400, "잘못된 시크릿키 연동 정보 입니다."),
            "INCORRECT_BASIC_AUTH_FORMAT": (
                403,
                "잘못된 요청입니다. ':' 를 포함해 인코딩해주세요.",
            ),
            "FORBIDDEN_REQUEST": (403, "허용되지 않은 요청입니다."),
            "NOT_SUPPORTED_METHOD": (400, "지원되지 않는 결제 수단입니다."),
            "NOT_FOUND_HTTP_METHOD": (404, "요청한 API를 찾을 수 없습니다."),
            "INVALID_REQUEST": (400, "잘못된 요청입니다."),
            "INVALID_REQUIRED_PARAM": (400, "필수 파라미터가 누락되었습니다."),
            "INVALID_ORDER_ID": (
                400,
                "orderId는 영문 대소문자, 숫자, 특수문자(-, _)만 허용합니다. "
                "6자 이상 64자 이하여야 합니다.",
            ),
            "INVALID_ORDER_NAME": (400, "주문명은 1자 이상 100자 이하여야 합니다."),
            "INVALID_CUSTOMER_KEY": (400, "customerKey는 2자 이상 255자 이하여야 합니다."),
            "INVALID_EMAIL": (400, "유효하지 않은 이메일 주소 형식입니다."),
            "BELOW_MINIMUM_AMOUNT": (
                400,
                "신용카드는 결제금액이 100원 이상, 계좌는 200원이상부터 결제가 가능합니다.",
            ),
            "BELOW_ZERO_AMOUNT": (400, "금액은 0보다 커야 합니다."),
            "NOT_MATCHES_CUSTOMER_KEY": (
                400,
                "빌링 인증 고객키와 결제 요청 고객키가 일치하지 않습니다.",
            ),
            "INVALID_IDEMPOTENCY_KEY": (400, "멱등키는 300자 이하여야 합니다."),
            "NOT_FOUND_PAYMENT": (404, "존재하지 않는 결제 입니다."),
            "NOT_FOUND_PAYMENT_SESSION": (
                404,
                "결제 시간이 만료되어 결제 진행 데이터가 존재하지 않습니다.",
            ),
            "INVALID_CARD_INSTALLMENT_PLAN": (400, "할부 개월 정보가 잘못되었습니다."),
            "NOT_SUPPORTED_INSTALLMENT_PLAN_CARD_OR_MERCHANT": (
                400,
                "할부가 지원되지 않는 카드 또는 가맹점 입니다.",
            ),
            "NOT_SUPPORTED_MONTHLY_INSTALLMENT_PLAN": (400, "할부가 지원되지 않습니다."),
            "EXCEED_MAX_CARD_INSTALLMENT_PLAN": (
                400,
                "설정 가능한 최대 할부 개월 수를 초과했습니다.",
            ),
            # 500 "due to an invalid request value" (e.g. a 301-char customerKey): a bug,
            # except on charge/cancel, where classify() makes every 5xx reconcile-first.
            "FAILED_DB_PROCESSING": (500, "잘못된 요청 값으로 처리 중 DB 에러가 발생했습니다."),
            # cancel refusals that no retry fixes
            "NOT_CANCELABLE_PAYMENT": (403, "취소 할 수 없는 결제 입니다."),
            "EXCEED_MAX_REFUND_DUE": (403, "환불 가능한 기간이 지났습니다."),
            "NOT_ALLOWED_PARTIAL_REFUND": (403, "부분 환불이 불가능한 결제입니다."),
            "NOT_ALLOWED_PARTIAL_REFUND_WAITING_DEPOSIT": (
                403,
                "입금 대기중인 결제는 부분 환불이 불가합니다.",
            ),
            "REFUND_REJECTED": (400, "환불이 거절됐습니다. 결제사에 문의 부탁드립니다."),
            # The rest of the cancel endpoint's table (reference §5). It gives no retry advice
            # for these, so they are not retried; most concern virtual-account refunds.
            "INVALID_REFUND_ACCOUNT_INFO": (400, "환불 계좌번호와 예금주명이 일치하지 않습니다."),
            "INVALID_REFUND_ACCOUNT_NUMBER": (400, "잘못된 환불 계좌번호입니다."),
            "INVALID_BANK": (400, "유효하지 않은 은행입니다."),
            "FORBIDDEN_BANK_REFUND_REQUEST": (400, "고객 계좌가 입금이 되지 않는 상태입니다."),
            "EXCEED_CANCEL_AMOUNT_DISCOUNT_AMOUNT": (
                400,
                "즉시할인금액보다 적은 금액은 부분취소가 불가능합니다.",
            ),
            "NOT_CANCELABLE_PAYMENT_FOR_DORMANT_USER": (
                403,
                "휴면 처리된 회원의 결제는 취소할 수 없습니다.",
            ),
            "EXCEED_CANCEL_LIMIT": (403, "취소 가능한 한도를 초과했습니다."),
        },
    ),
    **_group(
        ErrorClass.NEEDS_NEW_CARD,
        {
            "INVALID_BILLING_AUTH": (400, "유효하지 않은 빌링 인증입니다."),
            "INVALID_BILL_KEY_REQUEST": (400, "인증되지 않은 빌링키 요청입니다."),
            "ALREADY_REMOVED_BILLING_KEY": (400, "이미 삭제된 빌링키입니다."),
            "BILLING_KEY_NOT_FOUND": (400, "존재하지 않는 빌링키입니다."),
            "NOT_FOUND_BILLING": (404, "존재하지 않는 빌링 인증 정보입니다."),
            "INVALID_CARD_NUMBER": (400, "카드번호를 다시 확인해주세요."),
            "INVALID_CARD_EXPIRATION": (400, "카드 정보를 다시 확인해주세요. (유효기간)"),
            "INVALID_STOPPED_CARD": (400, "정지된 카드 입니다."),
            "INVALID_REJECT_CARD": (400, "카드 사용이 거절되었습니다. 카드사 문의가 필요합니다."),
            "INVALID_CARD_LOST_OR_STOLEN": (400, "분실 혹은 도난 카드입니다."),
            "NOT_SUPPORTED_CARD_TYPE": (400, "지원되지 않는 카드 종류입니다."),
            "NOT_REGISTERED_CARD_COMPANY": (400, "카드를 사용 등록 후 이용해주세요."),
            "INVALID_CARD_PASSWORD": (400, "카드 비밀번호를 다시 확인해주세요."),
            "INVALID_CARD_IDENTITY": (
                400,
                "입력하신 주민번호/사업자번호가 카드 소유주 정보와 일치하지 않습니다.",
            ),
            "INVALID_BIRTH_DAY_FORMAT": (
                400,
                "생년월일 정보는 6자리의 yyMMdd 형식이어야 합니다.",
            ),
            # Reference §9b: "no (contact issuer)". Not a decline to dun: every further
            # attempt is one more authentication the issuer counts; the subscriber must act.
            "EXCEED_MAX_AUTH_COUNT": (
                403,
                "최대 인증 횟수를 초과했습니다. 카드사로 문의해주세요.",
            ),
        },
    ),
    **_group(
        ErrorClass.DECLINE,
        {
            "REJECT_CARD_PAYMENT": (403, "한도초과 혹은 잔액부족으로 결제에 실패했습니다."),
            "REJECT_CARD_COMPANY": (403, "결제 승인이 거절되었습니다."),
            "REJECT_ACCOUNT_PAYMENT": (403, "잔액부족으로 결제에 실패했습니다."),
            "EXCEED_MAX_DAILY_PAYMENT_COUNT": (400, "하루 결제 가능 횟수를 초과했습니다."),
            "EXCEED_MAX_PAYMENT_AMOUNT": (400, "하루 결제 가능 금액을 초과했습니다."),
            "EXCEED_MAX_AMOUNT": (400, "거래금액 한도를 초과했습니다."),
            "EXCEED_MAX_ONE_DAY_AMOUNT": (400, "일일 한도를 초과했습니다."),
        },
    ),
    **_group(
        ErrorClass.RECONCILE_FIRST,
        {
            "DUPLICATED_ORDER_ID": (
                400,
                "이미 승인 및 취소가 진행된 중복된 주문번호 입니다. 다른 주문번호로 진행해주세요.",
            ),
            "ALREADY_PROCESSED_PAYMENT": (400, "이미 처리된 결제 입니다."),
            "ALREADY_CANCELED_PAYMENT": (400, "이미 취소된 결제 입니다."),
            # Also Toss's answer once partial cancels have brought the balance to 0 (§5).
            "NOT_CANCELABLE_AMOUNT": (403, "취소 할 수 없는 금액 입니다."),
            "NOT_MATCHES_REFUNDABLE_AMOUNT": (400, "잔액 결과가 일치하지 않습니다."),
            "ALREADY_REFUND_PAYMENT": (400, "이미 환불된 결제입니다."),
        },
    ),
    **_group(
        ErrorClass.TRANSIENT,
        {
            "IDEMPOTENT_REQUEST_PROCESSING": (409, "이전 멱등 요청이 처리중입니다."),
            "PROVIDER_ERROR": (400, "일시적인 오류가 발생했습니다. 잠시 후 다시 시도해주세요."),
            "FORBIDDEN_CONSECUTIVE_REQUEST": (
                403,
                "반복적인 요청은 허용되지 않습니다. 잠시 후 다시 시도해주세요.",
            ),
            "NOT_AVAILABLE_BANK": (403, "은행 서비스 시간이 아닙니다."),
            "FAILED_INTERNAL_SYSTEM_PROCESSING": (
                500,
                "내부 시스템 처리 작업이 실패했습니다. 잠시 후 다시 시도해주세요.",
            ),
            "FAILED_PAYMENT_INTERNAL_SYSTEM_PROCESSING": (
                500,
                "결제가 완료되지 않았어요. 다시 시도해주세요.",
            ),
            "FAILED_CARD_COMPANY_RESPONSE": (
                500,
                "카드사에서 오류가 발생했습니다. 잠시 후 다시 시도해 주세요.",
            ),
            "FAILED_BILL_KEY_AUTH_CREATION": (500, "빌링 인증 과정에서 키 생성이 실패했습니다."),
            "FAILED_REFUND_PROCESS": (
                500,
                "은행 응답시간 지연이나 일시적인 오류로 환불요청에 실패했습니다.",
            ),
            "FAILED_METHOD_HANDLING_CANCEL": (
                500,
                "취소 중 결제 시 사용한 결제 수단 처리과정에서 일시적인 오류가 발생했습니다.",
            ),
            "FAILED_PARTIAL_REFUND": (
                500,
                "은행 점검, 해약 계좌 등의 사유로 부분 환불이 실패했습니다.",
            ),
            "COMMON_ERROR": (500, "일시적인 오류가 발생했습니다. 잠시 후 다시 시도해주세요."),
            "UNKNOWN_ERROR": (500, "알 수 없는 에러가 발생했습니다."),
            "UNKNOWN_PAYMENT_ERROR": (500, "결제에 실패했어요. 잠시 후 다시 시도해주세요."),
        },
    ),
}


def classify_decline_code(code: str) -> ErrorClass:
    """Class of a Toss error code alone (e.g. a code stored with a failed attempt).

    ErrorClass is a str enum, so the result compares and stores as a plain string. Unknown
    codes are BUG_OR_CONFIG: without the HTTP status the safe reading is "do not retry".
    """
    spec = ERROR_CODES.get(code)
    return spec.error_class if spec else ErrorClass.BUG_OR_CONFIG


def classify(code: str, http_status: int, operation: Operation | None = None) -> ErrorClass:
    """Class of an error response; the HTTP status can override the code table."""
    if http_status == 429:
        return ErrorClass.TRANSIENT
    if http_status >= 500 and operation is not None and operation.moves_money:
        # A 5xx from a charge or cancel does not prove nothing happened: look the payment up
        # before re-sending (the same Idempotency-Key then makes the re-send safe).
        return ErrorClass.RECONCILE_FIRST
    spec = ERROR_CODES.get(code)
    if spec is not None:
        return spec.error_class
    # Unknown codes: a 5xx is the server's trouble and worth another try; an unknown 4xx is
    # never retried blindly, because a retry that cannot succeed just hides a problem.
    return ErrorClass.TRANSIENT if http_status >= 500 else ErrorClass.BUG_OR_CONFIG


class Outcome(StrEnum):
    """What a billing attempt turned into, for the billing service's state machine."""

    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    NEEDS_NEW_CARD = "needs_new_card"
    UNKNOWN = "unknown"
    FAILED = "failed"


_OUTCOME_BY_CLASS: Mapping[ErrorClass, Outcome] = {
    # The attempt stays open: resolved by a lookup or a re-send with the same key.
    ErrorClass.TRANSIENT: Outcome.UNKNOWN,
    ErrorClass.RECONCILE_FIRST: Outcome.UNKNOWN,
    ErrorClass.DECLINE: Outcome.DECLINED,
    ErrorClass.NEEDS_NEW_CARD: Outcome.NEEDS_NEW_CARD,
    ErrorClass.BUG_OR_CONFIG: Outcome.FAILED,
}


def outcome_of(error: TossException | None) -> Outcome:
    """Map the result of ``charge`` (None = it returned a Payment) to an attempt outcome."""
    if error is None:
        return Outcome.SUCCEEDED
    if isinstance(error, TossError):
        return _OUTCOME_BY_CLASS[error.error_class]
    return Outcome.UNKNOWN


class TossException(Exception):
    """Base of everything this module raises about a Toss call."""


class TossError(TossException):
    """Toss answered with an error response."""

    def __init__(
        self,
        code: str,
        message: str,
        http_status: int,
        operation: Operation | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        self.operation = operation
        self.error_class = classify(code, http_status, operation)
        where = f" on {operation}" if operation else ""
        super().__init__(f"{code} (HTTP {http_status}){where}: {message}")

    @property
    def retry_same_request(self) -> bool:
        """True when re-sending the identical request with the same key is the next step."""
        return self.error_class is ErrorClass.TRANSIENT

    def __repr__(self) -> str:
        return (
            f"TossError(code={self.code!r}, http_status={self.http_status}, "
            f"error_class={self.error_class.value!r}, operation={self.operation!r})"
        )


class TossOutcomeUnknown(TossException):
    """No usable response (timeout, transport error): the request may or may not have run."""

    def __init__(self, operation: Operation, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"outcome of {operation} unknown: {reason}")


class TossMalformedResponse(TossOutcomeUnknown):
    """A 2xx response that could not be read; for a charge the money may have moved."""


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
    # Webhook verification value: a PAYMENT_STATUS_CHANGED carrying it is genuine.
    secret: str | None = field(repr=False, default=None)

    @property
    def fully_refunded(self) -> bool:
        # Toss can leave status PARTIAL_CANCELED with nothing left, so judge by the balance.
        return self.balance_amount == 0 and bool(self.cancels)

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
            secret=f.opt_text("secret"),
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


class TossClient:
    """Async client for the Toss Payments billing API.

    ``http`` may be a shared ``httpx.AsyncClient`` (it is then left open); otherwise the
    client owns one. ``timeout`` applies to calls that Toss documents as slow (issue, charge,
    cancel, transactions: up to 60 s, so it should stay >= 60 in production).
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
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._lookup_timeout = httpx.Timeout(lookup_timeout, connect=min(lookup_timeout, 10.0))

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
        self, auth_key: str, customer_key: str, *, idempotency_key: str | None = None
    ) -> Billing:
        """Exchange the one-time authKey from the SDK redirect for a billing key."""
        body = {"authKey": auth_key, "customerKey": customer_key}
        data = await self._call(
            Operation.ISSUE_BILLING_KEY,
            "POST",
            "/v1/billing/authorizations/issue",
            json=body,
            idempotency_key=idempotency_key,
        )
        return self._parse(Operation.ISSUE_BILLING_KEY, Billing._parse, data, "billing")

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
        until the outcome is known (see :class:`TossOutcomeUnknown`)."""
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
            Operation.CHARGE,
            "POST",
            f"/v1/billing/{_path_segment(billing_key)}",
            json=body,
            idempotency_key=idempotency_key,
        )
        return self._parse(Operation.CHARGE, Payment._parse, data, "payment")

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
        optimistic lock: Toss refuses if its balance differs."""
        body: dict[str, object] = {"cancelReason": reason}
        if amount is not None:
            body["cancelAmount"] = amount
        if refundable_amount is not None:
            body["refundableAmount"] = refundable_amount
        data = await self._call(
            Operation.CANCEL,
            "POST",
            f"/v1/payments/{_path_segment(payment_key)}/cancel",
            json=body,
            idempotency_key=idempotency_key,
        )
        return self._parse(Operation.CANCEL, Payment._parse, data, "payment")

    async def get_payment(self, payment_key: str) -> Payment:
        data = await self._call(
            Operation.GET_PAYMENT, "GET", f"/v1/payments/{_path_segment(payment_key)}"
        )
        return self._parse(Operation.GET_PAYMENT, Payment._parse, data, "payment")

    async def get_payment_by_order(self, order_id: str) -> Payment | None:
        """The payment for ``order_id``, or None when Toss has none (404 NOT_FOUND_PAYMENT).

        This is how an unknown charge outcome is resolved. None only means "not charged" once
        the original request can no longer be in flight at Toss (its 60 s window has passed).
        """
        try:
            data = await self._call(
                Operation.GET_PAYMENT_BY_ORDER,
                "GET",
                f"/v1/payments/orders/{_path_segment(order_id)}",
            )
        except TossError as exc:
            if exc.code == "NOT_FOUND_PAYMENT":
                return None
            raise
        return self._parse(Operation.GET_PAYMENT_BY_ORDER, Payment._parse, data, "payment")

    async def list_transactions(
        self, start: datetime, end: datetime, *, page_size: int = 100
    ) -> AsyncIterator[Transaction]:
        """Every approval and cancel with ``transactionAt`` in [start, end], page by page."""
        if not 1 <= page_size <= 5000:
            raise ValueError("page_size must be within 1..5000")
        params = {
            "startDate": _transactions_time(start),
            "endDate": _transactions_time(end),
            "limit": str(page_size),
        }
        while True:
            data = await self._call(
                Operation.LIST_TRANSACTIONS, "GET", "/v1/transactions", params=params
            )
            if not isinstance(data, list):
                raise TossMalformedResponse(Operation.LIST_TRANSACTIONS, "expected an array")
            page = [
                self._parse(Operation.LIST_TRANSACTIONS, Transaction._parse, item, "transaction")
                for item in data
            ]
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
        slow = operation in (
            Operation.ISSUE_BILLING_KEY,
            Operation.CHARGE,
            Operation.CANCEL,
            Operation.LIST_TRANSACTIONS,
        )
        try:
            response = await self._http.request(
                method,
                self._base_url + path,
                json=json,
                params=params,
                headers=headers,
                timeout=self._timeout if slow else self._lookup_timeout,
            )
        except httpx.TransportError as exc:
            # Paths can hold billing keys, so neither the URL nor the exception text is logged.
            _log.warning("toss %s: no response (%s)", operation, type(exc).__name__)
            raise TossOutcomeUnknown(operation, type(exc).__name__) from None
        _log.debug("toss %s: HTTP %s", operation, response.status_code)
        if response.is_success:
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                raise TossMalformedResponse(operation, "2xx body is not JSON") from None
        raise self._error(operation, response)

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
        error = TossError(code, message, response.status_code, operation)
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
