"""What the Data API tests share: the client an app builds, the statuses it saw, and a snapshot
of the database that a refused call must leave unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
from psycopg import sql
from supabase.lib.client_options import SyncClientOptions

from service.runtime.api import DataApi
from service.runtime.cluster import Runtime
from supabase import Client, create_client


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
