"""``saju-billing chaos``: months of billing through the real path while everything fails.

The demo's people and clocks (``service.demo``) drive the subscriptions through the path pg_cron
uses (``billing.tick()`` → doorbell through the net worker → service → Toss sandbox) while

* the sandbox injects faults on the Toss API and on webhook deliveries (``FAULTS``): latency,
  5xx, 429, ``PROVIDER_ERROR``, responses dropped after a committed charge or cancel, duplicated
  and delayed (so reordered) webhooks;
* the run SIGKILLs the service and the net worker, restarts Postgres (a crash and a fast
  shutdown, in durable mode), and loses doorbells the way pg_net does on a crash — each on a day
  spread over the run, while that day's charges are in flight.

Days move one at a time as in the demo; while work is left and nothing moves, both clocks go a
minute on and the tick runs again (pg_cron's next minute), so leases of killed holders run out and
the tick hands their work back. At the end the faults stop, reconciliation runs over the whole
span, and the sandbox's ledger is checked against ours: every count under ``violations`` must be 0.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from service import db
from service.demo import actors, report
from service.demo.actors import DemoError
from service.demo.run import Demo, Wires, add_months
from service.demo.run import Options as DemoOptions
from service.demo.scenario import plan
from service.runtime import supervisor

Spec = dict[str, object]
_API = ("charge", "get_payment_by_order", "cancel", "delete_billing_key")


def _on(endpoints: tuple[str, ...], label: str, spec: Spec) -> list[tuple[str, Spec]]:
    return [(label, {"endpoint": endpoint, **spec}) for endpoint in endpoints]


# (label, sandbox fault spec): what Toss and the network do wrong, and how often. Card
# registration is left alone (a failed sign-up is the subscriber's, not a billing fault).
FAULTS: tuple[tuple[str, Spec], ...] = (
    *_on(("*",), "latency", {"kind": "latency", "rate": 0.05, "seconds": 0.2}),
    *_on(_API, "http_5xx", {"kind": "error", "rate": 0.01, "status": 503}),
    *_on(_API[:3], "http_429", {"kind": "error", "rate": 0.002, "status": 429, "seconds": 1}),
    *_on(
        ("charge",),
        "provider_error",
        {
            "kind": "processed_error",
            "rate": 0.01,
            "status": 400,
            "code": "PROVIDER_ERROR",
        },
    ),
    *_on(_API[:3], "dropped_after_commit", {"kind": "drop_after_commit", "rate": 0.01}),
    *_on(("webhook",), "webhook_duplicated", {"kind": "duplicate", "rate": 0.15}),
    *_on(("webhook",), "webhook_reordered", {"kind": "delay", "rate": 0.15}),
)

STALL_S = 1.0  # no change in the work left for this long: pg_cron's next minute comes
MINUTES_LIMIT = 240  # a day that needs more of pg_cron's minutes than this is stuck
DRAIN_LIMIT_S = 900.0


class Event:
    KILL_SERVICE = "service_sigkill"
    KILL_NET_WORKER = "net_worker_sigkill"
    CRASH_POSTGRES = "postgres_crash_restart"
    RESTART_POSTGRES = "postgres_fast_restart"
    LOSE_DOORBELL = "doorbell_lost"


@dataclass(frozen=True)
class Options:
    subscriptions: int = 5000
    months: int = 12
    seed: int = 11
    service_kills: int = 6
    net_worker_kills: int = 3
    postgres_restarts: int = 2  # alternately a crash (immediate) and a fast shutdown
    doorbells_lost: int = 12
    fault_scale: float = 1.0  # multiplies every fault's rate (a short run needs more)
    out_dir: Path = Path("bench-results")
    fresh: bool = False


class Chaos(Demo):
    """The demo's run with faults and failures on a schedule of days."""

    def __init__(self, options: Options, console: Console) -> None:
        super().__init__(
            DemoOptions(
                subscribers=options.subscriptions,
                months=options.months,
                seed=options.seed,
                browser=0,
                fresh=options.fresh,
            ),
            console,
        )
        self.chaos = options
        self.day = 0
        self.schedule: dict[int, list[str]] = {}  # day -> failures on that day
        self.done: dict[str, int] = {}
        self.minutes = 0  # pg_cron minutes stepped to heal (leases, retries, delayed webhooks)
        self.fault_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------------ the schedule

    def plan_events(self, days: int) -> None:
        """Each kind of failure on days spread evenly over the run, jittered by the seed, never
        on the first day (the driver must not cut its own card registrations off)."""
        rng = random.Random(self.chaos.seed)  # noqa: S311 - a reproducible run
        o = self.chaos
        restarts = [
            Event.CRASH_POSTGRES if i % 2 == 0 else Event.RESTART_POSTGRES
            for i in range(o.postgres_restarts)
        ]
        groups = [
            [Event.KILL_SERVICE] * o.service_kills,
            [Event.KILL_NET_WORKER] * o.net_worker_kills,
            [Event.LOSE_DOORBELL] * o.doorbells_lost,
            restarts,
        ]
        for group in groups:
            for i, kind in enumerate(group):
                day = int((i + 0.5) / len(group) * days) + rng.randint(-2, 2)
                self.schedule.setdefault(min(days - 1, max(1, day)), []).append(kind)

    def next_day(self, w: Wires) -> None:
        super().next_day(w)
        self.day += 1

    # ------------------------------------------------------------------------ settling

    def settle(self, w: Wires) -> None:
        events = self.schedule.pop(self.day, [])
        if Event.LOSE_DOORBELL in events:
            self._ring_losing_doorbell(w)
        else:
            self.ring(w)
        for event in (e for e in events if e != Event.LOSE_DOORBELL):
            self._when_in_flight(w)
            self._fail(w, event)
        self._drain(w)

    def _ring_losing_doorbell(self, w: Wires) -> None:
        # The tick and the loss in one transaction: the net worker never sees that ring.
        with w.owner.transaction():
            summary = db.run_sync(w.owner, actors.tick())
            lost = db.run_sync(w.owner, db.lose_queued_doorbells())
        if summary.get("skipped"):
            self.ring(w)
        if lost == 0:
            # The tick had nothing to ring for (it rings only for claimable work): lose the
            # next day's ring instead, so the run loses as many doorbells as it was asked to.
            self.schedule.setdefault(self.day + 1, []).append(Event.LOSE_DOORBELL)
        self.done[Event.LOSE_DOORBELL] = self.done.get(Event.LOSE_DOORBELL, 0) + lost

    def _when_in_flight(self, w: Wires, limit_s: float = 5.0) -> None:
        """Waits (briefly) until the service holds charges under a lease: failures hit mid-drain."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            depths = db.run_sync(w.service, db.service_queue_depths())
            if depths["charge_attempts"]["leased"]:
                return
            time.sleep(0.01)

    def _fail(self, w: Wires, event: str) -> None:
        if event == Event.KILL_SERVICE:
            if self.stack.kill("service") is None:
                raise DemoError("the service was not running")
            self.stack.up()  # as a process manager restarts it
        elif event == Event.KILL_NET_WORKER:
            pid = supervisor.worker_pid(self.rt)
            if pid is None:
                raise DemoError("the net worker was not running")
            os.kill(pid, 9)  # SIGKILL; its supervisor starts it again
        else:
            self.rt.restart(crash=event == Event.CRASH_POSTGRES)
            self._reconnect(w)
        self.done[event] = self.done.get(event, 0) + 1
        self.console.print(f"  day {self.day}: {event}")

    def _reconnect(self, w: Wires) -> None:
        w.owner.close()
        w.service.close()
        w.owner, w.service = self.connect_database()

    def minute(self, w: Wires) -> None:
        """pg_cron's next minute: both clocks a minute on (the sandbox delivers the webhooks
        then due), then the tick."""
        db.run_sync(w.owner, actors.advance_test_clock(timedelta(minutes=1)))
        self._advance_sandbox(w.toss, timedelta(minutes=1))
        self.minutes += 1
        self.ring(w)

    def work_left(self, w: Wires) -> int:
        """The demo's, plus reconciliation runs not finished yet."""
        runs = db.run_sync(w.owner, db.ops_reconciliation_report(days=3650))
        return super().work_left(w) + sum(r["status"] in ("requested", "claimed") for r in runs)

    def _drain(self, w: Wires) -> None:
        """Until nothing is left: a minute on whenever the work left stops moving."""
        deadline = time.monotonic() + DRAIN_LIMIT_S
        last, since, quiet, minutes = -1, time.monotonic(), 0, 0
        while quiet < 2:
            if time.monotonic() > deadline or minutes > MINUTES_LIMIT:
                raise DemoError(
                    f"day {self.day}: work still left after {minutes} minutes of ticks; see the "
                    f"service's log in {self.stack.dir}"
                )
            left = self.work_left(w)
            if not left:
                quiet += 1
                time.sleep(0.01)
                continue
            quiet = 0
            if left != last:
                last, since = left, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                self.minute(w)
                minutes += 1
                since = time.monotonic()
            time.sleep(0.02)

    # ------------------------------------------------------------------------ the run

    def add_faults(self, w: Wires) -> None:
        for label, spec in FAULTS:
            rate = float(str(spec["rate"])) * self.chaos.fault_scale
            reply = w.toss.post("/_sandbox/faults", json={**spec, "rate": min(1.0, rate)})
            if reply.status_code != 200:
                raise DemoError(f"the sandbox refused fault {spec}: {reply.text}")
            self.fault_ids.setdefault(label, []).append(int(reply.json()["id"]))

    def faults_fired(self, w: Wires) -> dict[str, int]:
        fired = {f["id"]: int(f["fired"]) for f in w.toss.get("/_sandbox/faults").json()["faults"]}
        return {label: sum(fired.get(i, 0) for i in ids) for label, ids in self.fault_ids.items()}

    def finish(self, w: Wires, start: datetime) -> None:
        """Faults off; an hour on (retries after 10/20/40 minutes, webhooks after 1/4/16 and
        64 minutes); then reconciliation over every day of the run."""
        w.toss.delete("/_sandbox/faults")
        for _ in range(2):
            db.run_sync(w.owner, actors.advance_test_clock(timedelta(hours=1)))
            self._advance_sandbox(w.toss, timedelta(hours=1))
            self.settle(w)
        now = db.run_sync(w.owner, actors.advance_test_clock(timedelta(0)))
        window_start = start - timedelta(days=1)
        while window_start < now:
            window_end = min(now, window_start + timedelta(days=30))
            db.run_sync(w.owner, db.request_reconciliation(window_start, window_end))
            window_start = window_end
        self.settle(w)

    def run_chaos(self) -> dict[str, Any]:
        with self.wires() as w:
            began = time.monotonic()
            start = self.start_clock(w.owner, w.toss)
            end = add_months(start, self.o.months)
            cast = plan(self.o.subscribers, (end - start).days, self.o.seed, 0)
            self.plan_events((end - start).days)
            self.add_faults(w)
            self.console.print(
                f"[bold]Chaos:[/] {len(cast)} subscriptions over {self.o.months} months from "
                f"{start:%Y-%m-%d} (seed {self.o.seed}), faults at the sandbox, and on days "
                f"{sorted(self.schedule)}: {sum(len(v) for v in self.schedule.values())} failures"
            )
            self._months(w, start, cast)
            faults = self.faults_fired(w)
            self.finish(w, start)
            ledger = actors.ledger(w.toss)
            return self._results(w, ledger, faults, time.monotonic() - began)

    def _results(
        self, w: Wires, ledger: list[dict[str, Any]], faults: dict[str, int], seconds: float
    ) -> dict[str, Any]:
        built = report.build(w.owner, ledger)
        consistency = db.run_sync(w.owner, db.consistency_violations())
        totals = db.run_sync(w.owner, db.run_totals())
        violations = {
            "periods_charged_twice": built.invariants.periods_charged_twice,
            "approvals_missing": built.invariants.approvals_missing,
            "attempts_unknown": built.invariants.attempts_unknown,
            "money_difference_krw": abs(built.invariants.money_difference),
            **consistency,
        }
        reconciliations = db.run_sync(w.owner, db.ops_reconciliation_report(days=3650))
        approvals = [e for e in ledger if e["kind"] == "approval"]
        charges = {
            "approved_at_toss": len(approvals),
            "succeeded": sum(m.succeeded for m in built.charges),
            "declined": sum(m.declined for m in built.charges),
            "failed": sum(m.failed for m in built.charges),
            "attempts": totals["attempts"],
            "refunds_succeeded": totals["refunds_succeeded"],
            "webhooks_received": totals["webhooks_received"],
        }
        events = {
            name: self.done.get(name, 0)
            for name in (
                Event.KILL_SERVICE,
                Event.KILL_NET_WORKER,
                Event.CRASH_POSTGRES,
                Event.RESTART_POSTGRES,
                Event.LOSE_DOORBELL,
            )
        }
        with w.owner.cursor() as cur:
            postgres = str(cur.execute("select version()").fetchone())
        return {
            "benchmark": "chaos",
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "options": {
                "subscriptions": self.chaos.subscriptions,
                "months": self.chaos.months,
                "seed": self.chaos.seed,
                "fault_scale": self.chaos.fault_scale,
            },
            "simulated": {
                "from": (built.clock.started_on or built.clock.as_of.date()).isoformat(),
                "to": built.clock.as_of.isoformat(),
                "customers": totals["customers"],
                "statuses": {s.status: s.subscriptions for s in built.statuses},
            },
            "charges": charges,
            "faults_injected": faults,
            "kills": {
                "service": events[Event.KILL_SERVICE],
                "net_worker": events[Event.KILL_NET_WORKER],
            },
            "restarts": {
                "postgres_crash": events[Event.CRASH_POSTGRES],
                "postgres_fast": events[Event.RESTART_POSTGRES],
            },
            "doorbells_lost": events[Event.LOSE_DOORBELL],
            "heal_minutes": self.minutes,
            "reconciliation": {
                "runs": len(reconciliations),
                "listed": sum(r["listed"] or 0 for r in reconciliations),
                "missing_found": sum(r["missing"] or 0 for r in reconciliations),
            },
            "violations": violations,
            "violations_total": sum(violations.values()),
            "seconds": round(seconds, 1),
            "environment": {
                "durable_mode": self.rt.durable,
                "loadavg": [round(x, 2) for x in os.getloadavg()],
                "cpus": os.cpu_count(),
                "postgres": postgres,
            },
        }


def table(results: dict[str, Any]) -> str:
    """The figures as a readable table."""
    rows: list[tuple[str, str]] = [
        ("subscriptions / months", f"{results['options']['subscriptions']:,} / "
                                   f"{results['options']['months']}"),
        ("simulated", f"{results['simulated']['from'][:10]} .. {results['simulated']['to'][:10]}"),
    ]  # fmt: skip
    sections = ("charges", "faults_injected", "kills", "restarts", "reconciliation", "violations")
    for section in sections:
        rows.append((section, ""))
        rows += [(f"  {k}", f"{v:,}") for k, v in results[section].items()]
    rows += [
        ("doorbells_lost", str(results["doorbells_lost"])),
        ("heal_minutes (pg_cron minutes stepped)", str(results["heal_minutes"])),
        ("violations_total", str(results["violations_total"])),
        ("seconds", str(results["seconds"])),
        ("durable mode", str(results["environment"]["durable_mode"])),
        ("load average", str(results["environment"]["loadavg"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name.ljust(width)}  {value}".rstrip() + "\n" for name, value in rows)


def main(options: Options) -> int:
    console = Console(highlight=False, soft_wrap=True)
    if options.subscriptions < 1 or not 1 <= options.months <= 60 or options.fault_scale < 0:
        console.print(
            "saju-billing chaos: --subscriptions >= 1, --months 1..60, --fault-scale >= 0"
        )
        return 2
    chaos = Chaos(options, console)
    try:
        results = chaos.run_chaos()
    except DemoError as exc:
        console.print(f"[bold red]saju-billing chaos:[/] {exc}")
        return 2
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "chaos.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (options.out_dir / "chaos.txt").write_text(text)
    console.print(text, markup=False)
    verdict = "no violations" if not results["violations_total"] else "VIOLATIONS"
    console.print(f"[bold]{verdict}[/]; written to {options.out_dir / 'chaos.json'}")
    return 0 if not results["violations_total"] else 1
