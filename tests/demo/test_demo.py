"""``saju-billing demo`` end to end at a tiny size, on a runtime of its own (own directory and
ports): the report's invariants are 0 and every number in it equals what the tables say, computed
here independently (in Python, from the rows)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from liveserver import free_port
from psycopg.rows import dict_row

from service.demo.scenario import Persona, plan
from service.runtime.cluster import Runtime
from service.sandbox.merchants import DOCS_TEST_MERCHANT

KST = ZoneInfo("Asia/Seoul")
Row = dict[str, Any]


@dataclass(frozen=True)
class DemoRun:
    env: dict[str, str]
    runtime: Runtime
    sandbox_url: str
    out: Path
    stdout: str


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    # Under /var/tmp: the OS user postgres must reach the cluster's directory.
    base = Path("/var/tmp") / f"saju-demo-test-{os.getpid()}"
    db_port, sandbox_port, service_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "SAJU_RUNTIME_DIR": str(base),
        "SAJU_DB_PORT": str(db_port),
        # Its own Data API (gateway and PostgREST), beside the session's runtime.
        "SAJU_API_PORT": str(free_port()),
        "SAJU_REST_PORT": str(free_port()),
        "SAJU_SANDBOX_PORT": str(sandbox_port),
        "SAJU_SERVICE_PORT": str(service_port),
    }
    out = tmp_path_factory.mktemp("demo")
    runtime = Runtime(root=Runtime.from_env().root, base_dir=base, port=db_port)
    try:
        # A first bootstrap can lose a race with pg_cron's launcher over the base template
        # ("source database is being accessed by other users"); starting again rebuilds it.
        for _ in range(3):
            started = _cli(env, "db", "start")
            if started.returncode == 0:
                break
        assert started.returncode == 0, started.stdout + started.stderr
        done = _cli(
            env, "demo", "--subscribers", "12", "--months", "3", "--seed", "13",
            "--browser", "1", "--out", str(out),
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        yield DemoRun(env, runtime, f"http://127.0.0.1:{sandbox_port}", out, done.stdout)
    finally:
        _cli(env, "stack", "down")
        shutil.rmtree(base, ignore_errors=True)


def _rows(run: DemoRun, query: str) -> list[Row]:
    with psycopg.connect(run.runtime.dsn(), row_factory=dict_row) as conn:
        return conn.execute(query.encode()).fetchall()


def _ledger(run: DemoRun) -> list[Row]:
    secret = DOCS_TEST_MERCHANT.split(":")[1]
    token = base64.b64encode(f"{secret}:".encode()).decode()
    reply = httpx.get(
        f"{run.sandbox_url}/_sandbox/ledger", headers={"Authorization": f"Basic {token}"}
    )
    entries: list[Row] = reply.json()["entries"]
    return entries


def _months(first: datetime, now: datetime) -> list[tuple[date, datetime, datetime]]:
    """(month, start, end) for every Asia/Seoul month from ``first`` to ``now``."""
    local = first.astimezone(KST)
    m = datetime(local.year, local.month, 1, tzinfo=KST)
    out = []
    while m <= now:
        nxt = datetime(m.year + m.month // 12, m.month % 12 + 1, 1, tzinfo=KST)
        out.append((m.date(), m, nxt))
        m = nxt
    return out


@pytest.mark.slow
def test_the_demo_report_matches_the_database_and_its_invariants_hold(demo_run: DemoRun) -> None:
    report = json.loads((demo_run.out / "report.json").read_text())
    subs = _rows(demo_run, "select * from billing.subscriptions")
    periods = _rows(demo_run, "select * from billing.billing_periods")
    attempts = _rows(demo_run, "select * from billing.charge_attempts")
    payments = {p["id"]: p for p in _rows(demo_run, "select * from billing.payments")}
    refunds = _rows(demo_run, "select * from billing.refunds")
    entries = _rows(demo_run, "select kind::text, amount from billing.credit_entries")
    now = _rows(demo_run, "select billing.now() as now")[0]["now"]
    ledger = _ledger(demo_run)

    # The invariants, from the sandbox's ledger and the tables.
    period_of_order = {a["order_id"]: a["period_id"] for a in attempts}
    approvals = [e for e in ledger if e["kind"] == "approval"]
    per_period = Counter(period_of_order.get(e["orderId"]) for e in approvals)
    keys = {p["payment_key"] for p in payments.values()}
    at_toss = sum(e["amount"] if e["kind"] == "approval" else -e["amount"] for e in ledger)
    expected_invariants = {
        "periods_charged_twice": sum(1 for n in per_period.values() if n > 1),
        "approvals_missing": sum(1 for e in approvals if e["paymentKey"] not in keys),
        "attempts_unknown": sum(1 for a in attempts if a["status"] == "unknown"),
        "money_difference": at_toss - sum(p["balance_amount"] for p in payments.values()),
    }
    assert report["invariants"] == expected_invariants
    assert set(expected_invariants.values()) == {0}
    assert "=> OK" in (demo_run.out / "report.txt").read_text()

    # Who is where.
    assert report["statuses"] == dict(Counter(s["status"] for s in subs))
    assert report["span"]["customers"] == 12 == len(subs)

    # Month by month.
    months = _months(min(s["created_at"] for s in subs), now)
    assert [m["month"] for m in report["mrr"]] == [str(m) for m, _, _ in months]
    fully_refunded = {p["id"] for p in payments.values() if p["balance_amount"] == 0}
    failed_periods = {a["period_id"] for a in attempts if a["status"] in ("declined", "failed")}
    first_paid: dict[Any, datetime] = {}
    for p in periods:
        if p["status"] == "paid":
            first_paid[p["subscription_id"]] = min(
                p["paid_at"], first_paid.get(p["subscription_id"], p["paid_at"])
            )
    for i, (_, start, end) in enumerate(months):
        snap = min(end, now)
        covering = [
            p
            for p in periods
            if p["status"] == "paid"
            and p["starts_at"] <= snap < p["ends_at"]
            and p["payment_id"] not in fully_refunded
        ]
        assert report["mrr"][i]["mrr"] == sum(p["amount"] for p in covering)
        assert report["mrr"][i]["paying"] == len(covering)

        def within(t: datetime | None, start: datetime = start, end: datetime = end) -> bool:
            return t is not None and start <= t < end

        month = str(months[i][0])
        assert report["movements"][i] == {
            "month": month,
            "new": sum(1 for t in first_paid.values() if within(t)),
            "churned": sum(1 for s in subs if s["id"] in first_paid and within(s["ended_at"])),
            "recovered": sum(
                1
                for p in periods
                if p["status"] == "paid" and p["id"] in failed_periods and within(p["paid_at"])
            ),
        }
        outcomes = Counter(a["status"] for a in attempts if within(a["resolved_at"]))
        assert report["charges"][i] == {
            "month": month,
            "succeeded": outcomes["succeeded"],
            "declined": outcomes["declined"],
            "failed": outcomes["failed"],
        }
        gross = sum(
            payments[p["payment_id"]]["total_amount"]
            for p in periods
            if p["status"] == "paid" and within(p["paid_at"])
        )
        refunded = sum(
            r["amount"] for r in refunds if r["status"] == "succeeded" and within(r["created_at"])
        )
        assert report["revenue"][i] == {"month": month, "gross": gross, "refunded": refunded}

    # Declines, dunning, refunds, credits.
    failed = [a for a in attempts if a["status"] in ("declined", "failed")]
    reasons = Counter((a["error_code"], a["classification"]) for a in failed)
    assert {(d["code"], d["classification"]): d["attempts"] for d in report["declines"]} == reasons
    assert failed, "the mix declines some charges"
    troubled = [p for p in periods if p["id"] in failed_periods]
    assert report["dunning"]["periods"] == len(troubled)
    assert report["dunning"]["recovered"] == sum(1 for p in troubled if p["status"] == "paid")
    lost = sum(1 for p in troubled if p["status"] in ("unpaid", "void"))
    assert report["dunning"]["lost"] == lost
    made = [r for r in refunds if r["status"] == "succeeded"]
    assert report["refunds"] == {
        "requested": len(refunds),
        "succeeded": len(made),
        "failed": sum(1 for r in refunds if r["status"] == "failed"),
        "full": sum(1 for r in made if r["amount"] == payments[r["payment_id"]]["total_amount"]),
        "partial": sum(1 for r in made if r["amount"] < payments[r["payment_id"]]["total_amount"]),
        "amount": sum(r["amount"] for r in made),
    }
    by_kind = Counter[str]()
    for e in entries:
        by_kind[e["kind"]] += abs(e["amount"])
    assert report["credits"] == {
        "granted": by_kind["grant"],
        "used": by_kind["consume"],
        "expired": by_kind["expire"],
        "revoked": by_kind["revoke"],
    }
    assert by_kind["consume"] > 0


@pytest.mark.slow
def test_the_html_report_is_self_contained_and_the_system_stays_up(demo_run: DemoRun) -> None:
    page = (demo_run.out / "report.html").read_text()
    assert page.count("<svg") >= 5  # the charts, inline
    for outside in ("<script", "src=", "<link", "@import"):
        assert outside not in page
    assert "periods charged twice at the sandbox" in page
    # Left running, with directions to it.
    assert "saju-billing stack down" in demo_run.stdout
    assert httpx.get(f"{demo_run.sandbox_url}/v2/standard").status_code == 200


def test_the_cast_is_reproducible_and_mixed() -> None:
    cast = plan(300, 365, seed=7)
    assert cast == plan(300, 365, seed=7)
    assert cast != plan(300, 365, seed=8)
    assert {s.persona for s in cast} == set(Persona)
    assert len({s.card for s in cast}) == 300  # the sandbox counts approvals per card number
    assert sum(s.browser for s in cast) == 3
    assert 0 < sum(s.join_day > 0 for s in cast) < 300  # joins spread over months
    assert all(s.join_day + 45 <= 365 for s in cast if s.persona is Persona.RENEWAL_DECLINE_LOST)
