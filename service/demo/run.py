"""The demo's driver: the stack up, a test clock on the main database, months of days.

Each simulated day, at 10:00 KST: the day's people act (join and register a card, cancel,
resume, use credits, fix a card, get a refund; Toss deletes a key), then ``billing.tick()`` runs
(the function pg_cron runs every minute; its doorbell reaches the service through pg_net) and the
demo waits until the service has drained every queue, then moves both clocks (the database's
test clock and the sandbox's) one day on. The main database must hold no billing data yet: the
test clock is refused on a database with payments, and the report reads the whole database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from service import db
from service.demo import actors, render, report
from service.demo.actors import DemoError, Endpoints
from service.demo.scenario import Subscriber, plan
from service.runtime import stack as stack_mod
from service.runtime.api import DataApi
from service.runtime.cluster import Runtime

KST = ZoneInfo("Asia/Seoul")
DRAIN_TIMEOUT_S = 120.0
_USE = "사주 풀이"  # what a credit is spent on: one saju reading


@dataclass(frozen=True)
class Options:
    subscribers: int = 300
    months: int = 12
    seed: int = 7
    browser: int = 3
    out_dir: Path | None = None
    fresh: bool = False


@dataclass
class Tally:
    """What the people did (the system's answers are in the report)."""

    joined: int = 0
    cards_fixed: int = 0
    cancels: int = 0
    resumes: int = 0
    credits_tried: int = 0
    credits_refused: int = 0
    refunds: int = 0
    keys_deleted: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def refuse(self, what: str) -> None:
        self.refused[what] = self.refused.get(what, 0) + 1


def first_of_next_month(now: datetime) -> datetime:
    local = now.astimezone(KST)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return datetime(year, month, 1, 10, 0, tzinfo=KST)


def add_months(start: datetime, months: int) -> datetime:
    total = start.month - 1 + months
    return start.replace(year=start.year + total // 12, month=total % 12 + 1)


@dataclass
class Wires:
    """The demo's ways into the running system (a driver that restarts the database reconnects
    them in place)."""

    owner: psycopg.Connection[Any]  # the operator's functions, the scheduler, the test clock
    service: psycopg.Connection[Any]  # as billing_service: the queue depths
    app: actors.App  # subscribers, through the Data API with their own tokens
    toss: httpx.Client  # the sandbox, as the merchant (and as Toss itself)
    web: httpx.Client  # a browser without JavaScript
    ep: Endpoints
    browser: actors.Browser | None  # headless Chromium for a handful of cards


class Demo:
    def __init__(self, options: Options, console: Console) -> None:
        self.o = options
        self.console = console
        self.rt = Runtime.from_env()
        self.stack = stack_mod.Stack(self.rt)
        # Subscribers reach the api functions the way an app does: PostgREST behind the gateway.
        self.data_api = DataApi.from_env(self.rt)
        self.tally = Tally()
        self.fixed_since: dict[str, datetime] = {}  # user -> trouble episode already fixed
        self.cards_used: dict[str, int] = {}  # user -> good cards registered so far

    # ------------------------------------------------------------------------------ set up

    def bring_up(self) -> Endpoints:
        if self.o.fresh:
            self.console.print("[bold]Starting fresh:[/] the local database is thrown away")
            self.stack.down()
            self.rt.destroy()
        self.console.print("[bold]Bringing the stack up[/] (database, Toss sandbox, service) …")
        self.stack.up()
        return Endpoints(
            service_url=self.stack.service_url,
            sandbox_url=self.stack.sandbox_url,
            client_key=stack_mod.DOCS_CLIENT_KEY,
            secret_key=stack_mod.DOCS_SECRET_KEY,
        )

    def start_clock(self, owner: psycopg.Connection[Any], toss: httpx.Client) -> datetime:
        if db.run_sync(owner, actors.holds_billing_data()):
            raise DemoError(
                "the main database already holds billing data (an earlier demo?), and the demo "
                "needs an empty one.\n  Start fresh: saju-billing demo --fresh   "
                "(or: saju-billing stack down && saju-billing db reset, then run the demo again)"
            )
        # The sandbox keeps its state in memory; with an empty database none of it is ours.
        toss.post("/_sandbox/reset", json={})
        start = first_of_next_month(datetime.now(KST))
        try:
            db.run_sync(owner, actors.start_test_clock(start))
        except db.Forbidden as exc:
            raise DemoError(f"{exc}\n  Start fresh: saju-billing demo --fresh") from None
        sandbox_now = datetime.fromisoformat(toss.get("/_sandbox/clock").json()["now"])
        self._advance_sandbox(toss, start - sandbox_now)
        return start

    @staticmethod
    def _advance_sandbox(toss: httpx.Client, by: timedelta) -> None:
        if by > timedelta(0):
            toss.post("/_sandbox/clock/advance", json={"seconds": by.total_seconds()})

    def next_day(self, w: Wires) -> None:
        """Both clocks one day on: the database's test clock and the sandbox's."""
        db.run_sync(w.owner, actors.advance_test_clock(timedelta(days=1)))
        self._advance_sandbox(w.toss, timedelta(days=1))

    # ------------------------------------------------------------------------------ waiting

    def ring(self, w: Wires) -> dict[str, Any]:
        """What pg_cron does each minute: ``billing.tick()``, which rings the service."""
        # pg_cron's own tick may hold the lock this very moment: then ours comes right after.
        while (summary := db.run_sync(w.owner, actors.tick())).get("skipped"):
            time.sleep(0.05)
        return summary

    def work_left(self, w: Wires) -> int:
        """Queue rows the service could claim now or holds under a lease, plus webhooks the
        sandbox is still sending."""
        depths = db.run_sync(w.service, db.service_queue_depths())
        return _work_left(depths) + actors.webhooks_pending(w.toss)

    def settle(self, w: Wires) -> None:
        """Rings (tick) and waits until the service has nothing left to do, including webhooks the
        sandbox is still sending."""
        self.ring(w)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        quiet = 0
        while quiet < 2:
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the service did not drain its queues within {DRAIN_TIMEOUT_S:.0f} s; "
                    f"see its log in {self.stack.dir}"
                )
            if self.work_left(w):
                quiet = 0
                time.sleep(0.02)
            else:
                quiet += 1
                time.sleep(0.01)

    # ------------------------------------------------------------------------------ people

    def register(self, w: Wires, sub: Subscriber, card: str, browser: bool = False) -> None:
        customer_key = w.app.begin_registration(sub.user_id, sub.email)
        if browser and w.browser is not None:
            w.browser.register_card(w.ep, customer_key, card)
        else:
            actors.register_card_http(w.web, w.ep, customer_key, card)

    def _try(self, what: str, action: Callable[[], object]) -> bool:
        try:
            action()
        except (db.BillingError, actors.Refused):
            # A refusal the app or support would see (e.g. nothing left to resume); nothing changed.
            self.tally.refuse(what)
            return False
        return True

    def act(
        self, w: Wires, day: int, cast: list[Subscriber], status: Callable[[str], None]
    ) -> None:
        live = db.run_sync(w.owner, actors.live_subscriptions())
        joining = [s for s in cast if s.join_day == day]
        for i, sub in enumerate(joining, 1):
            status(f"sign-ups {i}/{len(joining)}")
            self.register(w, sub, sub.card, browser=sub.browser)
            self.tally.joined += 1
        for sub in cast:
            s = live.get(sub.user_id)
            if s is None:
                continue
            who = (sub.user_id, sub.email)
            if (
                sub.cancel_day == day
                and not s.cancel_at_period_end
                and self._try("cancel", partial(w.app.cancel_subscription, *who))
            ):
                self.tally.cancels += 1
            if (
                sub.resume_after_days is not None
                and sub.cancel_day is not None
                and day == sub.cancel_day + sub.resume_after_days
                and s.cancel_at_period_end
                and self._try("resume", partial(w.app.resume_subscription, *who))
            ):
                self.tally.resumes += 1
            if sub.refund_day == day:
                self._refund(w, sub)
            if sub.key_delete_day == day and actors.delete_billing_key(w.toss, s.customer_key):
                self.tally.keys_deleted += 1
            if s.status == "active" and sub.credits_per_month:
                self._use_credits(w, sub, day)

    def _refund(self, w: Wires, sub: Subscriber) -> None:
        # Support: `saju-billing ops history <user>`, then `saju-billing ops refund <payment>`.
        payment = db.run_sync(w.owner, actors.latest_payment(sub.user_id))
        if payment is None:
            return
        reason = "charged by mistake" if sub.refund_amount is None else "goodwill: service outage"
        call = db.request_refund(payment, sub.refund_amount, reason)
        if self._try("refund", partial(db.run_sync, w.owner, call)):
            self.tally.refunds += 1

    def _use_credits(self, w: Wires, sub: Subscriber, day: int) -> None:
        # Spread over the month: on day d, the uses due by d minus those due by d - 1.
        due = (day + 1) * sub.credits_per_month // 30 - day * sub.credits_per_month // 30
        use = partial(w.app.consume_credit, sub.user_id, sub.email, _USE)
        for _ in range(due):
            self.tally.credits_tried += 1
            if not self._try("credit", use):
                self.tally.credits_refused += 1

    def fix_cards(self, w: Wires, now: datetime, cast: list[Subscriber]) -> int:
        """Subscribers asked for a card (or in dunning) who register a new one in time."""
        live = db.run_sync(w.owner, actors.live_subscriptions())
        fixed = 0
        for sub in cast:
            s = live.get(sub.user_id)
            if s is None or sub.fix_after_days is None or s.trouble_since is None:
                continue
            if self.fixed_since.get(sub.user_id) == s.trouble_since:
                continue
            if now - s.trouble_since >= timedelta(days=sub.fix_after_days):
                n = self.cards_used[sub.user_id] = self.cards_used.get(sub.user_id, 0) + 1
                self.register(w, sub, sub.good_card(n))
                self.fixed_since[sub.user_id] = s.trouble_since
                self.tally.cards_fixed += 1
                fixed += 1
        return fixed

    # ------------------------------------------------------------------------------ the run

    def connect_database(self) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        """The database connections of the wires: the owner's, and one as billing_service."""
        owner = psycopg.connect(self.rt.dsn(), autocommit=True)
        try:
            service = psycopg.connect(self.rt.dsn(), autocommit=True)
            db.run_sync(service, db.set_role("billing_service"))
        except BaseException:
            owner.close()
            raise
        return owner, service

    @contextmanager
    def wires(self) -> Iterator[Wires]:
        """The stack up, and the demo's ways into it; on the way out every one is closed,
        including database connections a restart put in place of the first ones."""
        ep = self.bring_up()
        with (
            actors.toss(ep) as toss,
            httpx.Client(timeout=60) as web,
            actors.App(self.data_api) as app,
            self._browser() as browser,
        ):
            w = Wires(*self.connect_database(), app, toss, web, ep, browser)
            try:
                yield w
            finally:
                w.owner.close()
                w.service.close()

    def run(self) -> report.Report:
        with self.wires() as w:
            start = self.start_clock(w.owner, w.toss)
            end = add_months(start, self.o.months)
            cast = plan(self.o.subscribers, (end - start).days, self.o.seed, self.o.browser)
            self.console.print(
                f"[bold]Simulating {self.o.months} months[/] from {start:%Y-%m-%d} with "
                f"{len(cast)} subscribers (seed {self.o.seed}); each day: people act, "
                "billing.tick() rings the service through pg_net, the service drains."
            )
            self._months(w, start, cast)
            self.settle(w)
            return report.build(w.owner, actors.ledger(w.toss))

    def _browser(self) -> AbstractContextManager[actors.Browser | None]:
        if self.o.browser <= 0:
            return nullcontext()
        if not Path(actors.CHROMIUM).exists():
            self.console.print(f"[yellow]{actors.CHROMIUM} not found: every card goes over HTTP")
            return nullcontext()
        return actors.Browser()

    def _months(self, w: Wires, start: datetime, cast: list[Subscriber]) -> None:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("days"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        day = 0
        with Progress(*columns, console=self.console) as progress:
            for m in range(self.o.months):
                month_start = add_months(start, m)
                month_days = (add_months(start, m + 1) - month_start).days
                task = progress.add_task(f"{month_start:%Y-%m}", total=month_days, status="")
                status = partial(_set_status, progress, task)
                for _ in range(month_days):
                    if day > 0:
                        self.next_day(w)
                    self.act(w, day, cast, status)
                    self.settle(w)
                    if self.fix_cards(w, start + timedelta(days=day), cast):
                        self.settle(w)
                    live = db.run_sync(w.owner, actors.live_subscriptions()).values()
                    status(
                        f"{sum(s.status == 'active' for s in live)} active, "
                        f"{sum(s.status == 'past_due' for s in live)} past due"
                    )
                    progress.advance(task)
                    day += 1


def _set_status(progress: Progress, task: TaskID, text: str) -> None:
    progress.update(task, status=text)


def main(options: Options) -> int:
    console = Console(highlight=False, soft_wrap=True)
    if options.subscribers < 1 or not 1 <= options.months <= 60 or options.browser < 0:
        console.print("saju-billing demo: --subscribers >= 1, --months 1..60, --browser >= 0")
        return 2
    demo = Demo(options, console)
    began = time.monotonic()
    try:
        result = demo.run()
    except DemoError as exc:
        console.print(f"[bold red]saju-billing demo:[/] {exc}")
        return 2
    out = options.out_dir or demo.rt.root / ".local" / "demo"
    people = asdict(demo.tally)
    paths = render.write(result, out, people)
    console.print(render.text(result, people), markup=False)
    console.print(f"[bold]Done[/] in {time.monotonic() - began:.0f} s; the report:")
    for p in paths:
        console.print(f"  {p}")
    st = demo.stack
    cli = ".venv/bin/saju-billing"
    console.print(
        "\n[bold]The system is still running[/] (on the demo's test clock; run these from the "  # noqa: S608 - directions, not a query
        "repository root, with the same SAJU_* variables if you set any):\n"
        f"  billing service  {st.service_url}   (/metrics, /openapi.json, "
        "/billing/cards/<customerKey>)\n"
        f"  Toss sandbox     {st.sandbox_url}   (/_sandbox/ledger, /_sandbox/webhooks)\n"
        f"  Data API         {demo.data_api.url}/rest/v1/   (keys: {cli} db status; "
        f"a subscriber's token: {cli} token --user <email>)\n"
        f"  database         {demo.rt.dsn()}\n"
        f"  psql             {cli} db psql   (tables in schema billing: \\dt billing.*)\n"
        f"  as the analyst   {cli} db psql -c 'set role analyst' "
        "-c 'select * from analytics.mrr_by_month'\n"
        f"  as support       {cli} ops status   ({cli} ops alerts, ops history <user id>)\n"
        f"  logs             {st.dir}   ({cli} stack status)\n"
        f"  stop             {cli} stack down   (the service, the sandbox and the database)\n"
        f"  start over       {cli} demo --fresh"
    )
    return 0 if result.invariants.ok else 1


def _work_left(depths: dict[str, dict[str, int]]) -> int:
    """Rows the service could claim now or holds under a lease, over every queue."""
    return sum(q["ready"] + q["leased"] for q in depths.values())
