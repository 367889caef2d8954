"""Cards the sandbox accepts, and the test cards that fail on purpose.

Real Toss test mode accepts any card whose BIN is real and approves everything; the sandbox
accepts any 13-19 digit number and approves it, except for these numbers (the rest of the
number is free):

=====================  =====================================================================
number starts with     behaviour
=====================  =====================================================================
``4000000001``         charge declined: 403 REJECT_CARD_PAYMENT (한도초과/잔액부족)
``4000000002``         charge declined: 400 INVALID_STOPPED_CARD (정지된 카드)
``4000000003``         charge declined: 400 EXCEED_MAX_DAILY_PAYMENT_COUNT
``4000000004``         charge declined: 403 REJECT_CARD_COMPANY
``4000000005``         charge declined: 400 INVALID_CARD_LOST_OR_STOLEN
``4000000006``         charge fails: 500 FAILED_CARD_COMPANY_RESPONSE (nothing is charged)
``400000001N``         approved N times (N = 1..9, counted per card number), then 403
                       REJECT_CARD_PAYMENT on every later charge
``433012``, ``552022`` issued with cardType 미확인; charge fails 400 NOT_SUPPORTED_CARD_TYPE
                       (as measured on Toss's test API)
=====================  =====================================================================

Registration (the SDK card form and ``/v1/billing/authorizations/card``) checks the format
only: a number of 13-19 digits, a 2-digit month and year not in the past, and a birth date
``YYMMDD`` or a 10-digit business number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from service.toss import KST

_DECLINES = {
    "4000000001": "REJECT_CARD_PAYMENT",
    "4000000002": "INVALID_STOPPED_CARD",
    "4000000003": "EXCEED_MAX_DAILY_PAYMENT_COUNT",
    "4000000004": "REJECT_CARD_COMPANY",
    "4000000005": "INVALID_CARD_LOST_OR_STOLEN",
    "4000000006": "FAILED_CARD_COMPANY_RESPONSE",
}
_LIMITED = re.compile(r"400000001([1-9])")
_UNKNOWN_TYPE_BINS = ("433012", "552022")
# Issuer by leading digit; 94… is 하나(21) as measured, the others are plausible fillers.
_ISSUERS = {"3": "31", "4": "61", "5": "41", "9": "21"}

DEFAULT_TEST_CARD = "9410001234567890"


class CardRejected(Exception):
    """A card failed registration checks; ``code`` is Toss's error code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class Card:
    number: str
    expiration_year: str
    expiration_month: str
    issuer_code: str
    card_type: str
    owner_type: str

    @property
    def masked(self) -> str:
        """Toss's masking, e.g. ``43301234****123*``."""
        n = self.number
        if len(n) < 14:
            return n[:6] + "*" * (len(n) - 6)
        return n[:8] + "****" + n[12:-1] + "*"

    def charge_failure(self, approved_before: int) -> str | None:
        """Error code this card answers a charge with, given its earlier approvals."""
        if self.card_type == "미확인":
            return "NOT_SUPPORTED_CARD_TYPE"
        limited = _LIMITED.match(self.number)
        if limited:
            allowed = int(limited.group(1))
            return "REJECT_CARD_PAYMENT" if approved_before >= allowed else None
        return _DECLINES.get(self.number[:10])


def register_card(
    number: str, expiration_year: str, expiration_month: str, identity: str, now: datetime
) -> Card:
    """Validate card data the way registration does; raise CardRejected with Toss's code."""
    if not re.fullmatch(r"\d{13,19}", number):
        raise CardRejected("INVALID_CARD_NUMBER")
    if not (re.fullmatch(r"\d{2}", expiration_year) and re.fullmatch(r"\d{2}", expiration_month)):
        raise CardRejected("INVALID_CARD_EXPIRATION")
    year, month = 2000 + int(expiration_year), int(expiration_month)
    local = now.astimezone(KST)
    if not 1 <= month <= 12 or (year, month) < (local.year, local.month):
        raise CardRejected("INVALID_CARD_EXPIRATION")
    if not (_is_birth_date(identity) or re.fullmatch(r"\d{10}", identity)):
        raise CardRejected("INVALID_BIRTH_DAY_FORMAT")
    unknown_type = number.startswith(_UNKNOWN_TYPE_BINS)
    return Card(
        number=number,
        expiration_year=expiration_year,
        expiration_month=expiration_month,
        issuer_code=_ISSUERS.get(number[0], "11"),
        card_type="미확인" if unknown_type else "신용",
        owner_type="미확인" if unknown_type else ("법인" if len(identity) == 10 else "개인"),
    )


def _is_birth_date(value: str) -> bool:
    if not re.fullmatch(r"\d{6}", value):
        return False
    try:
        datetime.strptime(value, "%y%m%d")
    except ValueError:
        return False
    return True
