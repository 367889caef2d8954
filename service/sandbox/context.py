"""The sandbox's configuration and the state objects one app instance owns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import httpx
from starlette.requests import Request

from service.sandbox.clock import Clock
from service.sandbox.faults import FaultInjector
from service.sandbox.idempotency import IdempotencyStore
from service.sandbox.store import Store
from service.sandbox.webhooks import WebhookDispatcher


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    # None accepts any test_/live_ secret key (sk, gsk, legacy ak) like a stand-in should;
    # a tuple accepts only those keys (others get 401 UNAUTHORIZED_KEY).
    secret_keys: tuple[str, ...] | None = None
    second_delete: Literal["error", "ok"] = "error"
    record_failed_charges: bool = False
    control_api: bool = True

    @property
    def live_mode(self) -> bool:
        """Configured with a live key: the control API (faults, clock, ledger) is off."""
        return any(key.startswith("live_") for key in self.secret_keys or ())

    def __repr__(self) -> str:
        # Configured keys are secrets too.
        keys = "None" if self.secret_keys is None else f"<{len(self.secret_keys)} hidden>"
        return (
            f"SandboxConfig(secret_keys={keys}, second_delete={self.second_delete!r}, "
            f"record_failed_charges={self.record_failed_charges}, "
            f"control_api={self.control_api})"
        )


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
        self.webhooks = WebhookDispatcher(clock, webhook_url, webhook_transport)
        self.store = Store(
            clock,
            self.webhooks.emit,
            second_delete=config.second_delete,
            record_failed_charges=config.record_failed_charges,
        )
        self.idempotency = IdempotencyStore(clock)
        self.faults = FaultInjector(seed)

    def reset(self, seed: int | None = None) -> None:
        """Forget everything: keys, payments, idempotency, faults, webhooks, clock offset."""
        self.store.reset()
        self.idempotency.reset()
        self.faults.reset(seed)
        self.webhooks.reset()
        self.clock.reset()


def sandbox_of(request: Request) -> Sandbox:
    sandbox: Sandbox = request.app.state.sandbox
    return sandbox
