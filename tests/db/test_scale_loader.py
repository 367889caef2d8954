"""The bulk loader writes exactly the rows the real registration and first charge write: the same
subscribers through both paths, every billing table compared row for row, with only what must
differ (generated ids, random orderIds, customerKeys and Idempotency-Keys) masked."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from dbkit import Billing, kst, sha256_hex

from service import db
from service.bench import loader
from service.crypto import SealedKey
from service.runtime import testdb
from service.runtime.cluster import ADMIN_USER, Runtime

N = 30
START = kst(2028, 1, 1, 9, 0)
SPREAD = timedelta(days=30)
PREFIX = "cmp-"

TABLES = (
    "customers",
    "card_registrations",
    "payment_methods",
    "subscriptions",
    "billing_periods",
    "charge_attempts",
    "payments",
    "credit_grants",
    "credit_entries",
    "notifications",
    "key_deletions",
    "refunds",
    "webhook_events",
)

# Every row as JSON text with generated values masked (uuids, orderIds, customerKeys, identities),
# in a stable order; events without their identity, the test clock's own events left out.
_DUMP = r"""
select pg_catalog.regexp_replace(pg_catalog.regexp_replace(pg_catalog.regexp_replace(
         (pg_catalog.to_jsonb(t) - 'id')::text,
         '[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}', 'UUID', 'g'),
         'ord_[0-9a-f]{{16,32}}', 'ORDER', 'g'),
         'ck_[0-9a-f]{{32}}', 'CUSTOMERKEY', 'g') as row
  from billing.{table} t {where}
 order by 1
"""


def dump(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    out = {}
    for table in (*TABLES, "events"):
        where = "where t.entity_type <> 'clock'" if table == "events" else ""
        rows = conn.execute(_DUMP.format(table=table, where=where)).fetchall()
        out[table] = [next(iter(r.values())) if isinstance(r, dict) else r[0] for r in rows]
    return out


def per_entity_event_order(conn: psycopg.Connection[Any]) -> list[tuple[str, ...]]:
    """Each entity's events in id order, masked as above: the order the audit trail relies on."""
    rows = conn.execute(
        """select e.entity_type, string_agg(e.action || ':' || coalesce(e.new_status, ''), ','
                                             order by e.id)
             from billing.events e where e.entity_type <> 'clock'
            group by e.entity_id, e.entity_type order by 1, 2"""
    ).fetchall()
    return sorted(tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in rows)


def signalled(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("select exists (select 1 from billing.tick_signals)").fetchone()
    return bool(next(iter(row.values())) if isinstance(row, dict) else row[0])


@pytest.fixture
def loaded(rt: Runtime, template: str) -> Iterator[psycopg.Connection[Any]]:
    name = testdb.clone(rt, template)
    try:
        with psycopg.connect(rt.dsn(name, ADMIN_USER), autocommit=True) as conn:
            loader.load_subscribers(conn, N, START, SPREAD, prefix=PREFIX, chunk=11)
            yield conn
    finally:
        testdb.drop(rt, name)


def real_path(bl: Billing) -> None:
    bl.enable_clock(START)
    for i in range(N):
        bl.set_clock(loader.anchor(START, SPREAD, N, i))
        sub = loader.user_id(PREFIX, i)
        key = loader.billing_key(PREFIX, i)
        reg = bl.api(sub, "begin_registration", "pro", claims={"email": f"{sub}@example.com"})
        stand_in = SealedKey(loader.ciphertext(key), "k1", sha256_hex(key))
        bl.run(db.service_complete_registration(reg["customerKey"], stand_in, loader.CARD))
        (claim,) = bl.claim(worker=loader.WORKER)
        payment = bl.scalar(
            "select " + loader.payment_sql("%(o)s::text", "%(a)s::bigint", "billing.now()"),
            {"o": claim.order_id, "a": claim.amount},
        )
        bl.run(db.service_record_charge_success(claim.attempt_id, claim.lease_token, payment))


def test_the_loader_writes_what_the_real_path_writes(
    bl: Billing, loaded: psycopg.Connection[Any]
) -> None:
    real_path(bl)
    bl.owner.execute("set timezone = 'UTC'")
    expected = dump(bl.owner)
    got = dump(loaded)
    assert sum(len(v) for v in expected.values()) > 14 * N  # the comparison compares something
    for table in expected:
        assert got[table] == expected[table], table
    assert per_entity_event_order(loaded) == per_entity_event_order(bl.owner)
    # Both leave the tick a signal: the next tick probes in full.
    assert signalled(loaded)
    assert signalled(bl.owner)
