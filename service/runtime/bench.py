"""Benchmark of the local pg_net-compatible worker: requests per second against a slow endpoint.

``saju-billing bench net`` queues N requests in one transaction in a fresh database (as a trigger
fan-out would), against a local endpoint that answers after a fixed delay, and times until every
response row is written. The result goes to ``bench-results/net-<UTC time>.json``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service.runtime import testdb
from service.runtime.cluster import BASE_DB, Runtime


@dataclass(frozen=True)
class NetBenchResult:
    requests: int
    endpoint_delay_ms: int
    batch_size: int
    seconds: float
    requests_per_second: float
    ok_responses: int


def _endpoint(delay_ms: int) -> tuple[uvicorn.Server, threading.Thread, int]:
    async def answer(request: Request) -> PlainTextResponse:
        await asyncio.sleep(delay_ms / 1000)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/bench", answer)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, port


def run_net(rt: Runtime, requests: int, delay_ms: int, timeout: float = 600.0) -> NetBenchResult:
    server, thread, port = _endpoint(delay_ms)
    dbname = testdb.clone(rt, BASE_DB, prefix="bench")
    try:
        with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as conn:
            conn.execute("set statement_timeout = '60s'")
            conn.execute("select net.wait_until_running()")
            row = conn.execute("select current_setting('pg_net.batch_size', true)").fetchone()
            batch_size = int(row[0]) if row and row[0] else 200
            started = time.monotonic()
            conn.execute(
                "select net.http_get(%s) from generate_series(1, %s)",
                (f"http://127.0.0.1:{port}/bench", requests),
            )
            deadline = started + timeout
            while True:
                done = conn.execute("select count(*) from net._http_response").fetchone()
                if done is not None and done[0] >= requests:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {done} of {requests} responses in {timeout} s")
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            ok = conn.execute(
                "select count(*) from net._http_response where status_code = 200"
            ).fetchone()
        return NetBenchResult(
            requests=requests,
            endpoint_delay_ms=delay_ms,
            batch_size=batch_size,
            seconds=round(elapsed, 3),
            requests_per_second=round(requests / elapsed, 1),
            ok_responses=int(ok[0]) if ok else 0,
        )
    finally:
        testdb.drop(rt, dbname)
        server.should_exit = True
        thread.join(timeout=10)


def write_result(rt: Runtime, name: str, result: NetBenchResult) -> Path:
    out_dir = rt.root / "bench-results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return path
