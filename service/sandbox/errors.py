"""Toss-shaped error responses: ``{"code", "message"}`` with the status from the code table.

Messages are Korean, or English when the request says ``Accept-Language: en-US`` (reference
§1). The English texts follow Toss's English error table where it is known and are the
sandbox's own wording otherwise; callers act on ``code``, never on the message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response

from service.toss import ERROR_CODES

Language = Literal["ko", "en"]

# Not a documented code: the sandbox's answer when its rate limit is exceeded (the shape of
# Toss's test-environment 429 is undocumented, reference §12).
TOO_MANY_REQUESTS = ("TOO_MANY_REQUESTS", "요청이 너무 많습니다. 잠시 후 다시 시도해주세요.")

ENGLISH: Mapping[str, str] = {
    "UNAUTHORIZED_KEY": "Unauthorized secret key or client key.",
    "INVALID_API_KEY": "Incorrect secret key.",
    "INCORRECT_BASIC_AUTH_FORMAT": "Invalid request. Encode the credentials including ':'.",
    "FORBIDDEN_REQUEST": "The request is not allowed.",
    "NOT_SUPPORTED_METHOD": "The payment method is not supported.",
    "NOT_FOUND_HTTP_METHOD": "The requested API was not found.",
    "INVALID_REQUEST": "The bad request.",
    "INVALID_REQUIRED_PARAM": "A required parameter is missing.",
    "INVALID_ORDER_ID": (
        "orderId must be 6 to 64 characters of letters, numbers, '-', '_' or '='."
    ),
    "INVALID_ORDER_NAME": "orderName must be 1 to 100 characters.",
    "INVALID_CUSTOMER_KEY": "customerKey must be 2 to 300 characters.",
    "INVALID_EMAIL": "The email address is not valid.",
    "BELOW_MINIMUM_AMOUNT": (
        "Payment can be made from 100 won or more by credit card, and 200 won or more for account."
    ),
    "BELOW_ZERO_AMOUNT": "The amount must be greater than 0.",
    "NOT_MATCHES_CUSTOMER_KEY": (
        "The customerKey does not match the one the billing key was issued for."
    ),
    "INVALID_IDEMPOTENCY_KEY": "The idempotency key must be at most 300 characters.",
    "NOT_FOUND_PAYMENT": "The payment does not exist.",
    "NOT_FOUND_PAYMENT_SESSION": "The payment session has expired.",
    "INVALID_CARD_INSTALLMENT_PLAN": "The installment plan is not valid.",
    "NOT_SUPPORTED_INSTALLMENT_PLAN_CARD_OR_MERCHANT": (
        "Installments are not supported for this card or merchant."
    ),
    "NOT_SUPPORTED_MONTHLY_INSTALLMENT_PLAN": "Installments are not supported.",
    "EXCEED_MAX_CARD_INSTALLMENT_PLAN": "Maximum number of installment months exceeded.",
    "NOT_CANCELABLE_PAYMENT": "The payment cannot be canceled.",
    "EXCEED_MAX_REFUND_DUE": "The refund period has passed.",
    "NOT_ALLOWED_PARTIAL_REFUND": "This payment cannot be partially refunded.",
    "NOT_ALLOWED_PARTIAL_REFUND_WAITING_DEPOSIT": (
        "A payment waiting for deposit cannot be partially refunded."
    ),
    "REFUND_REJECTED": "The refund was rejected. Please contact the payment provider.",
    "INVALID_REFUND_ACCOUNT_INFO": "The refund account number and holder do not match.",
    "INVALID_REFUND_ACCOUNT_NUMBER": "The refund account number is not valid.",
    "INVALID_BANK": "The bank is not valid.",
    "FORBIDDEN_BANK_REFUND_REQUEST": "The customer's account cannot receive deposits.",
    "EXCEED_CANCEL_AMOUNT_DISCOUNT_AMOUNT": (
        "An amount below the instant discount cannot be partially canceled."
    ),
    "NOT_CANCELABLE_PAYMENT_FOR_DORMANT_USER": (
        "A payment of a dormant member cannot be canceled."
    ),
    "EXCEED_CANCEL_LIMIT": "The cancelable limit has been exceeded.",
    "INVALID_BILLING_AUTH": "The billing authorization is not valid.",
    "INVALID_BILL_KEY_REQUEST": "The billing key request is not authorized.",
    "ALREADY_REMOVED_BILLING_KEY": "The billing key has already been deleted.",
    "BILLING_KEY_NOT_FOUND": "The billing key does not exist.",
    "NOT_FOUND_BILLING": "The billing authorization does not exist.",
    "INVALID_CARD_NUMBER": "Please check the card number again.",
    "INVALID_CARD_EXPIRATION": "Please check the card expiration date information again.",
    "INVALID_STOPPED_CARD": "The card has been suspended.",
    "INVALID_REJECT_CARD": "Refer to card issuer/decline.",
    "INVALID_CARD_LOST_OR_STOLEN": "The card has been reported lost or stolen.",
    "NOT_SUPPORTED_CARD_TYPE": "The card type is not supported.",
    "NOT_REGISTERED_CARD_COMPANY": "Please register the card for use first.",
    "INVALID_CARD_PASSWORD": "Please check the card password again.",
    "INVALID_CARD_IDENTITY": ("The birth date or business number does not match the card owner."),
    "INVALID_BIRTH_DAY_FORMAT": "The birth date must be 6 digits (yyMMdd).",
    "EXCEED_MAX_AUTH_COUNT": (
        "The maximum number of authentications was exceeded. Please contact the card issuer."
    ),
    "REJECT_CARD_PAYMENT": "Payment failed: the limit was exceeded or the balance is too low.",
    "REJECT_CARD_COMPANY": "The card company rejected the payment.",
    "REJECT_ACCOUNT_PAYMENT": "Payment failed: the account balance is too low.",
    "EXCEED_MAX_DAILY_PAYMENT_COUNT": "The daily number of payments has been exceeded.",
    "EXCEED_MAX_PAYMENT_AMOUNT": "The daily payment amount has been exceeded.",
    "EXCEED_MAX_AMOUNT": "The transaction amount limit has been exceeded.",
    "EXCEED_MAX_ONE_DAY_AMOUNT": "The daily limit has been exceeded.",
    "DUPLICATED_ORDER_ID": (
        "The orderId has already been approved or canceled. Use a different orderId."
    ),
    "ALREADY_PROCESSED_PAYMENT": "This is a payment that has already been processed.",
    "ALREADY_CANCELED_PAYMENT": "The payment has already been canceled.",
    "NOT_CANCELABLE_AMOUNT": "The amount cannot be canceled.",
    "NOT_MATCHES_REFUNDABLE_AMOUNT": "The refundable amount does not match.",
    "ALREADY_REFUND_PAYMENT": "The payment has already been refunded.",
    "IDEMPOTENT_REQUEST_PROCESSING": "The previous request with this key is still processing.",
    "FAILED_DB_PROCESSING": "A database error occurred because of an invalid request value.",
    "PROVIDER_ERROR": "This is temporary error. Please try again in a few minutes.",
    "FORBIDDEN_CONSECUTIVE_REQUEST": (
        "Repeated requests are not allowed. Please try again in a few minutes."
    ),
    "NOT_AVAILABLE_BANK": "The bank is outside its service hours.",
    "FAILED_INTERNAL_SYSTEM_PROCESSING": (
        "Internal processing failed. Please try again in a few minutes."
    ),
    "FAILED_PAYMENT_INTERNAL_SYSTEM_PROCESSING": (
        "The payment was not completed. Please try again."
    ),
    "FAILED_CARD_COMPANY_RESPONSE": (
        "An error occurred at the card company. Please try again in a few minutes."
    ),
    "FAILED_BILL_KEY_AUTH_CREATION": "Creating the key failed during billing authorization.",
    "FAILED_REFUND_PROCESS": "The refund failed because of a bank delay or a temporary error.",
    "FAILED_METHOD_HANDLING_CANCEL": (
        "A temporary error occurred while canceling with the payment method."
    ),
    "FAILED_PARTIAL_REFUND": "The partial refund failed (bank maintenance, closed account).",
    "COMMON_ERROR": "This is temporary error. Please try again in a few minutes.",
    "UNKNOWN_ERROR": "An unknown error occurred.",
    "UNKNOWN_PAYMENT_ERROR": "The payment failed. Please try again in a few minutes.",
    TOO_MANY_REQUESTS[0]: "Too many requests. Please try again later.",
}


def language(request: Request) -> Language:
    """``en`` when the first language the request accepts is English (``en-US``, ``en``)."""
    first = request.headers.get("Accept-Language", "").split(",", 1)[0]
    tag = first.split(";", 1)[0].strip().lower()
    return "en" if tag == "en" or tag.startswith("en-") else "ko"


class ApiError(Exception):
    """Raised anywhere in the sandbox to answer with a Toss error body."""

    def __init__(self, code: str, message: str | None = None, status: int | None = None) -> None:
        spec = ERROR_CODES.get(code)
        # Codes outside the table (e.g. an arbitrary TossPayments-Test-Code) default to 400.
        self.code = code
        self.status = status if status is not None else (spec.http_status if spec else 400)
        self.message = message if message is not None else (spec.message if spec else code)
        self._custom = message
        super().__init__(f"{self.status} {code}")

    def message_in(self, lang: Language) -> str:
        if lang == "ko":
            return self.message
        # A detail written for this error is used when it is English already; otherwise the
        # code's English text, so no Korean reaches an en-US caller.
        if self._custom is not None and self._custom.isascii():
            return self._custom
        return ENGLISH.get(self.code, self.code)

    def body(self, lang: Language = "ko") -> dict[str, str]:
        return {"code": self.code, "message": self.message_in(lang)}

    def response(self, lang: Language = "ko", headers: Mapping[str, str] | None = None) -> Response:
        return json_response(self.body(lang), self.status, headers)


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(
    payload: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        json_bytes(payload), status_code=status, media_type="application/json", headers=headers
    )
