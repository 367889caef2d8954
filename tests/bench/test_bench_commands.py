"""The benchmarks at a tiny size: their result files hold every figure, and the runs they measure
were correct (every renewal charged once, every webhook stored once, every due renewal made
claimable once). Never timings."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from liveserver import free_port

from service.bench import billing, scale, webhooks
from service.runtime.cluster import Runtime

pytestmark = pytest.mark.slow

Results = dict[str, Any]


@dataclass(frozen=True)
class Bench:
    """One benchmark command at a tiny size, and what its result files must show."""

    name: str  # the result files' stem
    run: Callable[[Path], Results]  # runs it, writing to the given directory
    headline: str  # a figure the text summary names
    positive: tuple[str, ...]  # figures a run that did anything has above 0
    check: Callable[[Results], None]  # what this command's run must have done


def _run_billing(out: Path) -> Results:
    options = billing.Options(
        subscriptions=40,
        seed_subscriptions=6,
        concurrency=8,
        rate_limit=6_000,
        durable=False,
        statements=False,  # loading it restarts the cluster, which the other tests share
        ports=(free_port(), free_port()),
    )
    return billing.run(options, out)


def _billing_checks(written: Results) -> None:
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
    assert figures["limit_per_s"] == min(8 / 0.1, 6_000 / 60)
    assert figures["db_ms_per_charge"] is None  # pg_stat_statements was not asked for
    assert written["settings"]["sandbox_rate_limit"] == 6_000
    assert len(written["load_average_before"]) == 3
    assert written["machine"]["cpus"] >= 1
    assert "psycopg" in written["versions"]
    assert isinstance(written["notes"], list)


def _run_webhooks(out: Path) -> Results:
    options = webhooks.Options(
        events=200,
        duplicates=0.1,
        concurrency=8,
        durable=False,
        statements=False,  # loading it restarts the cluster, which the other tests share
        ports=(free_port(), free_port()),
    )
    return webhooks.run(options, out)


def _webhooks_checks(written: Results) -> None:
    assert written["checks"] == {
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
    assert figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


def _run_scale(out: Path) -> Results:
    # On the tests' own cluster as it is: the durable one would restart the cluster they share.
    return scale.run(600, out, runtime=Runtime.from_env())


def _scale_checks(written: Results) -> None:
    detail = written["detail"]
    burst, tick_burst = detail["burst"], detail["tick_burst"]
    # One day's renewals, each a claimable attempt once, by pg_cron's two calls in one minute.
    assert burst["due"] > 0
    assert burst["claimable_attempts"] == burst["due"]
    assert [c["left"] for c in burst["calls"]] == [0]
    assert tick_burst["renewed"] == tick_burst["due"] > 0
    assert detail["charges_1_worker"]["charges"] == min(100, burst["due"])
    # The idle minute slept on the stored horizon after the first one probed and stored it.
    assert len(detail["idle_tick_ms_runs"]) == 10
    assert 1 <= len(detail["idle_waking_ms_runs"]) <= 20
    assert len(detail["steady_tick_renewals"]) == 10
    assert set(detail["api_call_ms_median"]) == set(scale.API_CALLS)
    assert written["subscriptions"] == 600
    assert written["postgres_settings"]["shared_preload_libraries"]


BENCHES = (
    Bench(
        "billing",
        _run_billing,
        "charges_per_s",
        (
            "charges_per_s",
            "ratio_to_limit",
            "cpu_ms_per_charge",
            "service_rss_mb",
            "seed_charges_per_s",
            "seed_design_ratio",
        ),
        _billing_checks,
    ),
    Bench(
        "scale",
        _run_scale,
        "due_to_attempts_s",
        (
            "api_call_ms",
            "idle_tick_ms",
            "steady_tick_ms",
            "due_to_attempts_s",
            "db_ms_per_charge",
        ),
        _scale_checks,
    ),
    Bench(
        "webhooks",
        _run_webhooks,
        "events_per_s",
        ("events_per_s", "p50_ms", "p99_ms", "max_ms", "service_rss_mb"),
        _webhooks_checks,
    ),
)


@pytest.mark.parametrize("bench", BENCHES, ids=[b.name for b in BENCHES])
def test_a_bench_command_writes_every_figure_of_a_correct_run(
    rt: Runtime, tmp_path: Path, bench: Bench
) -> None:
    results = bench.run(tmp_path)

    written = json.loads((tmp_path / f"{bench.name}.json").read_text())
    assert written["figures"] == results["figures"]
    assert bench.headline in (tmp_path / f"{bench.name}.txt").read_text()
    for name in bench.positive:
        assert written["figures"][name] > 0, name
    assert len(written["load_average_after"]) == 3
    bench.check(written)


def test_duplicates_are_resent_events_in_shuffled_order() -> None:
    distinct = webhooks.events(100, [{"paymentKey": "pk_1", "orderId": "o1"}], seed=3)
    sent = webhooks.with_duplicates(distinct, 0.1, seed=3)
    assert len({t for t, _ in distinct}) == 100
    assert len(sent) == 110
    assert set(sent) == set(distinct)  # a duplicate is the same transmission id and body
    assert sent[:100] != distinct  # shuffled
