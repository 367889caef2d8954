"""Who the demo's subscribers are and what each of them does, decided up front from a seed.

Everything here is plain data: the same (subscribers, days, seed) gives the same plan, and the
driver (``service.demo.run``) turns it into calls on the running system. What the system then does
(charges, declines, dunning, endings) is its own business; the plan only says what people and Toss
do: join, pay with a given test card, cancel, resume, use credits, fix a card, get a refund, or
lose their billing key at Toss.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, replace
from enum import StrEnum


class Persona(StrEnum):
    STEADY = "steady"  # a card that always pays
    RENEWAL_DECLINE_RECOVERS = "renewal_decline_recovers"  # pays N times, declines, new card
    RENEWAL_DECLINE_LOST = "renewal_decline_lost"  # pays N times, declines until dunning ends
    SIGNUP_DECLINE_FIXES = "signup_decline_fixes"  # first charge declined, another card at once
    SIGNUP_DECLINE_ABANDONS = "signup_decline_abandons"  # first charge declined, gives up
    KEY_DELETED = "key_deleted"  # Toss deletes the billing key (BILLING_DELETED)
    CANCELS = "cancels"  # cancels at period end (some resume)


# (persona, weight): most subscribers simply pay.
_MIX: tuple[tuple[Persona, int], ...] = (
    (Persona.STEADY, 52),
    (Persona.RENEWAL_DECLINE_RECOVERS, 10),
    (Persona.RENEWAL_DECLINE_LOST, 7),
    (Persona.SIGNUP_DECLINE_FIXES, 6),
    (Persona.SIGNUP_DECLINE_ABANDONS, 5),
    (Persona.KEY_DELETED, 8),
    (Persona.CANCELS, 12),
)

# The sandbox's test cards that fail every charge (service/sandbox/cards.py), by the number's start.
SIGNUP_DECLINE_PREFIXES = (
    "4000000001",  # REJECT_CARD_PAYMENT
    "4000000002",  # INVALID_STOPPED_CARD
    "4000000003",  # EXCEED_MAX_DAILY_PAYMENT_COUNT
    "4000000004",  # REJECT_CARD_COMPANY
    "4000000005",  # INVALID_CARD_LOST_OR_STOLEN
    "4000000006",  # FAILED_CARD_COMPANY_RESPONSE (500: looked up, retried, then dunning)
    "433012",  # card type 미확인: NOT_SUPPORTED_CARD_TYPE
)
_NEEDS_RENEWAL = frozenset({Persona.RENEWAL_DECLINE_RECOVERS, Persona.RENEWAL_DECLINE_LOST})
# Cards that always pay, by issuer (the sandbox picks the issuer from the first digit).
_GOOD_PREFIXES = ("9410", "5310", "3610", "6210")


# Namespace of the demo's user ids (uuid5), so a seed always signs up the same users.
_USERS = uuid.UUID("5a1d7e00-0000-4000-8000-000000000001")


@dataclass(frozen=True, slots=True)
class Subscriber:
    index: int
    persona: Persona
    join_day: int
    card: str  # the first card's number
    credits_per_month: int  # how many saju tests they try to use a month
    fix_after_days: int | None = None  # when a card is needed: a new one this many days later
    cancel_day: int | None = None
    resume_after_days: int | None = None
    refund_day: int | None = None
    refund_amount: int | None = None  # None: the whole payment
    key_delete_day: int | None = None
    browser: bool = False  # registers through headless Chromium

    @property
    def user_id(self) -> str:
        """The subscriber's Supabase Auth user id (the JWT sub): the same on every run."""
        return str(uuid.uuid5(_USERS, f"demo-user-{self.index:04d}"))

    @property
    def email(self) -> str:
        return f"subscriber{self.index:04d}@demo.saju.example"

    def good_card(self, n: int) -> str:
        """This subscriber's n-th card that always pays (n = 0, 1, …), unique in the demo."""
        prefix = _GOOD_PREFIXES[(self.index + n) % len(_GOOD_PREFIXES)]
        return f"{prefix}{n:02d}{self.index:06d}{(self.index * 7 + n) % 10000:04d}"


def _unique(prefix: str, index: int) -> str:
    # The sandbox counts approvals per card number, so every subscriber has numbers of their own.
    return (prefix + f"{index:06d}" + "0" * 16)[:16]


def plan(subscribers: int, days: int, seed: int, browser: int = 3) -> list[Subscriber]:
    """The demo's cast: ``subscribers`` people over ``days`` days; the first ``browser`` of those
    who join on day 0 with a card that pays register through a real browser."""
    if subscribers < 1 or days < 28:
        raise ValueError("the demo needs at least one subscriber and one month")
    rng = random.Random(seed)  # noqa: S311 - a reproducible cast, not a secret
    personas = [p for p, _ in _MIX]
    weights = [w for _, w in _MIX]
    cast: list[Subscriber] = []
    browsers = 0
    last_join = max(1, days * 2 // 3)
    for i in range(1, subscribers + 1):
        persona = rng.choices(personas, weights)[0]
        # A renewal decline needs at least one renewal (and the dunning after it) inside the demo.
        latest = last_join if persona not in _NEEDS_RENEWAL else max(0, days - 45)
        join = 0 if rng.random() < 0.4 else rng.randint(1, max(1, latest))
        sub = Subscriber(
            index=i,
            persona=persona,
            join_day=join,
            card="",
            credits_per_month=rng.choice((0, 1, 2, 3, 4, 5, 6, 8, 10, 12)),
        )
        left = days - join  # days of the demo this subscriber is around for
        if persona in _NEEDS_RENEWAL:
            paid = rng.randint(1, max(1, min(9, (left - 10) // 31)))
            sub = replace(sub, card=_unique(f"400000001{paid}", i))
            if persona is Persona.RENEWAL_DECLINE_RECOVERS:
                sub = replace(sub, fix_after_days=rng.randint(0, 5))
        elif persona in (Persona.SIGNUP_DECLINE_FIXES, Persona.SIGNUP_DECLINE_ABANDONS):
            sub = replace(sub, card=_unique(rng.choice(SIGNUP_DECLINE_PREFIXES), i))
            if persona is Persona.SIGNUP_DECLINE_FIXES:
                sub = replace(sub, fix_after_days=0)  # an incomplete subscription waits a day
        elif persona is Persona.KEY_DELETED:
            sub = replace(sub, key_delete_day=join + rng.randint(1, max(1, min(60, left - 2))))
            if rng.random() < 0.6:
                sub = replace(sub, fix_after_days=rng.randint(0, 5))
        elif persona is Persona.CANCELS:
            sub = replace(sub, cancel_day=join + rng.randint(1, max(1, left - 1)))
            if rng.random() < 0.3:
                sub = replace(sub, resume_after_days=rng.randint(1, 6))
        elif rng.random() < 0.12:
            sub = replace(
                sub,
                refund_day=join + rng.randint(1, max(1, left - 1)),
                refund_amount=rng.choice((None, 3300, 4950)),
            )
        if not sub.card:
            sub = replace(sub, card=sub.good_card(0))
        if join == 0 and persona is Persona.STEADY and browsers < browser:
            sub = replace(sub, browser=True)
            browsers += 1
        cast.append(sub)
    return cast
