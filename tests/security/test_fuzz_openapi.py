"""The service's HTTP API fuzzed from its own OpenAPI description (/openapi.json) with
schemathesis: every operation, valid and invalid requests generated from the schema, a fixed
seed and a modest number of examples. No answer may be a 5xx or disagree with the description,
and a refused request (4xx) leaves every table as it was.

The service runs without its background worker, so the only writes are those a request makes
itself; the Toss sandbox answers the success redirect's billing-key issue.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from liveserver import LiveServer
from loopkit import APP_URL, CLIENT_KEY, KEYRING, SECRET_KEY
from seckit import changed, contents

from service.app import build_app
from service.runtime.cluster import ADMIN_USER, Runtime
from service.sandbox.app import build_app as build_sandbox
from service.settings import Settings

EXAMPLES = 40


@pytest.fixture
def service(rt: Runtime, dbname: str) -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    with (
        LiveServer(
            build_sandbox(secret_keys=[f"{CLIENT_KEY}:{SECRET_KEY}"], rate_limit=None)
        ) as toss,
        psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as owner,
    ):
        settings_ = Settings(
            database_url=rt.dsn(dbname, "postgres"),  # type: ignore[arg-type]
            toss_secret_key=SECRET_KEY,  # type: ignore[arg-type]
            toss_client_key=CLIENT_KEY,
            toss_api_url=toss.url,
            toss_sdk_url=f"{toss.url}/v2/standard",
            billing_keyring=KEYRING,  # type: ignore[arg-type]
            doorbell_token=secrets.token_urlsafe(24),  # type: ignore[arg-type]
            app_url=APP_URL,
            worker_name="fuzz",
            poll_s=3600,
        )
        with LiveServer(build_app(settings_, run_worker=False)) as app:
            yield app.url, owner


def operations(url: str) -> list[schemathesis.APIOperation]:
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # No NUL characters in generated JSON: PostgreSQL's jsonb cannot hold them, so the service
    # refuses them (400), and Toss never sends them; a refusal of these is right, not a finding.
    loaded.config.generation.update(allow_x00=False)
    return [result.ok() for result in loaded.get_all_operations()]


def fuzz(
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    url: str,
    owner: psycopg.Connection[Any],
) -> int:
    """Sends the generated requests of one operation; returns how many were sent."""
    sent = 0

    # Hypothesis through schemathesis's Python API (its pytest plugin predates pytest 9).
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same requests on every run: CI stays reproducible and bounded
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: schemathesis.Case) -> None:
        nonlocal sent
        sent += 1
        before = contents(owner)
        response = case.call(base_url=url, timeout=60)
        case.validate_response(response)
        assert response.status_code < 500, (case.method, case.path, response.text)
        if response.status_code >= 400:
            assert changed(before, contents(owner)) == [], (case.method, case.path)

    one()
    return sent


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
def test_the_service_api_never_fails_and_refusals_change_nothing(
    service: tuple[str, psycopg.Connection[Any]], mode: schemathesis.GenerationMode
) -> None:
    url, owner = service
    found = operations(url)
    paths = {(op.method.upper(), op.path) for op in found}
    assert {("POST", "/webhooks/toss"), ("GET", "/billing/success")} <= paths
    for operation in found:
        if mode is schemathesis.GenerationMode.NEGATIVE and not has_inputs(operation):
            continue  # nothing to get wrong: no parameters, headers or body
        assert fuzz(operation, mode, url, owner) > 0, operation.path


def has_inputs(operation: schemathesis.APIOperation) -> bool:
    parts = (operation.query, operation.path_parameters, operation.headers, operation.body)
    return any(len(part) for part in parts)
