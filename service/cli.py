"""The ``saju-billing`` command."""

from __future__ import annotations

import argparse
import json
import os
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
    from pathlib import Path

    try:
        from service.demo.run import Options, main
    except ImportError as exc:
        print(f"saju-billing demo: {exc} (pip install -e '.[demo]')", file=sys.stderr)
        return 2

    # The demo claims durability: Supabase's settings (see Runtime.durable).
    os.environ.setdefault("SAJU_DB_DURABLE", "1")
    return main(
        Options(
            subscribers=args.subscribers,
            months=args.months,
            seed=args.seed,
            browser=args.browser,
            out_dir=Path(args.out) if args.out else None,
            fresh=args.fresh,
        )
    )


def _chaos(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from service.bench.chaos import Options, main
    except ImportError as exc:
        print(f"saju-billing chaos: {exc} (pip install -e '.[demo]')", file=sys.stderr)
        return 2

    # A restart of Postgres must not lose committed results: Supabase's settings.
    os.environ["SAJU_DB_DURABLE"] = "1"
    return main(
        Options(
            subscriptions=args.subscriptions,
            months=args.months,
            seed=args.seed,
            service_kills=args.service_kills,
            net_worker_kills=args.net_worker_kills,
            postgres_restarts=args.postgres_restarts,
            doorbells_lost=args.doorbells_lost,
            fault_scale=args.fault_scale,
            out_dir=Path(args.out),
            fresh=args.fresh,
        )
    )


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


def _service(args: argparse.Namespace) -> int:
    import uvicorn

    from service import logs
    from service.app import build_app
    from service.settings import SettingsError, load

    try:
        settings = load()
    except SettingsError as exc:
        print(f"saju-billing service: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level)
    # uvicorn's access log would print query strings (the success redirect's authKey).
    uvicorn.run(
        build_app(settings),
        host=args.host,
        port=args.port,
        ws="none",
        log_config=None,
        access_log=False,
    )
    return 0


def _configure(args: argparse.Namespace) -> int:
    import secrets

    import psycopg

    from service import db

    token = args.doorbell_token or secrets.token_urlsafe(32)
    try:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            result = db.run_sync(conn, db.ops_configure_doorbell(args.service_url, token))
    except db.BillingError as exc:
        print(f"saju-billing configure: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if not args.doorbell_token:
        # Shown once, for the service's SAJU_DOORBELL_TOKEN; it is stored only in Vault.
        print(f"SAJU_DOORBELL_TOKEN={token}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from service.crypto import Keyring

    print(f"{args.key_id}:{Keyring.generate_key()}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    """Re-seals every stored billing key under the active key id, online and resumable."""
    import psycopg

    from service import db
    from service.settings import SettingsError, load

    try:
        settings = load()
    except SettingsError as exc:
        print(f"saju-billing keys rotate: {exc}", file=sys.stderr)
        return 2
    keyring = settings.keyring()
    rotated = 0
    with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        db.run_sync(conn, db.set_role(settings.db_role))
        while batch := db.run_sync(conn, db.service_keys_to_rotate(keyring.active_key_id, 100)):
            for m in batch:
                sealed = keyring.reseal(
                    m.billing_key_ciphertext, m.billing_key_key_id, m.customer_key
                )
                result = db.run_sync(
                    conn,
                    db.service_record_key_rotated(
                        m.payment_method_id, m.billing_key_key_id, sealed
                    ),
                )
                rotated += result.changed
    print(json.dumps({"rotated": rotated, "activeKeyId": keyring.active_key_id}))
    return 0


def _stack(args: argparse.Namespace) -> int:
    from service.runtime import stack

    return stack.main(args.action)


def _bench_scale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.bench import scale

    results = scale.run(args.subscriptions, Path(args.out), keep=args.keep)
    print(scale.table(results), end="")
    return 0


def _bench_billing(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.bench import billing

    options = billing.Options(
        subscriptions=args.subscriptions,
        latency_ms=args.latency_ms,
        concurrency=args.concurrency,
        rate_limit=args.rate_limit,
        batch=args.batch,
        seed_subscriptions=args.seed_subscriptions,
    )
    results = billing.run(options, Path(args.out))
    print(billing.table(results), end="")
    return 0 if results["checks"]["ok"] else 1


def _bench_webhooks(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.bench import webhooks

    options = webhooks.Options(
        events=args.events, duplicates=args.duplicates, concurrency=args.concurrency
    )
    results = webhooks.run(options, Path(args.out))
    print(webhooks.table(results), end="")
    return 0 if results["checks"]["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    from service import ops

    parser = argparse.ArgumentParser(prog="saju-billing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the local Supabase-compatible database")
    db.add_argument("action", choices=["start", "stop", "status", "reset", "psql", "migrate"])
    db.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to psql")
    db.set_defaults(func=_db)

    demo = sub.add_parser(
        "demo",
        help="simulate months of billing through the whole local stack, then write a report",
    )
    demo.add_argument("--subscribers", type=int, default=300, help="how many (default 300)")
    demo.add_argument("--months", type=int, default=12, help="how many months (default 12)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the subscribers' mix")
    demo.add_argument(
        "--browser", type=int, default=3, help="cards registered in headless Chromium (default 3)"
    )
    demo.add_argument("--out", default=None, help="report directory (default .local/demo)")
    demo.add_argument(
        "--fresh",
        action="store_true",
        help="throw the local database away first (the demo needs one without billing data)",
    )
    demo.set_defaults(func=_demo)

    ch = sub.add_parser(
        "chaos",
        help="billing through the whole local stack while Toss, the service, the net worker and "
        "Postgres fail; checks the ledgers afterwards (results in bench-results/chaos.json)",
    )
    ch.add_argument("--subscriptions", type=int, default=5000, help="how many (default 5000)")
    ch.add_argument("--months", type=int, default=12, help="simulated months (default 12)")
    ch.add_argument("--seed", type=int, default=11, help="seed of the subscribers and failures")
    ch.add_argument("--service-kills", type=int, default=6, help="SIGKILLs of the service")
    ch.add_argument("--net-worker-kills", type=int, default=3, help="SIGKILLs of the net worker")
    ch.add_argument(
        "--postgres-restarts", type=int, default=2, help="restarts: a crash, then a fast stop, …"
    )
    ch.add_argument("--doorbells-lost", type=int, default=12, help="ticks whose ring is dropped")
    ch.add_argument(
        "--fault-scale", type=float, default=1.0, help="multiplies every fault's rate (default 1)"
    )
    ch.add_argument("--out", default="bench-results", help="where chaos.json/.txt go")
    ch.add_argument(
        "--fresh",
        action="store_true",
        help="throw the local database away first (the run needs one without billing data)",
    )
    ch.set_defaults(func=_chaos)

    tk = sub.add_parser(
        "token", help="local sign-in stand-in: print a Supabase Auth-shaped user access token"
    )
    tk.add_argument("--user", required=True, help="the user's uuid or email (created if new)")
    tk.set_defaults(func=_token)

    bn = sub.add_parser("bench", help="benchmarks; results go to bench-results/")
    bn_sub = bn.add_subparsers(dest="what", required=True)
    net = bn_sub.add_parser("net", help="the local pg_net worker's throughput")
    net.add_argument("--requests", type=int, default=2000)
    net.add_argument("--delay-ms", type=int, default=50, help="the endpoint's answer delay")
    net.set_defaults(func=_bench)
    scale = bn_sub.add_parser("scale", help="the billing core at size (durable mode)")
    scale.add_argument("--subscriptions", type=int, default=100_000)
    scale.add_argument("--out", default="bench-results")
    scale.add_argument("--keep", action="store_true", help="keep the benchmark's database")
    scale.set_defaults(func=_bench_scale)
    bill = bn_sub.add_parser(
        "billing",
        help="a renewal run through the real path against the sandbox, beside the seed's design",
    )
    bill.add_argument("--subscriptions", type=int, default=10_000, help="renewals due at once")
    bill.add_argument("--latency-ms", type=int, default=100, help="the sandbox's charge latency")
    bill.add_argument("--concurrency", type=int, default=32, help="the service's Toss calls")
    bill.add_argument(
        "--rate-limit",
        type=int,
        default=15_000,
        help="charges a minute, the sandbox's limit and the service's (default 15,000)",
    )
    bill.add_argument("--batch", type=int, default=20, help="the service's claim batch")
    bill.add_argument(
        "--seed-subscriptions",
        type=int,
        default=200,
        help="subscriptions the seed's design charges (sequential; extrapolated to all)",
    )
    bill.add_argument("--out", default="bench-results")
    bill.set_defaults(func=_bench_billing)
    wh = bn_sub.add_parser(
        "webhooks", help="webhook ingest: events/s and latency, duplicates and shuffled order"
    )
    wh.add_argument("--events", type=int, default=20_000, help="distinct events")
    wh.add_argument("--duplicates", type=float, default=0.1, help="share sent twice (0.1)")
    wh.add_argument("--concurrency", type=int, default=32, help="senders at once")
    wh.add_argument("--out", default="bench-results")
    wh.set_defaults(func=_bench_webhooks)

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

    svc = sub.add_parser("service", help="run the billing service (settings from SAJU_* variables)")
    svc.add_argument("--host", default="127.0.0.1")
    svc.add_argument("--port", type=int, default=8000)
    svc.add_argument("--log-level", default="info")
    svc.set_defaults(func=_service)

    cf = sub.add_parser("configure", help="point billing.tick's doorbell at the service (Vault)")
    cf.add_argument(
        "--service-url", required=True, help="the service's base URL, seen from Postgres"
    )
    cf.add_argument("--doorbell-token", default=None, help="default: a new random token")
    cf.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ops.LOCAL_DATABASE),
        help="the database, as its owner (postgres); default: $DATABASE_URL or the local runtime",
    )
    cf.set_defaults(func=_configure)

    st = sub.add_parser(
        "stack", help="the whole local system: database, Toss sandbox and service, wired together"
    )
    st.add_argument("action", choices=["up", "down", "status"])
    st.set_defaults(func=_stack)

    ops.add_parser(sub)

    keys = sub.add_parser("keys", help="billing-key encryption keys")
    keys_sub = keys.add_subparsers(dest="keys_action", required=True)
    gen = keys_sub.add_parser("generate", help="print a new keyring entry id:base64key")
    gen.add_argument("key_id")
    gen.set_defaults(func=_keys)
    rot = keys_sub.add_parser(
        "rotate", help="re-seal every stored billing key under SAJU_BILLING_ACTIVE_KEY_ID"
    )
    rot.set_defaults(func=_rotate)
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
