"""billing.tick() stays cheap when nothing is due: with tens of thousands of subscriptions it walks
only the partial indexes on due times (no sequential scan of the big tables)."""

from __future__ import annotations

from datetime import timedelta

import psycopg
from dbkit import Billing, kst

BULK = 20000


def seed_bulk(bl: Billing) -> None:
    """Subscriptions that are not due for weeks, inserted directly (setup data, not behaviour)."""
    bl.owner.execute(
        """
        insert into billing.customers (user_id)
        select 'bulk-' || g from generate_series(1, 20000) g;

        insert into billing.card_registrations (customer_id, user_id, plan_id, customer_key,
                                                expires_at)
        select c.id, c.user_id, p.id, 'ck_bulk_' || c.user_id, billing.now() + interval '1 hour'
          from billing.customers c cross join billing.plans p
         where c.user_id like 'bulk-%';

        insert into billing.payment_methods (customer_id, user_id, registration_id, customer_key,
                                             billing_key_ciphertext, billing_key_key_id,
                                             billing_key_sha256)
        -- An envelope v1 shape under key id 'k1' (the contents are never opened here).
        select r.customer_id, r.user_id, r.id, r.customer_key,
               '\\x01026b31'::bytea || extensions.gen_random_bytes(40), 'k1',
               encode(extensions.digest(r.customer_key, 'sha256'), 'hex')
          from billing.card_registrations r
         where r.customer_key like 'ck_bulk_%';

        -- One in ten is past_due, its grace ending in five days.
        insert into billing.subscriptions (customer_id, user_id, plan_id, status, billing_anchor,
                                           current_period_starts_at, current_period_ends_at,
                                           payment_method_id, past_due_since, grace_ends_at)
        select pm.customer_id, pm.user_id, p.id, s.status, billing.now() - interval '3 days',
               billing.now() - interval '3 days', billing.now() + interval '20 days', pm.id,
               case when s.status = 'past_due' then billing.now() end,
               case when s.status = 'past_due' then billing.now() + interval '5 days' end
          from billing.payment_methods pm
         cross join billing.plans p
         cross join lateral (
           select (case when right(pm.user_id, 1) = '7' then 'past_due' else 'active' end)
                  ::billing.subscription_status as status) s
         where pm.customer_key like 'ck_bulk_%';

        analyze billing.customers, billing.card_registrations, billing.payment_methods,
                billing.subscriptions;
        """
    )


def flush_stats(bl: Billing) -> None:
    bl.owner.execute("select pg_stat_force_next_flush()")
    bl.owner.execute("select 1")


def scans(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, tuple[int, int]]:
    conn.execute("select pg_stat_clear_snapshot()")
    rows = conn.execute(
        """select relname, seq_scan, coalesce(idx_scan, 0) from pg_stat_user_tables
            where schemaname = 'billing' and relname in ('subscriptions', 'card_registrations')"""
    ).fetchall()
    return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}  # type: ignore[call-overload]


def test_an_idle_tick_reads_indexes_not_tables(
    bl: Billing, admin_conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    bl.enable_clock(kst(2028, 5, 1, 10, 0))
    seed_bulk(bl)
    assert bl.scalar("select count(*) from billing.subscriptions") == BULK
    bl.advance(timedelta(minutes=1))
    flush_stats(bl)  # the setup's own scans must not count
    before = scans(admin_conn)
    summary = bl.tick()
    flush_stats(bl)
    after = scans(admin_conn)
    assert summary["renewals"] == 0
    assert summary["endedAfterGrace"] == 0
    assert summary["registrationsExpired"] == 0
    assert not any(summary["claimable"].values())
    assert summary["doorbellRequestId"] is None
    for table in ("subscriptions", "card_registrations"):
        assert after[table][0] == before[table][0], f"tick scanned all of billing.{table}"
    assert after["subscriptions"][1] > before["subscriptions"][1]


def test_a_busy_tick_touches_only_what_is_due(bl: Billing) -> None:
    bl.enable_clock(kst(2028, 5, 1, 10, 0))
    seed_bulk(bl)
    # Ten subscriptions come due; everything else stays as it was.
    bl.owner.execute(
        """update billing.subscriptions set current_period_ends_at = billing.now()
            where id in (select id from billing.subscriptions where status = 'active' order by
                user_id limit 10)"""
    )
    summary = bl.tick()
    assert summary["renewals"] == 10
    assert summary["claimable"]["attempts"] is True
    assert bl.scalar("select count(*) from billing.charge_attempts") == 10
    assert bl.scalar("select count(*) from billing.billing_periods where period_index = 2") == 10
