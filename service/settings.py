"""The service's configuration, read once from the environment (``SAJU_*``).

Secrets are ``SecretStr``: they never show in a repr, a log line or an error. A missing or
malformed setting stops the service at start-up with a message naming the variable.
"""

from __future__ import annotations

import socket
from datetime import timedelta

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.crypto import Keyring, KeyringError
from service.toss import DEFAULT_BASE_URL, SecretKey


class SettingsError(Exception):
    """The environment does not describe a runnable service; the message says what to set."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAJU_", frozen=True, extra="ignore")

    # The database, reached as a login that may SET ROLE to the service's role.
    database_url: SecretStr
    db_role: str = "billing_service"
    db_pool_size: int = Field(default=8, ge=1, le=100)
    # How long a request waits for a connection before it is answered 503 DATABASE_UNAVAILABLE.
    db_pool_timeout_s: float = Field(default=30.0, gt=0, le=600)

    # Toss: the secret key (the only holder), the public client key for the card page.
    toss_secret_key: SecretStr
    toss_client_key: str = ""
    toss_api_url: str = DEFAULT_BASE_URL
    toss_sdk_url: str = "https://js.tosspayments.com/v2/standard"
    # Toss documents up to 60 s for a charge; never less.
    toss_charge_timeout_s: float = Field(default=60.0, ge=60.0)
    toss_lookup_timeout_s: float = Field(default=30.0, ge=1.0)

    # Billing keys at rest: "id:base64key[,id:base64key…]" and the active id (default: first).
    billing_keyring: SecretStr
    billing_active_key_id: str | None = None

    # What pg_net sends to the doorbell (Bearer); not a strong secret (see README).
    doorbell_token: SecretStr

    # Where Toss's redirects reach this service, and where subscribers go afterwards.
    public_url: str = "http://127.0.0.1:8000"
    app_url: str = "http://127.0.0.1:3000/billing"

    # The work loop.
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}")
    concurrency: int = Field(default=16, ge=1, le=256)
    batch: int = Field(default=20, ge=1, le=100)
    lease_s: int = Field(default=120, ge=10, le=3600)
    poll_s: float = Field(default=30.0, ge=0.5)
    # Toss's test environment allows about 100 requests a minute per API; a live contract more.
    rate_per_minute: int = Field(default=100, ge=1)
    shutdown_grace_s: float = Field(default=30.0, ge=0)

    # Notifications to the product's app (Standard Webhooks); without a URL they are only logged.
    notify_url: str | None = None
    notify_secret: SecretStr | None = None

    @field_validator("toss_secret_key")
    @classmethod
    def _secret_key_shape(cls, value: SecretStr) -> SecretStr:
        SecretKey(value.get_secret_value())  # raises with a message that shows no key
        return value

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_s)

    def secret_key(self) -> SecretKey:
        return SecretKey(self.toss_secret_key.get_secret_value())

    def keyring(self) -> Keyring:
        return Keyring.parse(self.billing_keyring.get_secret_value(), self.billing_active_key_id)


def load() -> Settings:
    """The settings, or SettingsError naming every variable that is missing or wrong."""
    try:
        settings = Settings()  # type: ignore[call-arg]  # filled from the environment
        settings.keyring()
    except ValidationError as exc:
        problems = [
            f"SAJU_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        ]
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems)) from None
    except KeyringError as exc:
        raise SettingsError(f"invalid configuration:\n  SAJU_BILLING_KEYRING: {exc}") from None
    return settings
