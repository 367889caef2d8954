"""The billing service: the only holder of the Toss secret key.

Routes (OpenAPI at ``/openapi.json``):

* ``POST /internal/doorbell`` — pg_net rings it after ``billing.tick()``; work is then pulled.
* ``POST /webhooks/toss`` — Toss's webhooks, stored first, processed by the worker.
* ``GET /billing/cards/{customer_key}`` — the hosted card page (Toss SDK v2 requestBillingAuth).
* ``GET /billing/success`` / ``GET /billing/fail`` — the SDK's redirects.
* ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any, TypedDict
from urllib.parse import urlencode

import httpx
import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from service import db
from service.crypto import Keyring
from service.logs import AccessLog
from service.metrics import Metrics
from service.settings import Settings, load
from service.toss import PooledTransport, TossClient, TossError, TossException
from service.workers import Worker

_log = logging.getLogger("saju_billing.app")

# Toss's customerKey rule (and ours: 'ck_' + 32 hex digits); authKeys are opaque but bounded.
_CUSTOMER_KEY = re.compile(r"[A-Za-z0-9_=.@-]{2,50}")
_AUTH_KEY = re.compile(r"[A-Za-z0-9_=.@-]{1,300}")
_FAIL_CODE = re.compile(r"[A-Z0-9_]{1,100}")
WEBHOOK_MAX_BYTES = 256 * 1024
_PAGES = resources.files("service") / "pages"


@dataclass(frozen=True)
class Services:
    settings: Settings
    pool: AsyncConnectionPool[Any]
    http: httpx.AsyncClient
    toss: TossClient
    keyring: Keyring
    worker: Worker
    metrics: Metrics


class State(TypedDict):
    services: Services


def _services(request: Request) -> Services:
    services: Services = request.state.services
    return services


def _problem(status: int, code: str, message: str) -> JSONResponse:
    """A machine-readable refusal: {"code", "message"} (the shape Toss's own API uses)."""
    return JSONResponse({"code": code, "message": message}, status_code=status)


def _page(name: str, status: int = 200, **values: str) -> HTMLResponse:
    text = (_PAGES / name).read_text(encoding="utf-8")
    escaped = {k: html.escape(v) for k, v in values.items()}
    return HTMLResponse(Template(text).substitute(escaped), status_code=status)


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    """The database is away (a restart, a failover): nothing was recorded, and every handler
    asks the database before it spends anything at Toss or repeats Toss's call under the same
    Idempotency-Key, so the same request later is safe. 503 says so, instead of a 500."""
    _log.warning("database unavailable: %s", type(exc).__name__)
    page = _page("error.html", 503, title="Temporarily unavailable", detail="DATABASE_UNAVAILABLE")
    page.headers["Retry-After"] = "5"
    return page


# ----------------------------------------------------------------------------------- doorbell


async def doorbell(request: Request) -> Response:
    """
    summary: Work is waiting (rung by billing.tick through pg_net); the service pulls it.
    security: [{doorbell: []}]
    responses:
      202: {description: accepted; a drain starts or one more pass is queued}
      401: {description: missing or wrong token}
    """
    s = _services(request)
    given = request.headers.get("authorization", "")
    expected = "Bearer " + s.settings.doorbell_token.get_secret_value()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return _problem(401, "UNAUTHORIZED", "missing or wrong doorbell token")
    s.worker.ring()
    return JSONResponse({"accepted": True}, status_code=202)


# ----------------------------------------------------------------------------------- webhooks


# Toss's two envelopes: {eventType, createdAt, data: {...}}, and DEPOSIT_CALLBACK's flat one.
_ENVELOPE: dict[str, type] = {"eventType": str, "createdAt": str, "data": dict}
_DEPOSIT: dict[str, type] = {
    "createdAt": str,
    "secret": str,
    "status": str,
    "transactionKey": str,
    "orderId": str,
}


def _envelope_problem(payload: dict[str, Any]) -> str | None:
    """Why a body is neither of Toss's webhook shapes (None when it is one): see /openapi.json."""
    shape: dict[str, type]
    required: tuple[str, ...]
    if "eventType" in payload:
        shape, required = _ENVELOPE, ("eventType",)
    else:
        shape, required = _DEPOSIT, ("secret", "status", "orderId")
    missing = [k for k in required if k not in payload]
    if missing:
        return "no event type, and not a deposit callback (secret, status, orderId)"
    wrong = [k for k, kind in shape.items() if k in payload and not isinstance(payload[k], kind)]
    if wrong:
        return f"wrong type of {', '.join(wrong)}"
    event_type = payload.get("eventType")
    if isinstance(event_type, str) and not 1 <= len(event_type) <= 100:
        return "eventType must be 1–100 characters"
    return None


async def toss_webhook(request: Request) -> Response:
    """
    summary: A Toss webhook; stored before anything else, answered at once, processed later.
    parameters:
      - {name: tosspayments-webhook-transmission-id, in: header, required: false,
         schema: {type: string}}
    requestBody:
      required: true
      content:
        application/json:
          schema:
            anyOf:
              - type: object
                required: [eventType]
                properties:
                  eventType: {type: string, minLength: 1, maxLength: 100}
                  createdAt: {type: string}
                  data: {type: object}
              - type: object
                description: DEPOSIT_CALLBACK, flat and without an event type
                required: [secret, status, orderId]
                properties:
                  createdAt: {type: string}
                  secret: {type: string}
                  status: {type: string}
                  transactionKey: {type: string}
                  orderId: {type: string}
    responses:
      200: {description: stored (or a duplicate of a stored one)}
      400: {description: not a JSON object, or no usable event type}
      413: {description: body larger than 256 KiB}
    """
    s = _services(request)
    if int(request.headers.get("content-length") or 0) > WEBHOOK_MAX_BYTES:
        return _problem(413, "PAYLOAD_TOO_LARGE", "webhook bodies are at most 256 KiB")
    raw = await request.body()
    if len(raw) > WEBHOOK_MAX_BYTES:
        return _problem(413, "PAYLOAD_TOO_LARGE", "webhook bodies are at most 256 KiB")
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _problem(400, "INVALID_JSON", "the body is not JSON")
    if not isinstance(payload, dict):
        return _problem(400, "INVALID_JSON", "the body is not a JSON object")
    problem = _envelope_problem(payload)
    if problem is not None:
        return _problem(400, "INVALID_WEBHOOK", problem)
    # Toss's transmission id dedupes retries; without one the body itself is the identity.
    transmission = request.headers.get("tosspayments-webhook-transmission-id") or (
        "sha256:" + hashlib.sha256(raw).hexdigest()
    )
    event_type = payload.get("eventType")
    try:
        async with s.pool.connection() as conn:
            stored = await db.run(
                conn,
                db.service_ingest_webhook(
                    transmission[:200],
                    event_type if isinstance(event_type, str) else None,
                    payload,
                    dict(request.headers),
                ),
            )
    except db.InvalidInput as exc:
        s.metrics.webhooks.labels("invalid", "refused").inc()
        return _problem(400, "INVALID_WEBHOOK", str(exc))
    s.metrics.webhooks.labels(
        stored.resolved_event_type[:40], "duplicate" if stored.duplicate else stored.status
    ).inc()
    if not stored.duplicate and stored.status == "received":
        s.worker.ring()
    return JSONResponse({"received": True, "duplicate": stored.duplicate})


# ------------------------------------------------------------------------------- registration


async def card_page(request: Request) -> Response:
    """
    summary: The hosted card page for a pending registration (Toss SDK v2 requestBillingAuth).
    parameters:
      - name: customer_key
        in: path
        required: true
        schema: {type: string, pattern: '^[A-Za-z0-9_=.@-]{2,50}$'}
    responses:
      200: {description: the page}
      400: {description: not a customerKey}
    """
    s = _services(request)
    customer_key = request.path_params["customer_key"]
    if not _CUSTOMER_KEY.fullmatch(customer_key):
        return _page("error.html", 400, title="Invalid link", detail="INVALID_CUSTOMER_KEY")
    base = s.settings.public_url.rstrip("/")
    return _page(
        "card.html",
        sdk_url=s.settings.toss_sdk_url,
        client_key=s.settings.toss_client_key,
        customer_key=customer_key,
        success_url=f"{base}/billing/success",
        fail_url=f"{base}/billing/fail",
    )


def _refused_auth_key(exc: TossException) -> bool:
    """Toss answered 4xx about the request itself (not 401/403 about our key, not 429)."""
    return (
        isinstance(exc, TossError)
        and 400 <= exc.http_status < 500
        and (exc.http_status not in (401, 403, 429))
    )


def issue_idempotency_key(customer_key: str, auth_key: str) -> str:
    """The authKey is single-use: a retried redirect must reuse the key of the first issue."""
    return hashlib.sha256(f"issue:{customer_key}:{auth_key}".encode()).hexdigest()


async def registration_success(request: Request) -> Response:
    """
    summary: The SDK's success redirect; issues the billing key and records it.
    parameters:
      - name: customerKey
        in: query
        required: true
        schema: {type: string, pattern: '^[A-Za-z0-9_=.@-]{2,50}$'}
      - name: authKey
        in: query
        required: true
        schema: {type: string, pattern: '^[A-Za-z0-9_=.@-]{1,300}$'}
    responses:
      303: {description: registered; on to the app}
      400: {description: missing or malformed parameters, or Toss refused the authKey}
      404: {description: no registration with this customerKey}
      409: {description: the registration is not pending (expired, used, failed)}
      502: {description: Toss did not answer, or refused our own credentials}
    """
    s = _services(request)
    customer_key = request.query_params.get("customerKey", "")
    auth_key = request.query_params.get("authKey", "")
    if not (_CUSTOMER_KEY.fullmatch(customer_key) and _AUTH_KEY.fullmatch(auth_key)):
        return _page("error.html", 400, title="Invalid request", detail="INVALID_REQUEST")
    # Toss is asked only for a registration that can still complete: anyone can reach this URL,
    # and each issue call spends the merchant's Toss rate limit.
    try:
        async with s.pool.connection() as conn:
            await db.run(conn, db.service_check_registration(customer_key))
    except (db.NotFound, db.Conflict) as exc:
        found = isinstance(exc, db.Conflict)
        code = "REGISTRATION_NOT_PENDING" if found else "REGISTRATION_NOT_FOUND"
        return _page(
            "error.html", 409 if found else 404, title="Card registration failed", detail=code
        )
    try:
        billing = await s.toss.issue_billing_key(
            auth_key, customer_key, idempotency_key=issue_idempotency_key(customer_key, auth_key)
        )
    except TossException as exc:
        _log.warning("billing-key issue failed: %s", exc)
        # Toss refusing the authKey is the request's fault; anything else is Toss or our keys.
        status = 400 if _refused_auth_key(exc) else 502
        return _page("error.html", status, title="Card registration failed", detail=str(exc)[:200])
    card = None
    if billing.card is not None:
        card = {
            "number": billing.card.number,
            "issuerCode": billing.card.issuer_code,
            "acquirerCode": billing.card.acquirer_code,
            "cardType": billing.card.card_type,
            "ownerType": billing.card.owner_type,
        }
    sealed = s.keyring.seal(billing.billing_key, customer_key)
    try:
        async with s.pool.connection() as conn:
            done = await db.run(conn, db.service_complete_registration(customer_key, sealed, card))
    except (db.Conflict, db.NotFound, db.InvalidInput) as exc:
        # The key exists at Toss but nothing here will use it: delete it now.
        try:
            await s.toss.delete_billing_key(billing.billing_key)
        except TossException:
            _log.exception("could not delete an unused billing key; delete it in the console")
        code = "REGISTRATION_NOT_PENDING" if isinstance(exc, db.Conflict) else "INVALID_REQUEST"
        status = 409 if isinstance(exc, db.Conflict) else 400
        return _page("error.html", status, title="Card registration failed", detail=code)
    s.worker.ring()  # the first period is charged right away
    target = (
        s.settings.app_url
        + "?"
        + urlencode({"status": "registered", "subscriptionId": str(done.subscription_id)})
    )
    return RedirectResponse(target, 303)


async def registration_fail(request: Request) -> Response:
    """
    summary: The SDK's fail redirect; records the failure and explains it.
    parameters:
      - name: code
        in: query
        required: true
        schema: {type: string, pattern: '^[A-Z0-9_]{1,100}$'}
      - {name: message, in: query, required: false, schema: {type: string}}
      - {name: customerKey, in: query, required: false, schema: {type: string}}
    responses:
      200: {description: the failure page}
      400: {description: missing or malformed code}
    """
    s = _services(request)
    code = request.query_params.get("code", "")
    message = request.query_params.get("message", "")[:510]
    customer_key = request.query_params.get("customerKey", "")
    if not _FAIL_CODE.fullmatch(code):
        return _page("error.html", 400, title="Invalid request", detail="INVALID_REQUEST")
    if _CUSTOMER_KEY.fullmatch(customer_key):
        try:
            async with s.pool.connection() as conn:
                await db.run(conn, db.service_fail_registration(customer_key, code, message))
        except (db.NotFound, db.Conflict) as exc:
            _log.info("fail redirect for a registration that is not pending: %s", exc)
    return _page("failed.html", code=code, message=message or code)


# ---------------------------------------------------------------------------------- operations


async def healthz(request: Request) -> Response:
    """
    summary: The process is up.
    responses:
      200: {description: up}
    """
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    """
    summary: The database answers as the service role and the keyring is loaded.
    responses:
      200: {description: ready}
      503: {description: not ready}
    """
    s = _services(request)
    try:
        async with s.pool.connection(timeout=5) as conn:
            ok = await db.ping(conn)
    except Exception:  # any failure to reach the database means "not ready"
        ok = False
    body = {"database": ok, "keyring": s.keyring.active_key_id}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """
    summary: Prometheus metrics.
    responses:
      200: {description: text exposition format}
    """
    s = _services(request)
    try:
        async with s.pool.connection(timeout=5) as conn:
            depths = await db.run(conn, db.service_queue_depths())
    except Exception:  # metrics still answer when the database does not
        _log.warning("queue depths unavailable", exc_info=True)
    else:
        for queue, states in depths.items():
            for state, count in states.items():
                s.metrics.queue_depth.labels(queue, state).set(count)
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


_schemas = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {"title": "saju-billing service", "version": "1"},
        "components": {"securitySchemes": {"doorbell": {"type": "http", "scheme": "bearer"}}},
    }
)


async def openapi(request: Request) -> Response:
    return JSONResponse(_schemas.get_schema(routes=request.app.routes))


routes = [
    Route("/internal/doorbell", doorbell, methods=["POST"]),
    Route("/webhooks/toss", toss_webhook, methods=["POST"]),
    Route("/billing/cards/{customer_key}", card_page, methods=["GET"]),
    Route("/billing/success", registration_success, methods=["GET"]),
    Route("/billing/fail", registration_fail, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
]


def build_app(settings: Settings | None = None, *, run_worker: bool = True) -> Starlette:
    """The service app; settings are read from the environment when not given."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        s = settings or load()

        pool = db.connection_pool(
            s.database_url.get_secret_value(), s.db_role, s.db_pool_size, s.db_pool_timeout_s
        )
        await pool.open(wait=True, timeout=30)
        # A kept-alive connection per concurrent call (httpx keeps 20 by default; above that
        # each call would open and close one of its own).
        http = httpx.AsyncClient(transport=PooledTransport(s.concurrency))
        toss = TossClient(
            s.secret_key(),
            base_url=s.toss_api_url,
            http=http,
            timeout=s.toss_charge_timeout_s,
            lookup_timeout=s.toss_lookup_timeout_s,
        )
        keyring = s.keyring()
        registry = Metrics()
        worker = Worker(s, pool, toss, keyring, http, registry)
        if run_worker:
            worker.start()
        try:
            yield {"services": Services(s, pool, http, toss, keyring, worker, registry)}
        finally:
            await worker.stop()
            await http.aclose()
            await pool.close()

    return Starlette(
        routes=routes,
        middleware=[Middleware(AccessLog)],
        exception_handlers={
            PoolTimeout: _database_unavailable,
            psycopg.OperationalError: _database_unavailable,
        },
        lifespan=lifespan,
    )
