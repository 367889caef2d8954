"""The service benchmarks at a tiny size: their result files hold every figure, and the runs they
measure were correct (every renewal charged once, every webhook stored once). Never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from liveserver import free_port

from service.bench import billing, webhooks
from service.runtime.cluster import Runtime

pytestmark = pytest.mark.slow


def test_bench_billing_charges_every_renewal_once_beside_the_seed_design(
    rt: Runtime, tmp_path: Path
) -> None:
    options = billing.Options(
        subscriptions=40,
        seed_subscriptions=6,
        concurrency=8,
        rate_limit=6_000,
        durable=False,
        statements=False,  # loading it restarts the cluster, which the other tests share
        ports=(free_port(), free_port()),
    )
    results = billing.run(options, tmp_path)

    written = json.loads((tmp_path / "billing.json").read_text())
    assert written["figures"] == results["figures"]
    assert "charges_per_s" in (tmp_path / "billing.txt").read_text()
    checks = written["checks"]
    assert checks["renewals_paid"] == 40
    assert checks["periods_paid_twice"] == 0
    assert checks["sandbox_approvals"] == 40
    assert checks["sandbox_approvals_distinct_orders"] == 40
    assert checks["sandbox_approvals_in_our_ledger"] == 40
    assert checks["ok"] is True
    figures = written["figures"]
    # The service keeps to the sandbox's limit, so the sandbox never had to refuse a charge.
    assert figures["http_429"] == 0
    assert written["detail"]["renewal_run"]["succeeded"] == 40
    assert written["detail"]["seed_design"]["charged"] == 6
    for name in ("charges_per_s", "ratio_to_limit", "cpu_ms_per_charge", "service_rss_mb",
                 "seed_charges_per_s", "seed_design_ratio"):  # fmt: skip
        assert figures[name] > 0, name
    assert figures["limit_per_s"] == min(8 / 0.1, 6_000 / 60)
    assert figures["db_ms_per_charge"] is None  # pg_stat_statements was not asked for
    assert written["settings"]["sandbox_rate_limit"] == 6_000
    assert len(written["load_average_before"]) == 3
    assert len(written["load_average_after"]) == 3
    assert written["machine"]["cpus"] >= 1
    assert "psycopg" in written["versions"]
    assert isinstance(written["notes"], list)


def test_bench_webhooks_stores_every_distinct_event_exactly_once(
    rt: Runtime, tmp_path: Path
) -> None:
    options = webhooks.Options(
        events=200,
        duplicates=0.1,
        concurrency=8,
        durable=False,
        statements=False,  # loading it restarts the cluster, which the other tests share
        ports=(free_port(), free_port()),
    )
    results = webhooks.run(options, tmp_path)

    written = json.loads((tmp_path / "webhooks.json").read_text())
    assert written["figures"] == results["figures"]
    assert "events_per_s" in (tmp_path / "webhooks.txt").read_text()
    checks = written["checks"]
    assert checks == {
        "distinct_events": 200,
        "requests": 220,
        "duplicates_sent": 20,
        "stored": 200,
        "lost": 0,
        "stored_twice": 0,
        "unexpected": 0,
        "non_200": 0,
        "ok": True,
    }
    assert written["detail"]["statuses"] == {"200": 220}
    figures = written["figures"]
    for name in ("events_per_s", "p50_ms", "p99_ms", "max_ms", "service_rss_mb"):
        assert figures[name] > 0, name
    assert figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert len(written["load_average_after"]) == 3


def test_duplicates_are_resent_events_in_shuffled_order() -> None:
    distinct = webhooks.events(100, [{"paymentKey": "pk_1", "orderId": "o1"}], seed=3)
    sent = webhooks.with_duplicates(distinct, 0.1, seed=3)
    assert len({t for t, _ in distinct}) == 100
    assert len(sent) == 110
    assert set(sent) == set(distinct)  # a duplicate is the same transmission id and body
    assert sent[:100] != distinct  # shuffled
