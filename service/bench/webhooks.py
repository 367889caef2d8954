"""``saju-billing bench webhooks``: webhook ingest at ``POST /webhooks/toss``.

N distinct Toss-shaped events (``PAYMENT_STATUS_CHANGED`` for payments the sandbox really holds,
and ``BILLING_DELETED``), each with its own transmission id; a share of them is sent twice (a
retry carries the same transmission id and body), and the whole list is shuffled. ``concurrency``
keep-alive connections send them as fast as the service answers; each request's latency is
taken from its first byte sent to the whole answer read. The service runs as its own process
with its worker on, so it also processes what it stores while the load goes on (re-fetching each
payment at the sandbox), as in production.

Afterwards every distinct event must be in the inbox exactly once and every answer a 200.
Figures in ``bench-results/webhooks.json``: ``events_per_s`` (requests answered ÷ seconds) and
latency percentiles (``p50_ms``, ``p99_ms``, ``max_ms``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from service.bench import harness
from service.bench.harness import Bench

PAYMENTS = 20


@dataclass(frozen=True)
class Options:
    events: int = 20_000
    duplicates: float = 0.1
    concurrency: int = 32
    durable: bool = True
    statements: bool = True
    seed: int = 7
    ports: tuple[int, int] | None = None  # the sandbox's and the service's; default from env


def _payments(bench: Bench) -> list[dict[str, Any]]:
    """Real payments at the sandbox (a card registered and charged), for the events to name."""
    found = []
    with bench.toss() as toss:
        for i in range(PAYMENTS):
            customer_key = f"ck_bench_{i:04d}"
            minted = toss.post("/_sandbox/auth-keys", json={"customerKey": customer_key}).json()
            issued = toss.post(
                "/v1/billing/authorizations/issue",
                json={"authKey": minted["authKey"], "customerKey": customer_key},
            ).json()
            charged = toss.post(
                f"/v1/billing/{issued['billingKey']}",
                json={
                    "customerKey": customer_key,
                    "amount": 9900,
                    "orderId": f"bench-wh-{uuid.uuid4().hex[:16]}",
                    "orderName": "Pro",
                },
            )
            charged.raise_for_status()
            found.append(charged.json())
    return found


def events(n: int, payments: list[dict[str, Any]], seed: int) -> list[tuple[str, bytes]]:
    """N distinct (transmission id, body) pairs, alternating the two event types."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible load, not secrecy
    out = []
    for i in range(n):
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        if i % 2 == 0:
            payment = payments[rng.randrange(len(payments))]
            body = {"eventType": "PAYMENT_STATUS_CHANGED", "createdAt": created, "data": payment}
        else:
            sha = hashlib.sha256(f"gone-{seed}-{i}".encode()).hexdigest()
            body = {
                "eventType": "BILLING_DELETED",
                "createdAt": created,
                "data": {"billingKeySha256": sha, "reason": "삭제 API 요청"},
            }
        out.append((f"bench-{seed}-{i:08d}", json.dumps(body, ensure_ascii=False).encode()))
    return out


def with_duplicates(
    distinct: list[tuple[str, bytes]], share: float, seed: int
) -> list[tuple[str, bytes]]:
    """Every event once, a ``share`` of them twice, in shuffled order."""
    rng = random.Random(seed + 1)  # noqa: S311
    sent = distinct + rng.sample(distinct, round(len(distinct) * share))
    rng.shuffle(sent)
    return sent


async def _send_all(
    port: int, requests: list[tuple[str, bytes]], concurrency: int
) -> tuple[list[float], dict[int, int], float]:
    """Sends every request over ``concurrency`` keep-alive connections; returns each latency,
    the count per status and the elapsed seconds.

    A plain HTTP/1.1 writer over asyncio streams rather than an HTTP client library: the load
    generator shares the machine's cores with the service it measures, and a full client costs
    several times the CPU per request of what is being measured.
    """
    queue = iter(requests)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for transmission, body in queue:
                head = (
                    f"POST /webhooks/toss HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                    "content-type: application/json\r\n"
                    f"tosspayments-webhook-transmission-id: {transmission}\r\n"
                    "tosspayments-webhook-transmission-retried-count: 0\r\n"
                    f"content-length: {len(body)}\r\n\r\n"
                ).encode()
                started = time.perf_counter()
                writer.write(head + body)
                await writer.drain()
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(status_line.split()[1])
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(options: Options, out_dir: Path) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to ``out_dir``)."""
    o = options
    with harness.bench_database(o.durable, o.ports) as bench:
        bench.start_sandbox(rate_limit=None)
        payments = _payments(bench)
        service = bench.start_service()
        distinct = events(o.events, payments, o.seed)
        sent = with_duplicates(distinct, o.duplicates, o.seed)
        with psycopg.connect(bench.dsn(), autocommit=True) as conn, harness.admin(bench) as su:
            environment = harness.environment(conn, bench.rt)
            statements = o.statements and harness.reset_statements(su)
            cpu_before = harness.sample_cpu(bench.rt, service.pid)
            latencies, statuses, seconds = asyncio.run(
                _send_all(bench.service_port, sent, o.concurrency)
            )
            cpu = harness.sample_cpu(bench.rt, service.pid).minus(cpu_before)
            db_time = harness.statement_times(su) if statements else None
            stored = conn.execute(
                "select transmission_id, count(*) from billing.webhook_events"
                " group by transmission_id"
            ).fetchall()
        rss = harness.peak_rss_mb(service.pid)
    stored_ids = {str(t): int(c) for t, c in stored}
    sent_ids = {t for t, _ in distinct}
    checks = {
        "distinct_events": len(sent_ids),
        "requests": len(sent),
        "duplicates_sent": len(sent) - len(sent_ids),
        "stored": sum(stored_ids.values()),
        "lost": len(sent_ids - stored_ids.keys()),
        "stored_twice": sum(1 for c in stored_ids.values() if c > 1),
        "unexpected": len(stored_ids.keys() - sent_ids),
        "non_200": sum(n for s, n in statuses.items() if s != 200),
    }
    checks["ok"] = (
        checks["lost"] == 0
        and checks["stored_twice"] == 0
        and checks["unexpected"] == 0
        and checks["non_200"] == 0
    )
    results: dict[str, Any] = {
        "benchmark": "webhooks",
        "settings": {
            "events": o.events,
            "duplicate_share": o.duplicates,
            "concurrency": o.concurrency,
            "event_types": ["PAYMENT_STATUS_CHANGED", "BILLING_DELETED"],
            "order": "shuffled",
        },
        "figures": {
            "events_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(_percentile(latencies, 99) * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2),
            "cpu_ms_per_event": round(cpu.total * 1000 / len(latencies), 3),
            "service_rss_mb": rss,
        },
        "checks": checks,
        "detail": {
            "seconds": round(seconds, 3),
            "statuses": statuses,
            "cpu_s": {
                "service": cpu.service,
                "postgres": cpu.postgres,
                "net_worker": cpu.net_worker,
            },
            "db_statements": db_time,
        },
        "goals": {"events_per_s": ">= 1000", "p99_ms": "<= 50"},
        **environment,
    }
    results["notes"] = notes(results)
    harness.write(out_dir, "webhooks", results, table)
    return results


def notes(results: dict[str, Any]) -> list[str]:
    f = results["figures"]
    out = []
    if f["events_per_s"] < 1000:
        out.append(
            f"events_per_s {f['events_per_s']} < 1000: CPU per event {f['cpu_ms_per_event']} ms"
            f" (service + Postgres) on {results['machine']['cpus']} shared cores, load average"
            f" {results['load_average_before']} before the run; database time: "
            + harness.costliest(results["detail"]["db_statements"], results["checks"]["requests"])
        )
    if f["p99_ms"] > 50:
        out.append(f"p99_ms {f['p99_ms']} > 50 at {results['settings']['concurrency']} senders")
    return out


def table(results: dict[str, Any]) -> str:
    f, s, c = results["figures"], results["settings"], results["checks"]
    rows = [
        (
            "events (distinct / sent / duplicates)",
            f"{c['distinct_events']:,} / {c['requests']:,} / {c['duplicates_sent']:,}",
        ),
        ("senders", f"{s['concurrency']}"),
        ("events_per_s", f"{f['events_per_s']}"),
        ("p50_ms / p99_ms / max_ms", f"{f['p50_ms']} / {f['p99_ms']} / {f['max_ms']}"),
        ("cpu_ms_per_event", f"{f['cpu_ms_per_event']}  (CPU s: {results['detail']['cpu_s']})"),
        ("service_rss_mb (peak)", f"{f['service_rss_mb']}"),
        (
            "checks (lost / stored twice / non-200)",
            f"{c['lost']} / {c['stored_twice']} / {c['non_200']}  {'ok' if c['ok'] else 'FAILED'}",
        ),
        (
            "load average before / after",
            f"{results['load_average_before']} / {results.get('load_average_after')}",
        ),
        ("durable mode", str(results["durable_mode"])),
    ]
    rows += [("note", n) for n in results["notes"]]
    return harness.table(rows)
