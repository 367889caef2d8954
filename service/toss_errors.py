"""Toss's error codes, what each means for the caller, and the one classifier.

:class:`FailureClass` is the Python twin of the SQL enum ``billing.failure_class``: the same
labels in the same order, so a class computed here is stored as it is. Policy stays in SQL;
this module only says what an error response *is*:

* ``unprocessed``: Toss did not process the request (409 IDEMPOTENT_REQUEST_PROCESSING, any
  429). Only these may be re-sent with the same Idempotency-Key.
* ``transient``: processed, but temporary (PROVIDER_ERROR, FORBIDDEN_CONSECUTIVE_REQUEST, any
  5xx). Toss replays it under the same key for 15 days, so a retry is a new attempt (new
  orderId and key), and for a charge only after a lookup by orderId.
* ``decline``: the card refused this charge; a later dunning attempt may succeed.
* ``needs_new_card``: the billing key or card is unusable; the subscriber must act.
* ``reconcile``: Toss's state differs from ours (the order exists, already cancelled ...):
  look it up.
* ``bug``: our request or configuration is wrong, and every unknown 4xx code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

__all__ = [
    "ERROR_CODES",
    "CodeSpec",
    "FailureClass",
    "Operation",
    "TossChargeFailed",
    "TossError",
    "TossException",
    "TossMalformedResponse",
    "TossOutcomeUnknown",
    "TossReplyMismatch",
    "classify",
    "parse_retry_after",
]

_log = logging.getLogger("service.toss")


class FailureClass(StrEnum):
    """What an error response means for the caller; labels of SQL ``billing.failure_class``."""

    UNPROCESSED = "unprocessed"
    TRANSIENT = "transient"
    DECLINE = "decline"
    NEEDS_NEW_CARD = "needs_new_card"
    RECONCILE = "reconcile"
    BUG = "bug"


class Operation(StrEnum):
    ISSUE_BILLING_KEY = "issue_billing_key"
    CHARGE = "charge"
    CANCEL = "cancel"
    GET_PAYMENT = "get_payment"
    GET_PAYMENT_BY_ORDER = "get_payment_by_order"
    LIST_TRANSACTIONS = "list_transactions"
    DELETE_BILLING_KEY = "delete_billing_key"


@dataclass(frozen=True, slots=True)
class CodeSpec:
    """One row of the error table: HTTP status Toss uses, class, and Toss's (Korean) message."""

    http_status: int
    error_class: FailureClass
    message: str


def _group(error_class: FailureClass, rows: Mapping[str, tuple[int, str]]) -> dict[str, CodeSpec]:
    return {code: CodeSpec(status, error_class, msg) for code, (status, msg) in rows.items()}


# The code table (reference §9b): HTTP status, class and message of every known code, in one
# place. Statuses marked [UNC] in the reference use its recommendation. Messages are Toss's
# wording where the reference quotes it, otherwise a close paraphrase.
ERROR_CODES: Mapping[str, CodeSpec] = {
    **_group(
        FailureClass.BUG,
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
        FailureClass.NEEDS_NEW_CARD,
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
        FailureClass.DECLINE,
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
        FailureClass.RECONCILE,
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
        FailureClass.UNPROCESSED,
        {"IDEMPOTENT_REQUEST_PROCESSING": (409, "이전 멱등 요청이 처리중입니다.")},
    ),
    **_group(
        FailureClass.TRANSIENT,
        {
            # 500 "due to an invalid request value" (e.g. a 301-char customerKey). Every 5xx
            # is transient: Toss did process it, and for a charge only a lookup tells.
            "FAILED_DB_PROCESSING": (500, "잘못된 요청 값으로 처리 중 DB 에러가 발생했습니다."),
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


def classify(code: str, http_status: int | None = None) -> FailureClass:
    """Class of an error: Toss's ``code`` and, when known, the HTTP status it came with.

    Without a status (a code stored with a failed payment, ``Payment.failure``) the table's
    status is used. The status overrides the table: 429 was not processed, a 5xx is transient
    whatever its code. An unknown 4xx code is a bug: a blind retry cannot fix it.
    """
    spec = ERROR_CODES.get(code)
    status = http_status if http_status is not None else (spec.http_status if spec else 400)
    if status == 429:
        return FailureClass.UNPROCESSED
    if status >= 500:
        return FailureClass.TRANSIENT
    return spec.error_class if spec is not None else FailureClass.BUG


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# --------------------------------------------------------------------------- exceptions


class TossException(Exception):
    """Base of everything the Toss client raises about a call."""


class TossError(TossException):
    """Toss answered with an error response (or a lookup found a failed charge)."""

    def __init__(
        self,
        code: str,
        message: str,
        http_status: int,
        operation: Operation | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        self.operation = operation
        self.error_class = classify(code, http_status)
        # A 429's Retry-After, in seconds: how long Toss asks the caller to wait.
        self.retry_after = retry_after
        where = f" on {operation}" if operation else ""
        super().__init__(f"{code} (HTTP {http_status}){where}: {message}")

    @property
    def retry_same_request(self) -> bool:
        """True only when Toss did not process the request: re-send it with the same key."""
        return self.error_class is FailureClass.UNPROCESSED

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, http_status={self.http_status}, "
            f"error_class={self.error_class.value!r}, operation={self.operation!r}, "
            f"retry_after={self.retry_after!r})"
        )


class TossChargeFailed(TossError):
    """A lookup found the charge as a failed payment (``ABORTED`` or ``EXPIRED``).

    Carries the payment's ``failure`` code and message with the status the code table gives
    that code, so it classifies like the answer the charge itself got. Not a success, and
    not "not found": the attempt failed.
    """

    def __init__(
        self, code: str, message: str, operation: Operation, payment_key: str, status: str
    ) -> None:
        spec = ERROR_CODES.get(code)
        super().__init__(code, message, spec.http_status if spec else 400, operation)
        self.payment_key = payment_key
        self.payment_status = status


class TossOutcomeUnknown(TossException):
    """No usable response (timeout, transport error, deadline): the request may have run."""

    def __init__(self, operation: Operation, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"outcome of {operation} unknown: {reason}")


class TossMalformedResponse(TossOutcomeUnknown):
    """A 2xx response that could not be read; for a charge the money may have moved."""


class TossReplyMismatch(TossException):
    """A readable 2xx that does not answer the request that was sent.

    Toss replays the first response for a reused Idempotency-Key whatever the new body, so a
    reply for another order, amount or customer, or a charge that is not ``DONE``, means a bug
    or a key collision. Never a success; logged at ERROR so it alerts. ``field`` names what
    differs; ``expected`` and ``actual`` are never keys or secrets.
    """

    def __init__(self, operation: Operation, field: str, expected: object, actual: object) -> None:
        self.operation = operation
        self.field = field
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"reply to {operation} does not match the request: "
            f"{field} is {actual!r}, expected {expected!r}"
        )
        _log.error("toss %s: reply does not match the request (%s)", operation, field)
