"""The ``saju-billing`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _db(args: argparse.Namespace) -> int:
    from service.runtime import supervisor
    from service.runtime.cluster import Runtime

    rt = Runtime.from_env()
    action: str = args.action
    if action == "start":
        rt.start()
        supervisor.ensure_networker(rt)
        print(f"local database up: {rt.dsn()}")
    elif action == "stop":
        supervisor.stop_networker(rt)
        rt.stop()
        print("local database stopped")
    elif action == "status":
        state = rt.status()
        state["net_worker"] = supervisor.networker_pid(rt)
        print(json.dumps(state, indent=2))
        return 0 if state["running"] else 3
    elif action == "reset":
        supervisor.stop_networker(rt)
        rt.reset()
        supervisor.ensure_networker(rt)
        print(f"local database rebuilt: {rt.dsn()}")
    elif action == "psql":
        return rt.psql(args.rest)
    elif action == "migrate":
        from service.runtime import migrations

        rt.start()
        migrations.upgrade(rt.dsn())
        print("migrations applied")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from service.runtime import migrations, supervisor
    from service.runtime.cluster import Runtime

    rt = Runtime.from_env()
    rt.start()
    supervisor.ensure_networker(rt)
    migrations.upgrade(rt.dsn())
    print("saju-billing local runtime is up and migrated.")
    print(f"  database : {rt.dsn()}")
    print("  psql     : .venv/bin/saju-billing db psql")
    print("  status   : .venv/bin/saju-billing db status")
    print("  stop     : .venv/bin/saju-billing db stop")
    return 0


def _networker(args: argparse.Namespace) -> int:
    from service.runtime import networker

    networker.main()
    return 0


def _supervise(args: argparse.Namespace) -> int:
    from service.runtime import supervisor
    from service.runtime.cluster import Runtime

    supervisor.supervise(Runtime.from_env())
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    import os

    from service.sandbox.app import serve
    from service.sandbox.merchants import load_specs

    try:
        specs = load_specs(args.secret_key, args.secret_keys_file, dict(os.environ))
        serve(
            host=args.host,
            port=args.port,
            webhook_url=args.webhook_url,
            seed=args.seed,
            secret_keys=specs or None,
            rate_limit=None if args.no_rate_limit else args.rate_limit,
            record_failed_charges=args.record_failed_charges,
            cancel_webhooks=args.cancel_webhooks,
        )
    except (OSError, ValueError) as exc:
        print(f"saju-billing sandbox: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saju-billing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the local Supabase-compatible database")
    db.add_argument("action", choices=["start", "stop", "status", "reset", "psql", "migrate"])
    db.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to psql")
    db.set_defaults(func=_db)

    demo = sub.add_parser("demo", help="bring the local runtime up, migrate it, show the way in")
    demo.set_defaults(func=_demo)

    nw = sub.add_parser("net-worker", help="run the pg_net-compatible worker in the foreground")
    nw.set_defaults(func=_networker)
    sv = sub.add_parser("supervise", help="run the net worker under a restarting supervisor")
    sv.set_defaults(func=_supervise)

    sb = sub.add_parser("sandbox", help="run the local Toss Payments sandbox")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8100)
    sb.add_argument("--webhook-url", default=None, help="where to deliver Toss-style webhooks")
    sb.add_argument("--seed", type=int, default=0, help="seed for injected fault rates")
    sb.add_argument(
        "--secret-key",
        action="append",
        default=[],
        metavar="KEY[:KEY...]",
        help="a merchant's keys (e.g. test_ck_…:test_sk_…); repeat for more merchants; "
        "also read from --secret-keys-file and $SAJU_SANDBOX_SECRET_KEYS "
        "(default: the docs' test keys)",
    )
    sb.add_argument("--secret-keys-file", default=None, help="merchant specs, one per line")
    sb.add_argument(
        "--rate-limit",
        type=int,
        default=100,
        help="requests per minute per test secret key and API (default: Toss's 100)",
    )
    sb.add_argument("--no-rate-limit", action="store_true", help="turn the rate limit off")
    sb.add_argument(
        "--record-failed-charges",
        action="store_true",
        help="keep a failed charge as an ABORTED payment findable by orderId",
    )
    sb.add_argument(
        "--cancel-webhooks",
        choices=["status_change", "every_cancel", "none"],
        default="status_change",
        help="when a cancel sends PAYMENT_STATUS_CHANGED (default: on a status change)",
    )
    sb.set_defaults(func=_sandbox)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from service.runtime.cluster import LocalRuntimeError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except LocalRuntimeError as exc:
        print(f"saju-billing: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
