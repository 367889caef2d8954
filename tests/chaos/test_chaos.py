"""``saju-billing chaos`` at a small size, on a runtime of its own (own directory and ports): a
few hundred subscriptions over three months while Toss fails in every injected way, the service
and the net worker are SIGKILLed and Postgres crashes and restarts. The command's verdict is
checked here again, independently, from the sandbox's ledger and the tables; and the failures it
reports are found in the logs they leave."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from runtimekit import OwnRuntime, own_runtime

from service.bench.chaos import FAULTS

SUBSCRIPTIONS, MONTHS = 200, 3


@dataclass(frozen=True)
class ChaosRun:
    own: OwnRuntime
    results: dict[str, Any]
    stdout: str


def _service_errors(base: Path) -> str:
    """The service's error lines, for a failed run's message (the directory goes with it)."""
    log = base / "stack" / "service.log"
    if not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    return "\nservice errors:\n" + "\n".join(x for x in lines if '"ERROR"' in x)[-6000:]


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosRun]:
    out = tmp_path_factory.mktemp("chaos")
    with own_runtime("chaos-test") as own:
        done = own.cli(
            "chaos", "--subscriptions", str(SUBSCRIPTIONS), "--months", str(MONTHS),
            "--seed", "5", "--service-kills", "2", "--net-worker-kills", "1",
            "--postgres-restarts", "2", "--doorbells-lost", "3", "--fault-scale", "3",
            "--out", str(out),
        )  # fmt: skip
        base = own.runtime.base_dir
        assert done.returncode == 0, done.stdout + done.stderr + _service_errors(base)
        results = json.loads((out / "chaos.json").read_text())
        assert (out / "chaos.txt").read_text() in done.stdout
        yield ChaosRun(own, results, done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_failure_happened_and_nothing_broke(chaos_run: ChaosRun) -> None:
    r = chaos_run.results
    assert r["options"]["subscriptions"] == SUBSCRIPTIONS
    assert r["simulated"]["customers"] == SUBSCRIPTIONS
    assert r["kills"] == {"service": 2, "net_worker": 1}
    assert r["restarts"] == {"postgres_crash": 1, "postgres_fast": 1}
    assert r["doorbells_lost"] == 3
    assert r["environment"]["durable_mode"] is True
    # Every kind of fault fired.
    assert set(r["faults_injected"]) == {label for label, _ in FAULTS}
    assert all(n > 0 for n in r["faults_injected"].values()), r["faults_injected"]
    # Reconciliation ran over the whole span.
    assert r["reconciliation"]["runs"] >= MONTHS
    assert r["violations"]
    assert set(r["violations"].values()) == {0}
    assert r["violations_total"] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_ledgers_agree_independently(chaos_run: ChaosRun) -> None:
    ledger = chaos_run.own.ledger()
    attempts = chaos_run.own.rows(
        "select order_id, period_id, status::text from billing.charge_attempts"
    )
    payments = chaos_run.own.rows("select payment_key, balance_amount from billing.payments")
    period_of_order = {a["order_id"]: a["period_id"] for a in attempts}
    approvals = [e for e in ledger if e["kind"] == "approval"]
    assert len(approvals) == chaos_run.results["charges"]["approved_at_toss"] > SUBSCRIPTIONS
    # No period approved twice at Toss; every approval is ours and in our ledger.
    per_period = Counter(period_of_order[e["orderId"]] for e in approvals)
    assert max(per_period.values()) == 1
    assert {e["paymentKey"] for e in approvals} <= {p["payment_key"] for p in payments}
    assert not [a for a in attempts if a["status"] in ("unknown", "claimed")]
    at_toss = sum(e["amount"] if e["kind"] == "approval" else -e["amount"] for e in ledger)
    assert at_toss == sum(p["balance_amount"] for p in payments)
    # Every paid period carries its credits; every fully refunded payment's are gone.
    paid = chaos_run.own.rows(
        "select bp.id, g.amount, g.status::text as grant_status, p.balance_amount"
        "  from billing.billing_periods bp"
        "  join billing.payments p on p.id = bp.payment_id"
        "  left join billing.credit_grants g on g.period_id = bp.id and g.payment_id = p.id"
        " where bp.status = 'paid'",
    )
    assert paid
    assert all(row["amount"] == 10 for row in paid)
    assert all(row["grant_status"] != "active" for row in paid if row["balance_amount"] == 0)


@pytest.mark.slow
def test_the_failures_left_their_traces(chaos_run: ChaosRun) -> None:
    log = (chaos_run.own.runtime.log_dir / "postgres.log").read_text(errors="replace")
    # One crash recovery (the immediate stop) and two starts after the first one.
    assert (
        log.count("database system was interrupted")
        + log.count("was not properly shut down; automatic recovery in progress")
        >= 1
    )
    assert log.count("database system is ready to accept connections") >= 3
    # The webhooks the sandbox duplicated reached the service twice and were stored once.
    deliveries = httpx.get(f"{chaos_run.own.sandbox_url}/_sandbox/webhooks").json()["deliveries"]
    twice = [d for d in deliveries if sum(a["status"] == 200 for a in d["attempts"]) > 1]
    assert twice
    stored = chaos_run.own.rows("select transmission_id from billing.webhook_events")
    ids = Counter(row["transmission_id"] for row in stored)
    assert all(ids[d["transmissionId"]] == 1 for d in twice)
