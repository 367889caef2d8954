"""The ``saju-billing`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _db(args: argparse.Namespace) -> int:
    from service.runtime import supervisor
    from service.runtime.api import DataApi
    from service.runtime.cluster import Runtime

    rt = Runtime.from_env()
    api = DataApi.from_env(rt)
    action: str = args.action
    if action == "start":
        rt.start()
        supervisor.ensure_networker(rt)
        print(f"local database up: {rt.dsn()}")
        print(f"API URL: {api.url}  (keys: saju-billing db status)")
    elif action == "stop":
        supervisor.stop_networker(rt)
        rt.stop()
        print("local database stopped")
    elif action == "status":
        state = rt.status()
        state["net_worker"] = supervisor.networker_pid(rt)
        state["processes"] = supervisor.owned_processes(rt)
        state["orphans"] = supervisor.orphans(rt)
        state.update(api.status())
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
    from service.runtime.api import DataApi
    from service.runtime.cluster import Runtime
    from service.runtime.signin import call_api, sign_in

    rt = Runtime.from_env()
    rt.start()
    supervisor.ensure_networker(rt)
    migrations.upgrade(rt.dsn())
    api = DataApi.from_env(rt)
    # A simulated subscriber, through the supabase client and the Data API as an app would.
    subscriber = sign_in(api, "demo-subscriber@example.com")
    credits = call_api(api, subscriber.access_token, "my_credits")
    print("saju-billing local runtime is up and migrated.")
    print(f"  database : {rt.dsn()}")
    print(f"  data API : {api.url}  (anon and service_role keys: saju-billing db status)")
    print(f"  sign in  : saju-billing token --user {subscriber.email}")
    print(f"  {subscriber.email}: api.my_credits() -> balance {credits['balance']}")
    print("  psql     : .venv/bin/saju-billing db psql")
    print("  status   : .venv/bin/saju-billing db status")
    print("  stop     : .venv/bin/saju-billing db stop")
    return 0


def _token(args: argparse.Namespace) -> int:
    from service.runtime.api import DataApi
    from service.runtime.cluster import Runtime
    from service.runtime.signin import sign_in

    rt = Runtime.from_env()
    rt.start()  # the user row goes into the local database
    try:
        signed = sign_in(DataApi.from_env(rt), args.user)
    except ValueError as exc:
        print(f"saju-billing: {exc}", file=sys.stderr)
        return 2
    print(signed.access_token)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from service.runtime import bench, supervisor
    from service.runtime.cluster import Runtime

    rt = Runtime.from_env()
    rt.start()
    supervisor.ensure_networker(rt)
    result = bench.run_net(rt, requests=args.requests, delay_ms=args.delay_ms)
    path = bench.write_result(rt, "net", result)
    print(
        f"{result.requests_per_second} requests/s ({result.requests} in {result.seconds} s); {path}"
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saju-billing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the local Supabase-compatible database")
    db.add_argument("action", choices=["start", "stop", "status", "reset", "psql", "migrate"])
    db.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to psql")
    db.set_defaults(func=_db)

    demo = sub.add_parser("demo", help="bring the local runtime up, migrate it, show the way in")
    demo.set_defaults(func=_demo)

    tk = sub.add_parser(
        "token", help="local sign-in stand-in: print a Supabase Auth-shaped user access token"
    )
    tk.add_argument("--user", required=True, help="the user's uuid or email (created if new)")
    tk.set_defaults(func=_token)

    bn = sub.add_parser("bench", help="benchmarks; results go to bench-results/")
    bn.add_argument("what", choices=["net"], help="net: the local pg_net worker's throughput")
    bn.add_argument("--requests", type=int, default=2000)
    bn.add_argument("--delay-ms", type=int, default=50, help="the endpoint's answer delay")
    bn.set_defaults(func=_bench)

    nw = sub.add_parser("net-worker", help="run the pg_net-compatible worker in the foreground")
    sv = sub.add_parser("supervise", help="run the runtime's services under a supervisor")
    for p in (nw, sv):
        # Marks the process as this runtime's, so status/start/stop find it even as an orphan.
        p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    nw.set_defaults(func=_networker)
    sv.set_defaults(func=_supervise)

    sb = sub.add_parser("sandbox", help="run the local Toss Payments sandbox")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8100)
    sb.add_argument("--webhook-url", default=None, help="where to deliver Toss-style webhooks")
    sb.add_argument("--seed", type=int, default=0, help="seed for injected fault rates")
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
