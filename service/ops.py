"""``saju-billing ops …``: what support and operators run against the billing database.

Connects as the database owner (``--database-url`` or ``$DATABASE_URL``; default the local
runtime) and calls the operator functions. Tables for people, ``--json`` for scripts. Exit codes:
0 done, 2 refused (the message says why, with the SQLSTATE's meaning; nothing changed),
1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from rich.console import Console
from rich.table import Table

from service import db

# The local runtime's main database (its port follows SAJU_DB_PORT, as the runtime's does).
LOCAL_DATABASE = (
    f"postgresql://postgres:postgres@127.0.0.1:{os.environ.get('SAJU_DB_PORT', '54322')}/postgres"
)

# What a refusal means, in the words of the SQLSTATE table (README).
MEANING = {
    "SB400": "invalid input",
    "SB403": "not allowed here",
    "SB404": "not found",
    "SB409": "the current state does not allow it",
    "SB422": "refused by a billing rule",
}


def add_parser(sub: Any) -> None:
    ops = sub.add_parser("ops", help="operator commands (status, history, refunds, cancels, …)")
    ops.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", LOCAL_DATABASE),
        help="the database, as its owner (default: $DATABASE_URL or the local runtime)",
    )
    ops.add_argument("--json", action="store_true", help="machine-readable output")
    cmds = ops.add_subparsers(dest="ops_command", required=True)
    cmds.add_parser("status", help="billing at a glance")
    h = cmds.add_parser("history", help="a subscriber's audit trail")
    h.add_argument("subscriber", help="user id, customer id or subscription id")
    a = cmds.add_parser("alerts", help="alerts raised (default: the last 7 days)")
    a.add_argument("--days", type=int, default=7)
    r = cmds.add_parser("refund", help="refund a payment, in full or in part")
    r.add_argument("payment_id", type=UUID)
    r.add_argument("--amount", type=int, default=None, help="KRW; default: what is refundable")
    r.add_argument("--reason", default="requested by support")
    c = cmds.add_parser("cancel", help="end a subscription now")
    c.add_argument("subscription_id", type=UUID)
    c.add_argument("--prorate", action="store_true", help="refund the unused share of the period")
    c.add_argument("--reason", default="canceled by support")
    t = cmds.add_parser("retry", help="charge an unpaid period again now")
    t.add_argument("subscription_id", type=UUID)
    t.add_argument("--reason", default="retry by support")
    k = cmds.add_parser(
        "reconcile", help="reconcile Toss's transactions (default: yesterday, Asia/Seoul)"
    )
    k.add_argument("--since", type=datetime.fromisoformat, default=None, help="ISO 8601 instant")
    k.add_argument("--until", type=datetime.fromisoformat, default=None, help="ISO 8601 instant")
    cmds.add_parser("reconciliations", help="recent reconciliation runs")
    ops.set_defaults(func=main)


def _call(args: argparse.Namespace, conn: psycopg.Connection[Any]) -> tuple[str, Any]:
    match args.ops_command:
        case "status":
            return "status", db.run_sync(conn, db.ops_status())
        case "history":
            return "table", db.run_sync(conn, db.ops_history(args.subscriber))
        case "alerts":
            since = datetime.now(UTC) - timedelta(days=args.days)
            return "table", db.run_sync(conn, db.ops_alerts(since))
        case "refund":
            refund = db.run_sync(conn, db.request_refund(args.payment_id, args.amount, args.reason))
            return "status", {"refundId": refund, "state": "requested; the service makes it"}
        case "cancel":
            ended = db.cancel_subscription_now(args.subscription_id, args.prorate, args.reason)
            return "status", db.run_sync(conn, ended)
        case "retry":
            retry = db.retry_subscription_charge(args.subscription_id, args.reason)
            return "status", {"attemptId": db.run_sync(conn, retry)}
        case "reconcile":
            if args.since is None and args.until is None:
                return "status", {
                    "reconciliationId": db.run_sync(conn, db.schedule_reconciliation())
                }
            until = args.until or datetime.now(UTC)
            window = db.request_reconciliation(args.since or until - timedelta(days=1), until)
            return "status", {"reconciliationId": db.run_sync(conn, window)}
        case "reconciliations":
            return "table", db.run_sync(conn, db.ops_reconciliation_report())
    raise AssertionError(args.ops_command)


def _show(kind: str, result: Any, as_json: bool, console: Console) -> None:
    if as_json:
        console.print_json(json.dumps(result, default=str))
        return
    if kind == "status":
        table = Table("what", "value", show_header=False)
        for key, value in dict(result).items():
            table.add_row(key, _text(value))
    else:
        rows: Sequence[Mapping[str, Any]] = result
        if not rows:
            console.print("nothing to show")
            return
        table = Table(*rows[0].keys())
        for row in rows:
            table.add_row(*(_text(v) for v in row.values()))
    console.print(table)


def _text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "" if value is None else str(value)


def main(args: argparse.Namespace) -> int:
    console = Console()
    try:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            kind, result = _call(args, conn)
    except db.BillingError as exc:
        meaning = MEANING.get(exc.sqlstate or "", "refused")
        print(f"saju-billing ops: {meaning} ({exc.sqlstate}): {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"saju-billing ops: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    except (psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedFunction) as exc:
        print(
            f"saju-billing ops: this database is not migrated ({exc.diag.message_primary}); "
            "apply the migrations first (saju-billing db migrate locally, supabase db push or "
            "alembic upgrade head on a hosted project)",
            file=sys.stderr,
        )
        return 1
    _show(kind, result, args.json, console)
    return 0
