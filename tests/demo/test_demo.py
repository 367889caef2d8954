"""``saju-billing demo`` end to end at a tiny size, on a runtime of its own (own directory and
ports): the report's invariants are 0 and every number in it equals what the tables say, computed
here independently (in Python, from the rows)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from runtimekit import OwnRuntime, Row, own_runtime

from service.demo.scenario import Persona, plan


@dataclass(frozen=True)
class DemoRun:
    own: OwnRuntime
    out: Path
    stdout: str


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    out = tmp_path_factory.mktemp("demo")
    with own_runtime("demo-test") as own:
        done = own.cli(
            "demo", "--subscribers", "12", "--months", "3", "--seed", "13",
            "--browser", "1", "--out", str(out),
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        yield DemoRun(own, out, done.stdout)


def _view(run: DemoRun, view: str, order: str) -> list[Row]:
    """A view's rows as the analyst reads them, in JSON's terms (as report.json has them)."""
    query = f"select * from analytics.{view} order by {order}"  # noqa: S608 - names from this file
    rows = run.own.rows(query, role="analyst")
    loaded: list[Row] = json.loads(json.dumps(rows, default=str))
    return loaded


def _summed(rows: list[Row], key: Callable[[Row], Any], fields: tuple[str, ...]) -> dict[Any, Row]:
    out: dict[Any, Row] = {}
    for r in rows:
        acc = out.setdefault(key(r), dict.fromkeys(fields, 0))
        for f in fields:
            acc[f] += r[f]
    return out


@pytest.mark.slow
def test_the_demo_report_shows_the_analytics_views_numbers(demo_run: DemoRun) -> None:
    report = json.loads((demo_run.out / "report.json").read_text())

    # Row for row what the analyst reads in each view.
    assert report["mrr"] == _view(demo_run, "mrr_by_month", "month")
    assert report["movements"] == _view(demo_run, "subscription_movements_by_month", "month")
    assert report["dunning"] == _view(demo_run, "dunning_recovery_by_month", "month")
    assert report["revenue"] == _view(demo_run, "revenue_by_month", "month")
    assert report["credits"] == _view(demo_run, "credits_by_month", "month")
    assert report["cohorts"] == _view(
        demo_run, "cohort_retention", "cohort_month, months_since_start"
    )
    statuses = _view(demo_run, "subscribers_by_status", "status")
    assert sorted(report["statuses"], key=lambda s: s["status"]) == statuses
    clock = _view(demo_run, "clock", "as_of")[0]
    assert report["clock"]["as_of"] == clock["as_of"]

    # Sums over a view's rows, computed here from the rows.
    months = [m["month"] for m in _view(demo_run, "calendar_months", "month")]
    assert [m["month"] for m in report["mrr"]] == months
    outcome = ("attempts", "succeeded", "declined", "failed")
    daily = _summed(
        _view(demo_run, "charge_success_by_day", "day"), lambda r: r["day"][:8] + "01", outcome
    )
    zero = dict.fromkeys(outcome, 0)
    assert report["charges"] == [{"month": m, **daily.get(m, zero)} for m in months]
    by_number = _summed(
        _view(demo_run, "charge_success_by_attempt_number", "month, attempt_number"),
        lambda r: r["attempt_number"],
        outcome,
    )
    assert report["by_attempt"] == [
        {"attempt_number": n, **by_number[n]} for n in sorted(by_number)
    ]
    reasons = _summed(
        _view(demo_run, "decline_reasons_by_month", "month, error_code"),
        lambda r: (r["error_code"], r["classification"]),
        ("attempts",),
    )
    assert {(d["error_code"], d["classification"]): d["attempts"] for d in report["declines"]} == {
        k: v["attempts"] for k, v in reasons.items()
    }

    # The text summary carries the same figures.
    summary = (demo_run.out / "report.txt").read_text()
    for m in report["mrr"]:
        assert f"{m['month'][:7]}  {m['mrr']:>11,}  {m['paying_subscriptions']:>6}" in summary
    attempts = sum(m["attempts"] for m in report["charges"])
    succeeded = sum(m["succeeded"] for m in report["charges"])
    assert f"charge success rate: {succeeded / attempts:.1%}" in summary
    granted = sum(m["granted"] for m in report["credits"])
    used = sum(m["consumed"] for m in report["credits"])
    assert f"credits: {granted} granted, {used} used" in summary

    # The mix did what it is for: declines, credits spent through the Data API, everyone counted.
    assert report["declines"], "the mix declines some charges"
    assert used > 0
    assert sum(s["subscriptions"] for s in report["statuses"]) == 12


@pytest.mark.slow
def test_the_demo_invariants_hold_against_the_sandbox_ledger(demo_run: DemoRun) -> None:
    report = json.loads((demo_run.out / "report.json").read_text())
    attempts = demo_run.own.rows("select * from billing.charge_attempts")
    payments = demo_run.own.rows("select * from billing.payments")
    ledger = demo_run.own.ledger()

    period_of_order = {a["order_id"]: a["period_id"] for a in attempts}
    approvals = [e for e in ledger if e["kind"] == "approval"]
    per_period = Counter(period_of_order.get(e["orderId"]) for e in approvals)
    keys = {p["payment_key"] for p in payments}
    at_toss = sum(e["amount"] if e["kind"] == "approval" else -e["amount"] for e in ledger)
    expected = {
        "periods_charged_twice": sum(1 for n in per_period.values() if n > 1),
        "approvals_missing": sum(1 for e in approvals if e["paymentKey"] not in keys),
        "attempts_unknown": sum(1 for a in attempts if a["status"] == "unknown"),
        "money_difference": at_toss - sum(p["balance_amount"] for p in payments),
    }
    assert report["invariants"] == expected
    assert set(expected.values()) == {0}
    assert approvals, "the sandbox approved charges"
    assert "=> OK" in (demo_run.out / "report.txt").read_text()


@pytest.mark.slow
def test_subscribers_cancel_as_themselves(demo_run: DemoRun) -> None:
    # Each cancel a subscriber made is audited with their own JWT sub, under role authenticated.
    cancels = demo_run.own.rows(
        "select e.actor_role, e.actor_sub, s.user_id from billing.events e"
        " join billing.subscriptions s on s.id = e.entity_id"
        " where e.entity_type = 'subscriptions'"
        " and e.reason like 'cancel requested by subscriber%'",
    )
    assert cancels, "the mix cancels at period end"
    assert {(c["actor_role"], c["actor_sub"] == c["user_id"]) for c in cancels} == {
        ("authenticated", True)
    }


@pytest.mark.slow
def test_the_html_report_is_self_contained_and_the_system_stays_up(demo_run: DemoRun) -> None:
    page = (demo_run.out / "report.html").read_text()
    assert page.count("<svg") >= 5  # the charts, inline
    for outside in ("<script", "src=", "<link", "@import"):
        assert outside not in page
    assert "periods charged twice at the sandbox" in page
    # Left running, with directions to it.
    assert "saju-billing stack down" in demo_run.stdout
    assert httpx.get(f"{demo_run.own.sandbox_url}/v2/standard").status_code == 200


def test_the_cast_is_reproducible_and_mixed() -> None:
    cast = plan(300, 365, seed=7)
    assert cast == plan(300, 365, seed=7)
    assert cast != plan(300, 365, seed=8)
    assert {s.persona for s in cast} == set(Persona)
    assert len({s.card for s in cast}) == 300  # the sandbox counts approvals per card number
    assert sum(s.browser for s in cast) == 3
    assert 0 < sum(s.join_day > 0 for s in cast) < 300  # joins spread over months
    assert all(s.join_day + 45 <= 365 for s in cast if s.persona is Persona.RENEWAL_DECLINE_LOST)
