"""The pg_net-compatible worker of the local runtime.

On Supabase, pg_net's background worker sends what ``net.http_get/http_post/http_delete`` queue in
``net.http_request_queue`` and writes each outcome to ``net._http_response``. Debian has no
pg_net, so ``supabase/local/30_net.sql`` provides its SQL API and this process does the worker's
job for every database of the local cluster that has the ``net`` schema (pg_net serves a single
database; tests here use one database each).

Per database it keeps one connection as ``postgres`` (the role Supabase runs pg_net's worker as,
not a superuser) named like pg_net's worker (``pg_net 0.20.4``), listening for ``net.wake()`` (a
NOTIFY, so only committed requests wake it) and ``net.worker_restart()``. On connecting and on
every wake it loops as pg_net's worker does: delete expired responses, take up to
``pg_net.batch_size`` queued requests in id order, send them concurrently with libcurl (pg_net's
own transfer engine, through pycurl), record one response row each, pause, and go again while
there was work.

Failure mode, as on Supabase: a batch leaves the queue in its own short transaction *before* any
request is sent, and the responses are written in another one after. No transaction is open while
HTTP calls are in flight, so a worker killed mid-batch loses that batch (never sends it twice),
just as a crashed pg_net worker loses its unlogged tables. Databases are rediscovered every
second; connections to databases that are dropped, or that become templates, simply end. The
worker exits when its supervisor dies, so it never runs on as an orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pycurl  # type: ignore[import-untyped]
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from service.runtime.cluster import BASE_DB, MAIN_DB, Runtime

PG_NET_VERSION = "0.20.4"
# pg_net's worker reports this application_name; net.check_worker_is_up() looks for it.
APPLICATION_NAME = f"pg_net {PG_NET_VERSION}"
LAUNCHER_NAME = "saju-billing net launcher"
USER_AGENT = f"pg_net/{PG_NET_VERSION}"
WAKE_CHANNEL = "pg_net_wake"
RESTART_CHANNEL = "pg_net_worker_restart"

# Supabase runs pg_net's worker as postgres (pg_net.username), not as the bootstrap superuser.
WORKER_ROLE = "postgres"
DISCOVERY_INTERVAL = 1.0
NO_NET_RECHECK = 5.0
BATCH_PAUSE = 1.0  # pg_net's pause between batches, counted here from the batch's start
DEFAULT_TTL = "6 hours"
DEFAULT_BATCH_SIZE = 200
MAX_BATCH_SIZE = 32767
MAX_REDIRECTS = 30  # libcurl's default

# --- SQL ---------------------------------------------------------------------------------------

_DISCOVER = """
    select datname from pg_catalog.pg_database
    where not datistemplate and datallowconn and datconnlimit <> -2 and datname <> %(base)s
"""

_HAS_NET = """
    select pg_catalog.to_regclass('net.http_request_queue') is not null
       and pg_catalog.to_regclass('net._http_response') is not null
"""

# pg_net reads its GUCs from the server configuration; database settings win here so a test can
# give its own database a short ttl.
_SETTINGS = """
    select pg_catalog.current_setting('pg_net.ttl', true) as ttl,
           pg_catalog.current_setting('pg_net.batch_size', true) as batch_size
"""

_EXPIRE_RESPONSES = """
    with rows as (
      select ctid from net._http_response
      where created < pg_catalog.now() - %(ttl)s::interval
      order by created
      limit %(batch_size)s
    )
    delete from net._http_response r using rows where r.ctid = rows.ctid
"""

# A TRUNCATE (or any stronger lock) on the queue makes the worker skip this round instead of
# waiting in a query, so it keeps answering net.worker_restart() and wakes meanwhile.
_LOCK_QUEUE = "lock table net.http_request_queue in row exclusive mode nowait"

# As pg_net's, plus SKIP LOCKED so that a second worker on the same cluster cannot double-send.
_CONSUME_QUEUE = """
    with rows as (
      select id from net.http_request_queue
      order by id
      limit %(batch_size)s
      for update skip locked
    )
    delete from net.http_request_queue q using rows where q.id = rows.id
    returning q.id,
              q.method::text as method,
              q.url,
              q.timeout_milliseconds,
              array(select key || ': ' || value from jsonb_each_text(q.headers)) as headers,
              q.body
"""

_INSERT_RESPONSE = """
    insert into net._http_response
      (id, status_code, content, headers, content_type, timed_out, error_msg)
    values
      (%(id)s, %(status_code)s, %(content)s, %(headers)s, %(content_type)s, %(timed_out)s,
       %(error_msg)s)
"""


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuedRequest:
    id: int
    method: str
    url: str
    timeout_milliseconds: int
    headers: list[str] | None  # 'Name: value' lines, as pg_net hands them to curl
    body: bytes | None


@dataclass(frozen=True)
class Outcome:
    """One ``net._http_response`` row."""

    id: int
    status_code: int | None = None
    content: str | None = None
    headers: dict[str, str] | None = None
    content_type: str | None = None
    timed_out: bool = False
    error_msg: str | None = None

    def params(self) -> dict[str, object]:
        return {
            "id": self.id,
            "status_code": self.status_code,
            "content": self.content,
            "headers": Jsonb(self.headers) if self.headers is not None else None,
            "content_type": self.content_type,
            "timed_out": self.timed_out,
            "error_msg": self.error_msg,
        }


@dataclass(frozen=True)
class Settings:
    ttl: str
    batch_size: int


class Ending(enum.Enum):
    NO_NET = "no net schema"
    LOST = "connection lost"
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    ending: Ending
    served: bool  # the worker had reached LISTEN before it ended
    detail: str = ""


class RestartRequested(Exception):
    """``net.worker_restart()`` was called in the database."""


def _log(message: str) -> None:
    print(f"net worker: {message}", file=sys.stderr, flush=True)


# --- HTTP --------------------------------------------------------------------------------------
#
# Transfers run on libcurl itself (through pycurl), as pg_net's do: one multi handle per batch,
# every request concurrent, libcurl's own defaults, header parsing and error texts. A batch runs
# in a thread (libcurl releases the GIL), so the event loop keeps serving other databases.

_PROTOCOLS = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
_SELECT_SECONDS = 0.2  # how often a running batch checks whether the worker is stopping


def _text(raw: bytes) -> str:
    # Stored as C strings by pg_net: cut at a NUL; bytes that are not UTF-8 are replaced
    # (text columns would reject them).
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _refusal(lines: Sequence[str] | None) -> str | None:
    for line in lines or ():
        if "\r" in line or "\n" in line:
            # Would inject headers or a body; pg_net 0.20.5+ refuses such requests this way.
            return f'header "{line.partition(":")[0]}" contains a carriage return or line feed'
    return None


def timeout_message(handle: Any, timeout_ms: int) -> str:
    """pg_net's detailed timeout text, from libcurl's phase timings."""
    namelookup = float(handle.getinfo(pycurl.NAMELOOKUP_TIME))
    connect = float(handle.getinfo(pycurl.CONNECT_TIME))
    appconnect = float(handle.getinfo(pycurl.APPCONNECT_TIME))
    pretransfer = float(handle.getinfo(pycurl.PRETRANSFER_TIME))
    total = float(handle.getinfo(pycurl.TOTAL_TIME))
    # A phase that hit the deadline reports 0: the step is told apart by what did start.
    if namelookup == 0 and connect == 0:
        dns, handshake, http = total, 0.0, 0.0
    elif pretransfer == 0:
        dns, handshake, http = namelookup, total - namelookup, 0.0
    else:
        tls = appconnect - connect if appconnect > 0 else 0.0
        dns, handshake, http = namelookup, (connect - namelookup) + tls, total - pretransfer
    return (
        f"Timeout of {timeout_ms} ms reached. Total time: {total * 1000:f} ms "
        f"(DNS time: {dns * 1000:f} ms, TCP/SSL handshake time: {handshake * 1000:f} ms, "
        f"HTTP Request/Response time: {http * 1000:f} ms)"
    )


@dataclass
class _Transfer:
    request: QueuedRequest
    handle: Any
    body: io.BytesIO = field(default_factory=io.BytesIO)
    header_lines: list[bytes] = field(default_factory=list)

    def on_header(self, line: bytes) -> None:
        if line.startswith(b"HTTP/"):
            self.header_lines.clear()  # a new response (after a redirect or a 100): its own
        else:
            self.header_lines.append(line)

    def success(self) -> Outcome:
        headers: dict[str, str] = {}
        for line in self.header_lines:
            name, colon, value = line.rstrip(b"\r\n").partition(b":")
            if colon:
                headers[_text(name)] = _text(value.strip(b" \t"))
        content_type = self.handle.getinfo(pycurl.CONTENT_TYPE)
        return Outcome(
            id=self.request.id,
            status_code=int(self.handle.getinfo(pycurl.RESPONSE_CODE)),
            content=_text(self.body.getvalue()) or None,
            headers=headers,
            content_type=str(content_type) if content_type is not None else None,
        )

    def failure(self, errno: int) -> Outcome:
        if errno == pycurl.E_OPERATION_TIMEDOUT:
            message = timeout_message(self.handle, self.request.timeout_milliseconds)
            return Outcome(id=self.request.id, timed_out=True, error_msg=message)
        return Outcome(id=self.request.id, error_msg=str(pycurl.easy_strerror(errno)))


def _transfer(req: QueuedRequest) -> _Transfer:
    handle = pycurl.Curl()
    transfer = _Transfer(req, handle)
    method = req.method.upper()
    handle.setopt(pycurl.URL, req.url)
    handle.setopt(pycurl.PROTOCOLS, _PROTOCOLS)
    handle.setopt(pycurl.REDIR_PROTOCOLS, _PROTOCOLS)
    handle.setopt(pycurl.FOLLOWLOCATION, 1)
    handle.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
    handle.setopt(pycurl.TIMEOUT_MS, max(req.timeout_milliseconds, 0))
    handle.setopt(pycurl.NOSIGNAL, 1)
    # Local targets only; a proxy from the environment would only get in the way.
    handle.setopt(pycurl.PROXY, "")
    if req.headers is not None:
        handle.setopt(pycurl.HTTPHEADER, [*req.headers, f"User-Agent: {USER_AGENT}"])
    # The body is a C string for pg_net: it ends at the first NUL.
    body = req.body.split(b"\0", 1)[0] if req.body is not None else None
    if method == "POST":
        handle.setopt(pycurl.POSTFIELDS, body or b"")
    elif method == "DELETE":
        handle.setopt(pycurl.CUSTOMREQUEST, "DELETE")
        if body is not None:
            handle.setopt(pycurl.POSTFIELDS, body)
    handle.setopt(pycurl.WRITEFUNCTION, transfer.body.write)
    handle.setopt(pycurl.HEADERFUNCTION, transfer.on_header)
    return transfer


def send_batch(requests: Sequence[QueuedRequest], stop: threading.Event) -> list[Outcome]:
    """Send a batch concurrently and return one outcome per request (fewer if stopped)."""
    outcomes: dict[int, Outcome] = {}
    multi = pycurl.CurlMulti()
    running: dict[int, _Transfer] = {}
    try:
        for req in requests:
            refusal = _refusal(req.headers)
            if refusal is not None:
                outcomes[req.id] = Outcome(id=req.id, error_msg=refusal)
                continue
            try:
                transfer = _transfer(req)
            except pycurl.error as exc:  # an option libcurl refuses: an error row, as in pg_net
                outcomes[req.id] = Outcome(
                    id=req.id, error_msg=str(pycurl.easy_strerror(exc.args[0]))
                )
                continue
            running[id(transfer.handle)] = transfer
            multi.add_handle(transfer.handle)
        while running and not stop.is_set():
            while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            while True:
                queued, ok, failed = multi.info_read()
                for handle in ok:
                    done = running.pop(id(handle))
                    outcomes[done.request.id] = done.success()
                    multi.remove_handle(handle)
                    handle.close()
                for handle, errno, _detail in failed:
                    done = running.pop(id(handle))
                    outcomes[done.request.id] = done.failure(int(errno))
                    multi.remove_handle(handle)
                    handle.close()
                if not queued:
                    break
            if running:
                multi.select(_SELECT_SECONDS)
    finally:
        # Stopping mid-batch: what is still in flight is lost, as on a pg_net crash.
        for transfer in running.values():
            multi.remove_handle(transfer.handle)
            transfer.handle.close()
        multi.close()
    return [outcomes[r.id] for r in requests if r.id in outcomes]


# --- one database ------------------------------------------------------------------------------


def _settings(row: tuple[str | None, str | None] | None) -> Settings:
    ttl, batch = row if row is not None else (None, None)
    try:
        batch_size = int(batch) if batch else DEFAULT_BATCH_SIZE
    except ValueError:
        batch_size = DEFAULT_BATCH_SIZE
    if not 0 <= batch_size <= MAX_BATCH_SIZE:
        batch_size = DEFAULT_BATCH_SIZE
    return Settings(ttl=ttl or DEFAULT_TTL, batch_size=batch_size)


async def _wait_for_notifications(
    conn: psycopg.AsyncConnection[Any], wait_seconds: float | None
) -> list[str]:
    """Channels of the notifications that arrive within ``wait_seconds`` (None: until one)."""
    channels = [n.channel async for n in conn.notifies(timeout=wait_seconds, stop_after=1)]
    if RESTART_CHANNEL in channels:
        raise RestartRequested
    return channels


class DatabaseWorker:
    """Serves the ``net`` queue of one database until it is dropped or the worker stops."""

    def __init__(self, rt: Runtime, dbname: str, stop: threading.Event) -> None:
        self.rt = rt
        self.dbname = dbname
        self.stop = stop
        self.served = False

    async def run(self) -> Result:
        try:
            while True:
                try:
                    await self._session()
                except RestartRequested:
                    continue  # reconnect: database settings are read at connection start
                return Result(Ending.NO_NET, self.served)
        except psycopg.OperationalError as exc:
            # Dropped (WITH FORCE), server shutting down, or not reachable right now.
            return Result(Ending.LOST, self.served, str(exc).strip())
        except Exception as exc:  # one database's trouble must not stop the others
            _log(f"{self.dbname}: {type(exc).__name__}: {str(exc).strip()}")
            return Result(Ending.FAILED, self.served, str(exc).strip())

    async def _session(self) -> None:
        """One connection: returns if the database has no ``net`` schema."""
        conn = await psycopg.AsyncConnection.connect(
            self.rt.dsn(self.dbname, WORKER_ROLE),
            autocommit=True,
            application_name=APPLICATION_NAME,
            connect_timeout=10,
        )
        async with conn:
            row = await (await conn.execute(_HAS_NET)).fetchone()
            if row is None or not row[0]:
                return
            await conn.execute(f"listen {WAKE_CHANNEL}")
            await conn.execute(f"listen {RESTART_CHANNEL}")
            self.served = True
            # pg_net's worker starts awake: work queued while nobody listened is sent now.
            # (net.worker_restart() reloads the configuration itself, as pg_net's does.)
            while True:
                await self._drain(conn)
                await _wait_for_notifications(conn, wait_seconds=None)

    async def _drain(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            started = time.monotonic()
            cur = await conn.execute(_SETTINGS)
            settings = _settings(await cur.fetchone())
            expired = await self._expire(conn, settings)
            consumed = await self._batch(conn, settings)
            if expired == 0 and consumed == 0:
                return
            # pg_net pauses between batches; a wake or a restart ends the pause early. Counting
            # the pause from the batch's start keeps a backlog moving at batch_size per second.
            pause = max(0.0, BATCH_PAUSE - (time.monotonic() - started))
            await _wait_for_notifications(conn, wait_seconds=pause)

    async def _expire(self, conn: psycopg.AsyncConnection[Any], settings: Settings) -> int:
        cur = await conn.execute(
            _EXPIRE_RESPONSES, {"ttl": settings.ttl, "batch_size": settings.batch_size}
        )
        return max(cur.rowcount, 0)

    async def _take(
        self, conn: psycopg.AsyncConnection[Any], settings: Settings
    ) -> list[QueuedRequest] | None:
        """Take a batch off the queue and commit; None when the queue is locked (skip a round)."""
        try:
            async with conn.transaction():
                await conn.execute(_LOCK_QUEUE)
                async with conn.cursor(row_factory=class_row(QueuedRequest)) as cur:
                    await cur.execute(_CONSUME_QUEUE, {"batch_size": settings.batch_size})
                    return await cur.fetchall()
        except psycopg.errors.LockNotAvailable:
            return None

    async def _batch(self, conn: psycopg.AsyncConnection[Any], settings: Settings) -> int:
        """One pg_net iteration: take (committed), send with no transaction open, record."""
        requests = await self._take(conn, settings)
        if requests is None:
            return 1  # stay awake and try again after the pause
        if not requests:
            return 0
        outcomes = await asyncio.to_thread(send_batch, requests, self.stop)
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(_INSERT_RESPONSE, [o.params() for o in outcomes])
        return len(requests)


# --- the cluster -------------------------------------------------------------------------------


class Launcher:
    """Keeps one DatabaseWorker per database that has the ``net`` schema."""

    def __init__(self, rt: Runtime, stop: threading.Event) -> None:
        self.rt = rt
        self.stop = stop
        self.tasks: dict[str, asyncio.Task[Result]] = {}
        self.retry_at: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.reachable = True

    async def _databases(self) -> set[str] | None:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = await psycopg.AsyncConnection.connect(
                    self.rt.dsn(MAIN_DB, WORKER_ROLE),
                    autocommit=True,
                    application_name=LAUNCHER_NAME,
                    connect_timeout=10,
                )
            rows = await (await self.conn.execute(_DISCOVER, {"base": BASE_DB})).fetchall()
        except psycopg.Error as exc:
            if self.reachable:
                _log(f"cluster not reachable, retrying: {str(exc).strip()}")
                self.reachable = False
            if self.conn is not None:
                await self.conn.close()
                self.conn = None
            return None
        if not self.reachable:
            _log("cluster reachable again")
            self.reachable = True
        return {str(name) for (name,) in rows}

    def _finished(self, dbname: str, result: Result, now: float) -> None:
        if result.ending is Ending.NO_NET:
            self.retry_at[dbname] = now + NO_NET_RECHECK
            return
        count = 1 if result.served else self.failures.get(dbname, 0) + 1
        self.failures[dbname] = count
        if result.ending is Ending.LOST and count == 3:
            _log(f"{dbname}: cannot stay connected: {result.detail}")
        self.retry_at[dbname] = now + min(DISCOVERY_INTERVAL * 2 ** (count - 1), 30.0)

    async def step(self) -> None:
        names = await self._databases()
        if names is None:
            return
        now = time.monotonic()
        for dbname, task in list(self.tasks.items()):
            if dbname not in names:
                task.cancel()
                del self.tasks[dbname]
            elif task.done():
                del self.tasks[dbname]
                if not task.cancelled():
                    self._finished(dbname, task.result(), now)
        for dbname in list(self.retry_at):
            if dbname not in names:
                del self.retry_at[dbname]
                self.failures.pop(dbname, None)
        for dbname in sorted(names - self.tasks.keys()):
            if self.retry_at.get(dbname, 0.0) <= now:
                worker = DatabaseWorker(self.rt, dbname, self.stop)
                self.tasks[dbname] = asyncio.create_task(worker.run(), name=f"net:{dbname}")

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks.values():
            task.cancel()
        # A batch in flight when the worker stops is lost, as on a pg_net crash.
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        if self.conn is not None:
            await self.conn.close()


async def serve(rt: Runtime, stop: asyncio.Event) -> None:
    """Serve the cluster until ``stop`` is set or the process that started this one is gone."""
    parent = os.getppid()
    launcher = Launcher(rt, threading.Event())
    try:
        while not stop.is_set():
            if os.getppid() != parent:
                _log("supervisor gone; stopping")
                return
            await launcher.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DISCOVERY_INTERVAL)
    finally:
        await launcher.close()


async def _main(rt: Runtime) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _log(f"serving the databases of {rt.host}:{rt.port} as {APPLICATION_NAME!r}")
    await serve(rt, stop)
    _log("stopped")


def main() -> None:
    """Entry point of ``saju-billing net-worker``."""
    asyncio.run(_main(Runtime.from_env()))
