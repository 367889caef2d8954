"""The sandbox's configuration and the state objects one app instance owns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import httpx
from starlette.requests import Request

from service.sandbox.clock import Clock
from service.sandbox.faults import FaultInjector
from service.sandbox.idempotency import IdempotencyStore, secret_digest
from service.sandbox.merchants import (
    TEST_RATE_LIMIT_PER_MINUTE,
    CancelWebhooks,
    Merchant,
    MerchantKeys,
)
from service.sandbox.store import Store
from service.sandbox.webhooks import WebhookDispatcher


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    merchants: tuple[MerchantKeys, ...]
    second_delete: Literal["error", "ok"] = "error"
    record_failed_charges: bool = False
    control_api: bool = True
    # Requests per minute per secret key and API for test keys; None turns the limit off.
    rate_limit: int | None = TEST_RATE_LIMIT_PER_MINUTE
    cancel_webhooks: CancelWebhooks = "status_change"

    @property
    def live_mode(self) -> bool:
        """Configured with a live key: the control API (faults, clock, ledger) is off."""
        return any(merchant.live for merchant in self.merchants)


class Sandbox:
    def __init__(
        self,
        config: SandboxConfig,
        clock: Clock,
        *,
        seed: int = 0,
        webhook_url: str | None = None,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.faults = FaultInjector(seed)
        self.merchants = tuple(
            Merchant(
                keys,
                clock,
                webhook_url=webhook_url,
                webhook_transport=webhook_transport,
                second_delete=config.second_delete,
                record_failed_charges=config.record_failed_charges,
                cancel_webhooks=config.cancel_webhooks,
                rate_limit=config.rate_limit,
                faults=self.faults,
            )
            for keys in config.merchants
        )
        self._by_secret = {d: m for m in self.merchants for d in m.keys.secret_digests}
        self._by_client_key = {k: m for m in self.merchants for k in m.keys.client_keys}

    def merchant_for_secret(self, secret_key: str) -> Merchant | None:
        return self._by_secret.get(secret_digest(secret_key))

    def merchant_for_client_key(self, client_key: str) -> Merchant | None:
        return self._by_client_key.get(client_key)

    @property
    def default(self) -> Merchant:
        """The first configured merchant: what the control API acts on without a key."""
        return self.merchants[0]

    # The default merchant's parts, for tests and the control API.
    @property
    def store(self) -> Store:
        return self.default.store

    @property
    def webhooks(self) -> WebhookDispatcher:
        return self.default.webhooks

    @property
    def idempotency(self) -> IdempotencyStore:
        return self.default.idempotency

    async def start(self) -> None:
        for merchant in self.merchants:
            await merchant.webhooks.start()

    async def stop(self) -> None:
        for merchant in self.merchants:
            await merchant.webhooks.stop()

    def reset(self, seed: int | None = None) -> None:
        """Forget everything: keys, payments, idempotency, rate windows, faults, webhooks,
        clock offset, for every merchant."""
        for merchant in self.merchants:
            merchant.reset()
        self.faults.reset(seed)
        self.clock.reset()


def sandbox_of(request: Request) -> Sandbox:
    sandbox: Sandbox = request.app.state.sandbox
    return sandbox
