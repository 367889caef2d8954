"""The ``saju-billing`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace


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

    # The demo claims durability: Supabase's settings (see Runtime.durable).
    rt = replace(Runtime.from_env(), durable=True)
    rt.start()
    supervisor.ensure_networker(rt)
    migrations.upgrade(rt.dsn())
    print("saju-billing local runtime is up (durable mode) and migrated.")
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
    from service.sandbox.app import serve

    serve(host=args.host, port=args.port, webhook_url=args.webhook_url, seed=args.seed)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.bench import scale

    results = scale.run(args.subscriptions, Path(args.out), keep=args.keep)
    print(scale.table(results), end="")
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
    sb.set_defaults(func=_sandbox)

    bench = sub.add_parser("bench", help="benchmarks (durable mode; results in bench-results/)")
    bench.add_argument("name", choices=["scale"])
    bench.add_argument("--subscriptions", type=int, default=100_000)
    bench.add_argument("--out", default="bench-results")
    bench.add_argument("--keep", action="store_true", help="keep the benchmark's database")
    bench.set_defaults(func=_bench)
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
