"""Merchants: the key sets the sandbox accepts, and each merchant's own isolated state.

A merchant is a MID with its keys: secret keys (``*_sk_``, widget ``*_gsk_``, legacy
``*_ak_``) and client keys (``*_ck_``, ``*_gck_``), all test or all live (Toss keeps test and
live data apart, so a test key never sees live data and vice versa). A request is served with
the data of the merchant its secret key belongs to; any other key is 401 UNAUTHORIZED_KEY.

A merchant is written as its keys joined by ``:`` (a Toss key never contains one), e.g.
``test_ck_…:test_sk_…``. The command takes ``--secret-key`` once per merchant, and/or a file
or an environment variable holding such specs separated by whitespace (``#`` starts a comment).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import httpx

from service.sandbox.clock import Clock
from service.sandbox.faults import FaultInjector
from service.sandbox.idempotency import IdempotencyStore, secret_digest
from service.sandbox.store import Store
from service.sandbox.webhooks import WebhookDispatcher
from service.toss import check_secret_key

# Toss's public documentation keys (API 개별 연동 키 and 결제위젯 연동 키 of one test MID);
# they move no money. The merchant a sandbox has when no key is configured.
DOCS_TEST_MERCHANT = (
    "test_ck_D5GePWvyJnrK0W0k6q8gLzN97Eoq"
    ":test_sk_zXLkKEypNArWmo50nX3lmeaxYG5R"
    ":test_gck_docs_Ovk5rk1EwkEbP0W43n07xlzm"
    ":test_gsk_docs_OaPz8L5KdmQXkzRz3y47BMw6"
)
SECRET_KEYS_ENV = "SAJU_SANDBOX_SECRET_KEYS"  # noqa: S105 - a variable name, not a key
# Reference §12: "100 requests per minute per API" in the test environment.
TEST_RATE_LIMIT_PER_MINUTE = 100
RATE_WINDOW = timedelta(minutes=1)

_KEY = re.compile(r"(test|live)_(sk|gsk|ak|ck|gck)_[!-~]+")
_SECRET_KINDS = ("sk", "gsk", "ak")
CancelWebhooks = Literal["status_change", "every_cancel", "none"]


@dataclass(frozen=True, slots=True)
class MerchantKeys:
    m_id: str
    live: bool
    secret_digests: frozenset[str]
    # Client keys are public (they are in every checkout page), so they are kept as they are.
    client_keys: frozenset[str]

    def __repr__(self) -> str:
        return (
            f"MerchantKeys(m_id={self.m_id!r}, live={self.live}, "
            f"<{len(self.secret_digests)} secret keys hidden>, "
            f"client_keys={sorted(self.client_keys)!r})"
        )


def parse_merchant(spec: str, m_id: str) -> MerchantKeys:
    """One merchant from ``key[:key…]``; ValueError names the problem, never the key."""
    keys = spec.split(":")
    secrets: set[str] = set()
    clients: set[str] = set()
    modes: set[str] = set()
    for key in keys:
        check_secret_key(key)
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"merchant {m_id}: a key is not a Toss key "
                "(expected test_/live_ followed by sk_, gsk_, ak_, ck_ or gck_)"
            )
        modes.add(match.group(1))
        (secrets if match.group(2) in _SECRET_KINDS else clients).add(key)
    if not secrets:
        raise ValueError(f"merchant {m_id}: no secret key (test_sk_…, live_sk_…)")
    if len(modes) > 1:
        raise ValueError(
            f"merchant {m_id}: mixes test and live keys; give each mode its own merchant"
        )
    return MerchantKeys(
        m_id=m_id,
        live=modes == {"live"},
        secret_digests=frozenset(secret_digest(k) for k in secrets),
        client_keys=frozenset(clients),
    )


def parse_merchants(specs: Sequence[str]) -> tuple[MerchantKeys, ...]:
    """Merchants in order; the first is ``tvivarepublica`` (the docs' test MID), then …2, …3."""
    merchants = tuple(
        parse_merchant(spec, "tvivarepublica" + (str(i + 1) if i else ""))
        for i, spec in enumerate(specs)
    )
    if not merchants:
        raise ValueError("no merchant configured")
    seen: set[str] = set()
    for merchant in merchants:
        for key in (*merchant.secret_digests, *merchant.client_keys):
            if key in seen:
                raise ValueError(f"merchant {merchant.m_id}: a key belongs to two merchants")
            seen.add(key)
    return merchants


def split_specs(text: str) -> list[str]:
    """Merchant specs from a file's or an environment variable's text."""
    specs: list[str] = []
    for line in text.splitlines():
        specs.extend(line.split("#", 1)[0].split())
    return specs


def load_specs(cli: Iterable[str], file: str | None, environ: dict[str, str]) -> list[str]:
    """The command's merchants: ``--secret-key`` values, then the file, then the variable."""
    specs = list(cli)
    if file is not None:
        with open(file, encoding="utf-8") as handle:
            specs += split_specs(handle.read())
    specs += split_specs(environ.get(SECRET_KEYS_ENV, ""))
    return specs


class RateLimiter:
    """``per_minute`` requests per (secret key, API) in any sliding minute of the sandbox clock.

    The sandbox clock is used so tests move past a window with ``clock/advance`` instead of
    sleeping; with a wall-time clock (the command's default) it is real time.
    """

    def __init__(self, clock: Clock, per_minute: int | None) -> None:
        self._clock = clock
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._hits: dict[tuple[str, str], deque[datetime]] = {}
        self._refused: dict[str, int] = {}

    def admit(self, key_digest: str, api: str) -> float | None:
        """None when the request may go on, else the seconds until it would be admitted."""
        if self.per_minute is None:
            return None
        now = self._clock.now()
        with self._lock:
            hits = self._hits.setdefault((key_digest, api), deque())
            while hits and now - hits[0] >= RATE_WINDOW:
                hits.popleft()
            if len(hits) >= self.per_minute:
                self._refused[api] = self._refused.get(api, 0) + 1
                return (hits[0] + RATE_WINDOW - now).total_seconds()
            hits.append(now)
            return None

    def listing(self) -> dict[str, object]:
        """The limit and how many requests it refused, per API (what a benchmark counts)."""
        with self._lock:
            return {"perMinute": self.per_minute, "refused": dict(self._refused)}

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()
            self._refused.clear()


class Merchant:
    """One merchant's data: billing keys, payments, transactions, idempotency, webhooks."""

    def __init__(
        self,
        keys: MerchantKeys,
        clock: Clock,
        *,
        webhook_url: str | None,
        webhook_transport: httpx.AsyncBaseTransport | None,
        second_delete: Literal["error", "ok"],
        record_failed_charges: bool,
        cancel_webhooks: CancelWebhooks,
        rate_limit: int | None,
        faults: FaultInjector | None = None,
    ) -> None:
        self.keys = keys
        self.webhooks = WebhookDispatcher(clock, webhook_url, webhook_transport, faults)
        self.store = Store(
            clock,
            self.webhooks.emit,
            m_id=keys.m_id,
            second_delete=second_delete,
            record_failed_charges=record_failed_charges,
            cancel_webhooks=cancel_webhooks,
        )
        self.idempotency = IdempotencyStore(clock)
        # Toss documents a number for the test environment only.
        self.limiter = RateLimiter(clock, None if keys.live else rate_limit)

    def reset(self) -> None:
        self.store.reset()
        self.idempotency.reset()
        self.webhooks.reset()
        self.limiter.reset()
