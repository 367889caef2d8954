"""The Data API as subscribers reach it: the real PostgREST behind the gateway, per test module.

Each module gets its own migrated database and its own PostgREST + gateway pair (free ports), so
calls through the ``supabase`` client hit exactly the database the test inspects.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql
from supabase.lib.client_options import SyncClientOptions

from service.runtime import testdb
from service.runtime.api import DataApi
from service.runtime.cluster import Runtime
from service.runtime.signin import SignedIn, sign_in
from supabase import Client, create_client

# The billing test kit (service calls, Toss's approval JSON) lives beside the database tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "db"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api_dbname(rt: Runtime, template: str) -> Iterator[str]:
    name = testdb.clone(rt, template)
    yield name
    testdb.drop(rt, name)


@pytest.fixture(scope="module")
def data_api(
    rt: Runtime, api_dbname: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DataApi]:
    """PostgREST and the gateway serving ``api_dbname``, as ``db start`` runs them."""
    api = DataApi(rt, api_dbname, _free_port(), _free_port(), tmp_path_factory.mktemp("data-api"))
    api.check_installed()
    api.write_configs()
    log = (api.state_dir / "processes.log").open("ab")
    procs = [
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        for argv in api.commands().values()
    ]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{api.rest_url}/", headers={"apikey": api.anon_key}, timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Data API did not come up")
            time.sleep(0.1)
        yield api
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        log.close()


class Statuses:
    """HTTP statuses of the responses a client got (the client's errors do not carry them)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, response: httpx.Response) -> None:
        self.seen.append(response.status_code)

    @property
    def last(self) -> int:
        return self.seen[-1]


@contextlib.contextmanager
def client(
    api: DataApi, token: str | None = None, statuses: Statuses | None = None
) -> Iterator[Client]:
    """What an app builds: ``create_client(url, anon key)``, with a signed-in user's token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    hooks = {"response": [statuses]} if statuses is not None else {}
    with httpx.Client(event_hooks=hooks, timeout=30) as http:
        options = SyncClientOptions(headers=headers, httpx_client=http)
        yield create_client(api.url, api.anon_key, options=options)


@pytest.fixture
def user(data_api: DataApi) -> SignedIn:
    return sign_in(data_api, f"u{time.monotonic_ns()}@example.com")


def snapshot(rt: Runtime, dbname: str) -> dict[str, Any]:
    """Row counts of every billing table and auth.users, and the last audit event."""
    with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as conn:
        tables = conn.execute(
            "select schemaname, tablename from pg_tables"
            " where schemaname in ('billing', 'auth') order by 1, 2"
        ).fetchall()
        counts: dict[str, Any] = {
            f"{schema}.{table}": conn.execute(
                sql.SQL("select count(*) from {}").format(sql.Identifier(schema, table))
            ).fetchone()
            for schema, table in tables
        }
        counts["last event"] = conn.execute(
            "select max(id), count(*) from billing.events"
        ).fetchone()
        return counts
