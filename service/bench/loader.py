"""Loads subscribers in bulk, set-based, in exactly the state the real path leaves them in.

The real path for one subscriber, all at one instant (the registration instant is its billing
anchor): ``api.begin_registration('pro')`` with an email claim, ``service_complete_registration``
with the billing key Toss issued, ``service_claim_attempts`` by worker :data:`WORKER`, and
``service_record_charge_success`` with :func:`payment_sql`'s Toss Payment. The loader writes the
same rows directly (triggers off, so it also writes the audit events the triggers would have
written, in the same order), which is how a million subscribers load in minutes instead of hours.
``tests/db/test_scale_loader.py`` proves the two produce the same rows.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

WORKER = "bench"
CARD = {
    "card": {"number": "4330****1234", "issuerCode": "61", "cardType": "신용", "ownerType": "개인"}
}


def user_id(prefix: str, i: int) -> str:
    return f"{prefix}{i}"


def billing_key(prefix: str, i: int) -> str:
    """The billing key Toss issued to subscriber i (test data; only its sha256 and a stand-in
    ciphertext are stored, as the service stores them)."""
    return f"bk_{prefix}{i}"


def ciphertext(key: str) -> bytes:
    """A stand-in shaped like the service's envelope v1 under key id ``k1`` (never opened by the
    benchmarks): version, key id, a nonce derived from the key, the key's text, a zero tag. The
    SQL in load_chunk.sql builds the same bytes."""
    nonce = hashlib.sha256(key.encode()).digest()[:12]
    return bytes([1, 2]) + b"k1" + nonce + b"ct:" + key.encode() + bytes(16)


def payment_sql(order_id: str, amount: str, at: str) -> str:
    """SQL for the Toss Payment object an approval returns, from SQL expressions for its orderId,
    amount and approval instant (one definition for the loader and the real path it is checked
    against)."""
    return f"""pg_catalog.jsonb_build_object(
      'paymentKey', 'pk_' || {order_id}, 'orderId', {order_id}, 'status', 'DONE', 'method', '카드',
      'totalAmount', {amount}, 'balanceAmount', {amount},
      'approvedAt', pg_catalog.to_char({at} at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'),
      'secret', 'ps_' || pg_catalog.left({order_id}, 20), 'lastTransactionKey', 'tx_' || {order_id},
      'receipt', pg_catalog.jsonb_build_object('url', 'https://receipt.example/' || {order_id}),
      'cancels', null)"""


def anchor(start: datetime, spread: timedelta, n: int, i: int) -> datetime:
    """Subscriber i (0-based) of n registers at start + spread * i / n."""
    return start + spread * i / n


_CHUNK = Path(__file__).with_name("load_chunk.sql")
_PAYMENT_MARKER = "/* payment */ null"


def load_subscribers(
    conn: psycopg.Connection[TupleRow],
    n: int,
    start: datetime,
    spread: timedelta,
    prefix: str = "load-",
    chunk: int = 20_000,
) -> None:
    """Loads subscribers 0..n-1 (user ids ``prefix + i``), subscriber i registered and charged at
    :func:`anchor`. ``conn`` must be a superuser's; each chunk commits on its own."""
    card = CARD["card"]
    chunk_sql = _CHUNK.read_text().replace(
        _PAYMENT_MARKER, payment_sql("lp.order_id", "lp.amount", "lp.at")
    )
    for first in range(0, n, chunk):
        with conn.transaction():
            conn.execute("set local session_replication_role = replica")
            conn.execute("set local timezone = 'UTC'")
            # Client-side binding: the chunk is several statements sharing the parameters.
            psycopg.ClientCursor(conn).execute(
                chunk_sql,
                {
                    "prefix": prefix,
                    "start": start,
                    "spread": spread,
                    "n": n,
                    "first": first,
                    "last": min(n, first + chunk) - 1,
                    "worker": WORKER,
                    "card_number": card["number"],
                    "issuer_code": card["issuerCode"],
                    "card_type": card["cardType"],
                    "owner_type": card["ownerType"],
                },
            )
    # The real path's writes signal the tick (its triggers are off above): the next tick probes.
    conn.execute("insert into billing.tick_signals default values")
    conn.execute(
        "analyze billing.customers, billing.card_registrations, billing.payment_methods,"
        " billing.subscriptions, billing.billing_periods, billing.charge_attempts,"
        " billing.payments, billing.credit_grants, billing.credit_entries,"
        " billing.notifications, billing.events"
    )
