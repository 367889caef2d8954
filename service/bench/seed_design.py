"""The seed guide's billing run, re-implemented faithfully as the baseline of ``bench billing``.

The guide's design: a cron-called endpoint reads every active subscription due today, then, one
after another, POSTs each to the app's own charge endpoint over HTTP; that endpoint calls Toss
with a fresh orderId (no Idempotency-Key), and the loop then moves the next billing date 30 days
on and overwrites the credit counter (or marks the subscription failed). Its own table holds the
billing key in plain text, as the guide's does. Kept only as a yardstick: it has none of the
product's guarantees. Database writes go straight through psycopg here, where the guide used the
Supabase client over HTTP, which favours the baseline.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.bench.harness import SECRET_KEY, Conn

SCHEMA_SQL = """
create schema if not exists seed_design;
create table if not exists seed_design.subscriptions (
  id uuid primary key default gen_random_uuid(),
  user_id text not null,
  billing_key text not null,
  customer_key text not null,
  status text not null default 'active',
  next_billing_date timestamptz not null,
  last_billing_date timestamptz,
  billing_key_deleted_at timestamptz,
  created_at timestamptz default now(),
  updated_at timestamptz default now());
create table if not exists seed_design.user_credits (
  user_id text primary key, test_count integer not null default 0);
"""
AMOUNT = 9900


def load(conn: Conn, subscribers: list[tuple[str, str, str]]) -> None:
    """The same subscribers (user id, customerKey, billing key), due now, in the seed's tables."""
    conn.execute(SCHEMA_SQL)
    due = datetime.now(UTC) - timedelta(days=1)
    with conn.cursor() as cur:
        cur.executemany(
            "insert into seed_design.subscriptions"
            " (user_id, customer_key, billing_key, next_billing_date) values (%s, %s, %s, %s)",
            [(u, c, b, due) for u, c, b in subscribers],
        )
        cur.executemany(
            "insert into seed_design.user_credits (user_id) values (%s)",
            [(u,) for u, _, _ in subscribers],
        )


def build_app(dsn: str, toss_url: str, self_url: list[str]) -> Starlette:
    """The guide's two routes: ``/api/subscription/process`` and ``/api/subscription/charge``."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            httpx.AsyncClient(timeout=60) as http,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        ):
            state["http"], state["conn"] = http, conn
            yield

    async def charge(request: Request) -> JSONResponse:
        body = await request.json()
        order_id = f"ORDER_{int(time.time() * 1000)}_{uuid.uuid4().hex[:8]}"
        response = await state["http"].post(
            f"{toss_url}/v1/billing/{body['billingKey']}",
            auth=(SECRET_KEY, ""),
            json={
                "customerKey": body["customerKey"],
                "amount": body["amount"],
                "orderId": order_id,
                "orderName": "Saju맛피아 Pro 구독",
                "customerEmail": "customer@example.com",
                "customerName": "김토스",
                "taxFreeAmount": 0,
            },
        )
        if response.status_code >= 400:
            error = response.json()
            status = 400 if error.get("code") == "REJECT_CARD_PAYMENT" else 500
            return JSONResponse({"error": error.get("message")}, status_code=status)
        payment = response.json()
        return JSONResponse(
            {
                "success": True,
                "paymentKey": payment["paymentKey"],
                "orderId": payment["orderId"],
                "amount": payment["totalAmount"],
            }
        )

    async def process(request: Request) -> JSONResponse:
        conn: psycopg.AsyncConnection[Any] = state["conn"]
        today = datetime.now(UTC).date()
        cur = await conn.execute(
            "select id, user_id, billing_key, customer_key from seed_design.subscriptions"
            " where status = 'active' and next_billing_date::date <= %s",
            (today,),
        )
        results = []
        for sub_id, user_id, billing_key, customer_key in await cur.fetchall():
            answer = await state["http"].post(
                f"{self_url[0]}/api/subscription/charge",
                json={"billingKey": billing_key, "customerKey": customer_key, "amount": AMOUNT},
            )
            now = datetime.now(UTC)
            if answer.status_code < 300:
                await conn.execute(
                    "update seed_design.subscriptions set last_billing_date = %s,"
                    " next_billing_date = %s, updated_at = now() where id = %s",
                    (now, now + timedelta(days=30), sub_id),
                )
                await conn.execute(
                    "update seed_design.user_credits set test_count = 10 where user_id = %s",
                    (user_id,),
                )
                results.append(True)
            else:
                await conn.execute(
                    "update seed_design.subscriptions set status = 'payment_failed',"
                    " billing_key_deleted_at = now(), updated_at = now() where id = %s",
                    (sub_id,),
                )
                results.append(False)
        return JSONResponse({"success": True, "processed": len(results), "charged": sum(results)})

    return Starlette(
        routes=[
            Route("/api/subscription/process", process, methods=["POST"]),
            Route("/api/subscription/charge", charge, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def run(dsn: str, toss_url: str) -> tuple[int, int, float]:
    """Serves the baseline on a loopback port, calls its process endpoint once (as its cron job
    does); returns (processed, charged, seconds)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = [f"http://127.0.0.1:{sock.getsockname()[1]}"]
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(dsn, toss_url, url), log_level="warning", access_log=False, ws="none"
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        started = time.perf_counter()
        answer = httpx.post(f"{url[0]}/api/subscription/process", timeout=3600).json()
        elapsed = time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return int(answer["processed"]), int(answer["charged"]), elapsed
