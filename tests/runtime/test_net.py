"""The pg_net-compatible layer: pg_net 0.20.4's SQL API (supabase/local/30_net.sql) and the worker
that delivers committed requests (service/runtime/networker.py), against the real local cluster.

Expected values are transcribed from the reference (supabase-platform.md §1), so drift fails here.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pycurl  # type: ignore[import-untyped]
import pytest
import uvicorn
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from service.runtime import supervisor
from service.runtime.cluster import ADMIN_USER, MAIN_DB, Runtime

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]

DEADLINE = 30.0
WORKER_APP = "pg_net 0.20.4"


# --- a local HTTP endpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class Endpoint:
    """Records every request; a few paths answer specially (see ``_handle``)."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str) -> list[Seen]:
        return [s for s in list(self.seen) if s.path == path]

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        self.seen.append(
            Seen(
                method=request.method,
                path=path,
                query=request.url.query,
                headers=[(k.decode(), v.decode()) for k, v in request.headers.raw],
                body=await request.body(),
            )
        )
        parts = path.strip("/").split("/")
        if parts[0] == "status":
            return PlainTextResponse(f"answered {parts[1]}", status_code=int(parts[1]))
        if parts[0] == "sleep":
            await asyncio.sleep(int(parts[1]) / 1000)
            return PlainTextResponse("slept")
        if parts[0] == "slow":
            group = parts[1]
            self.active[group] = self.active.get(group, 0) + 1
            self.peak[group] = max(self.peak.get(group, 0), self.active[group])
            try:
                await asyncio.sleep(0.5)
            finally:
                self.active[group] -= 1
            return PlainTextResponse("slow")
        if parts[0] == "redirect":
            return RedirectResponse("/" + "/".join(["echo", *parts[1:]]), status_code=302)
        return JSONResponse({"method": request.method, "path": path, "query": request.url.query})


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()
    app = Starlette(routes=[Route("/{rest:path}", ep._handle, methods=["GET", "POST", "DELETE"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    ep.port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    eventually(lambda: server.started, "the test endpoint to start")
    yield ep
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


# --- helpers -----------------------------------------------------------------------------------


def eventually(check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def response_row(conn: Conn, request_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "select id, status_code, content_type, headers, content, timed_out, error_msg,"
            " created from net._http_response where id = %s",
            (request_id,),
        )
        return cur.fetchone()


def wait_response(conn: Conn, request_id: int) -> dict[str, Any]:
    return eventually(lambda: response_row(conn, request_id), f"response {request_id}")


def scalar(conn: Conn, query: str, params: tuple[Any, ...] | None = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def worker_backends(conn: Conn) -> list[int]:
    """Backend pids of the net worker connected to this connection's database."""
    conn.execute("select pg_stat_clear_snapshot()")
    rows = conn.execute(
        "select pid from pg_stat_activity where application_name = %s"
        " and datname = current_database()",
        (WORKER_APP,),
    ).fetchall()
    return [int(r[0]) for r in rows]


@pytest.fixture
def net_conn(base_conn: Conn) -> Conn:
    """``base_conn`` (as postgres, bootstrap-only database) once the worker serves it."""
    base_conn.execute("set statement_timeout = '30s'")
    base_conn.execute("select net.wait_until_running()")
    base_conn.execute("reset statement_timeout")
    return base_conn


@pytest.fixture
def admin_base_conn(rt: Runtime, base_dbname: str) -> Iterator[Conn]:
    with psycopg.connect(rt.dsn(base_dbname, ADMIN_USER), autocommit=True) as c:
        yield c


def unique(prefix: str) -> str:
    return f"/{prefix}/{uuid.uuid4().hex[:10]}"


# --- the SQL surface ---------------------------------------------------------------------------

# name -> (arguments with defaults, result); all volatile unless listed in IMMUTABLE.
EXPECTED_FUNCTIONS = {
    "_await_response": ("request_id bigint", "boolean"),
    "_encode_url_with_params_array": ("url text, params_array text[]", "text"),
    "_http_collect_response": (
        "request_id bigint, async boolean DEFAULT true",
        "net.http_response_result",
    ),
    "_urlencode_string": ("string character varying", "text"),
    "check_worker_is_up": ("", "void"),
    "http_collect_response": (
        "request_id bigint, async boolean DEFAULT true",
        "net.http_response_result",
    ),
    "http_delete": (
        "url text, params jsonb DEFAULT '{}'::jsonb, headers jsonb DEFAULT '{}'::jsonb, "
        "timeout_milliseconds integer DEFAULT 5000, body jsonb DEFAULT NULL::jsonb",
        "bigint",
    ),
    "http_get": (
        "url text, params jsonb DEFAULT '{}'::jsonb, headers jsonb DEFAULT '{}'::jsonb, "
        "timeout_milliseconds integer DEFAULT 5000",
        "bigint",
    ),
    "http_post": (
        "url text, body jsonb DEFAULT '{}'::jsonb, params jsonb DEFAULT '{}'::jsonb, "
        """headers jsonb DEFAULT '{"Content-Type": "application/json"}'::jsonb, """
        "timeout_milliseconds integer DEFAULT 5000",
        "bigint",
    ),
    "wait_until_running": ("", "void"),
    "wake": ("", "void"),
    "worker_restart": ("", "boolean"),
}
IMMUTABLE = {"_urlencode_string", "_encode_url_with_params_array"}


def test_functions_have_pg_nets_signatures_and_properties(base_conn: Conn) -> None:
    rows = base_conn.execute(
        "select proname, pg_get_function_arguments(oid), pg_get_function_result(oid),"
        " provolatile, proisstrict, proparallel, prosecdef, proretset, proconfig, proacl,"
        " pg_get_userbyid(proowner)"
        " from pg_proc where pronamespace = 'net'::regnamespace order by proname"
    ).fetchall()
    assert {r[0]: (r[1], r[2]) for r in rows} == EXPECTED_FUNCTIONS
    # volatility, strict, parallel, security definer, set-returning, SET clauses, ACL, owner.
    # No ACL is the default: EXECUTE for PUBLIC, as the extension leaves it. worker_restart() is
    # the one SECURITY DEFINER function: pg_net's C code reloads the configuration without
    # checking the caller's privileges (see 30_net.sql).
    assert {r[0]: tuple(r[3:]) for r in rows} == {
        name: (
            "i" if name in IMMUTABLE else "v",
            False,
            "u",
            name == "worker_restart",
            False,
            ['search_path=""'] if name == "worker_restart" else None,
            None,
            "supabase_admin",
        )
        for name in EXPECTED_FUNCTIONS
    }


def test_tables_are_unlogged_with_pg_nets_columns(base_conn: Conn) -> None:
    def columns(table: str) -> list[tuple[str, str, bool, str | None]]:
        return [
            (str(r[0]), str(r[1]), bool(r[2]), r[3])
            for r in base_conn.execute(
                "select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
                " pg_get_expr(d.adbin, d.adrelid)"
                " from pg_attribute a left join pg_attrdef d"
                "   on d.adrelid = a.attrelid and d.adnum = a.attnum"
                " where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped"
                " order by a.attnum",
                (table,),
            ).fetchall()
        ]

    assert columns("net.http_request_queue") == [
        ("id", "bigint", True, "nextval('net.http_request_queue_id_seq'::regclass)"),
        ("method", "net.http_method", True, None),
        ("url", "text", True, None),
        ("headers", "jsonb", False, None),
        ("body", "bytea", False, None),
        ("timeout_milliseconds", "integer", True, None),
    ]
    assert columns("net._http_response") == [
        ("id", "bigint", False, None),
        ("status_code", "integer", False, None),
        ("content_type", "text", False, None),
        ("headers", "jsonb", False, None),
        ("content", "text", False, None),
        ("timed_out", "boolean", False, None),
        ("error_msg", "text", False, None),
        ("created", "timestamp with time zone", True, "now()"),
    ]
    relations = base_conn.execute(
        "select relname, relkind, relpersistence, relacl::text, pg_get_userbyid(relowner)"
        " from pg_class where relnamespace = 'net'::regnamespace order by relname"
    ).fetchall()
    table_acl = "{supabase_admin=arwdDxt/supabase_admin,=arwdDxt/supabase_admin}"
    assert relations == [
        ("_http_response", "r", "u", table_acl, "supabase_admin"),
        ("_http_response_created_idx", "i", "u", None, "supabase_admin"),
        ("http_request_queue", "r", "u", table_acl, "supabase_admin"),
        (
            "http_request_queue_id_seq",
            "S",
            "u",
            "{supabase_admin=rwU/supabase_admin,=rwU/supabase_admin}",
            "supabase_admin",
        ),
        ("http_response", "c", "p", None, "supabase_admin"),
        ("http_response_result", "c", "p", None, "supabase_admin"),
    ]
    # No primary key or any other constraint; one plain index on created.
    assert (
        scalar(
            base_conn,
            "select count(*) from pg_constraint where conrelid in"
            " ('net.http_request_queue'::regclass, 'net._http_response'::regclass)",
        )
        == 0
    )
    assert base_conn.execute(
        "select indexdef from pg_indexes where schemaname = 'net'"
    ).fetchall() == [
        ("CREATE INDEX _http_response_created_idx ON net._http_response USING btree (created)",)
    ]


def test_types_and_domain(base_conn: Conn) -> None:
    assert scalar(base_conn, "select enum_range(null::net.request_status)::text") == (
        "{PENDING,SUCCESS,ERROR}"
    )

    def attributes(type_name: str) -> list[tuple[str, str]]:
        return [
            (str(r[0]), str(r[1]))
            for r in base_conn.execute(
                "select attname, format_type(atttypid, atttypmod) from pg_attribute"
                " where attrelid = (select typrelid from pg_type where oid = %s::regtype)"
                " order by attnum",
                (type_name,),
            ).fetchall()
        ]

    assert attributes("net.http_response") == [
        ("status_code", "integer"),
        ("headers", "jsonb"),
        ("body", "text"),
    ]
    assert attributes("net.http_response_result") == [
        ("status", "net.request_status"),
        ("message", "text"),
        ("response", "net.http_response"),
    ]
    assert base_conn.execute(
        "select format_type(typbasetype, typtypmod), pg_get_constraintdef(c.oid)"
        " from pg_type t join pg_constraint c on c.contypid = t.oid"
        " where t.oid = 'net.http_method'::regtype"
    ).fetchall() == [
        (
            "text",
            "CHECK (((VALUE ~~* 'get'::text) OR (VALUE ~~* 'post'::text)"
            " OR (VALUE ~~* 'delete'::text)))",
        )
    ]
    assert scalar(base_conn, "select array['GET', 'post', 'Delete']::net.http_method[]::text") == (
        "{GET,post,Delete}"
    )
    with pytest.raises(psycopg.errors.CheckViolation):
        base_conn.execute("select 'PUT'::net.http_method")


def test_grants_are_public_like_the_install_script(base_conn: Conn) -> None:
    assert base_conn.execute(
        "select nspacl::text, pg_get_userbyid(nspowner) from pg_namespace where nspname = 'net'"
    ).fetchone() == ("{supabase_admin=UC/supabase_admin,=U/supabase_admin}", "supabase_admin")
    for role in ("anon", "authenticated", "service_role", "postgres"):
        assert scalar(
            base_conn,
            "select has_schema_privilege(%s, 'net', 'usage')"
            " and not has_schema_privilege(%s, 'net', 'create')"
            " and has_table_privilege(%s, 'net._http_response',"
            "   'select, insert, update, delete, truncate, references, trigger')"
            " and has_table_privilege(%s, 'net.http_request_queue',"
            "   'select, insert, update, delete, truncate, references, trigger')"
            " and has_sequence_privilege(%s, 'net.http_request_queue_id_seq',"
            "   'usage, select, update')"
            " and has_function_privilege(%s,"
            "   'net.http_post(text, jsonb, jsonb, jsonb, integer)', 'execute')"
            " and has_function_privilege(%s, 'net.http_get(text, jsonb, jsonb, integer)',"
            "   'execute')",
            (role,) * 7,
        ), role
    # postgres does not own net's objects, so it cannot take PUBLIC's rights away (as on Supabase).
    base_conn.execute(
        "revoke execute on function net.http_get(text, jsonb, jsonb, integer) from public"
    )
    assert scalar(
        base_conn,
        "select has_function_privilege('anon', 'net.http_get(text, jsonb, jsonb, integer)',"
        " 'execute')",
    )


def test_the_deprecated_collect_response_fails_like_pg_nets(base_conn: Conn) -> None:
    notices: list[str] = []
    base_conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
    with pytest.raises(psycopg.errors.SyntaxError, match="query has no destination"):
        base_conn.execute("select net.http_collect_response(1)")
    assert notices == ["The net.http_collect_response function is deprecated."]


# --- request functions (synchronous part) -------------------------------------------------------


def queued(conn: Conn, request_id: int) -> tuple[Any, ...]:
    row = conn.execute(
        "select method, url, headers, body, timeout_milliseconds"
        " from net.http_request_queue where id = %s",
        (request_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_requests_are_queued_with_pg_nets_defaults(base_conn: Conn) -> None:
    # Queued and inspected in one transaction, so no worker can take the rows meanwhile.
    with base_conn.transaction(force_rollback=True):
        get_id = scalar(base_conn, "select net.http_get('http://example.test/a')")
        post_id = scalar(base_conn, "select net.http_post('http://example.test/b')")
        delete_id = scalar(base_conn, "select net.http_delete('http://example.test/c')")
        assert queued(base_conn, get_id) == ("GET", "http://example.test/a", {}, None, 5000)
        assert queued(base_conn, post_id) == (
            "POST",
            "http://example.test/b",
            {"Content-Type": "application/json"},
            b"{}",
            5000,
        )
        assert queued(base_conn, delete_id) == ("DELETE", "http://example.test/c", {}, None, 5000)
        # Ids come from the queue's sequence, in call order.
        assert get_id < post_id < delete_id

        # Positional arguments follow pg_net's order: post(url, body, params, headers, timeout),
        # get(url, params, headers, timeout), delete(url, params, headers, timeout, body).
        post2 = scalar(
            base_conn,
            """select net.http_post('http://example.test/p', '{"k": [1, "é"]}', '{"q": "1"}',"""
            """ '{"X-A": "b"}', 250)""",
        )
        assert queued(base_conn, post2) == (
            "POST",
            "http://example.test/p?q=1",
            {"X-A": "b", "Content-Type": "application/json"},
            '{"k": [1, "é"]}'.encode(),
            250,
        )
        get2 = scalar(
            base_conn,
            """select net.http_get('http://example.test/g', '{"q": "1"}', '{"X-A": "b"}', 75)""",
        )
        assert queued(base_conn, get2) == (
            "GET",
            "http://example.test/g?q=1",
            {"X-A": "b"},
            None,
            75,
        )
        delete2 = scalar(
            base_conn,
            """select net.http_delete('http://example.test/d', '{"q": "1"}', '{"X-A": "b"}',"""
            """ 80, '{"gone": true}')""",
        )
        assert queued(base_conn, delete2) == (
            "DELETE",
            "http://example.test/d?q=1",
            {"X-A": "b"},
            b'{"gone": true}',
            80,
        )


def test_post_content_type_rule(base_conn: Conn) -> None:
    with base_conn.transaction(force_rollback=True):
        # Matched case-insensitively by name; exactly application/json is accepted and kept.
        same = scalar(
            base_conn,
            """select net.http_post('http://example.test/', headers := '{"content-TYPE":"""
            """ "application/json", "X-B": "1"}')""",
        )
        assert queued(base_conn, same)[2] == {"content-TYPE": "application/json", "X-B": "1"}
        # NULL headers: the concatenation is NULL, so the request is queued without headers.
        no_headers = scalar(
            base_conn, "select net.http_post('http://example.test/', headers := null)"
        )
        assert queued(base_conn, no_headers)[2] is None
        # body NULL is allowed.
        no_body = scalar(base_conn, "select net.http_post('http://example.test/', body := null)")
        assert queued(base_conn, no_body)[3] is None
    for value in ("text/plain", "application/json; charset=utf-8", "APPLICATION/JSON"):
        with pytest.raises(
            psycopg.errors.RaiseException,
            match=re.escape('Content-Type header must be "application/json"'),
        ):
            base_conn.execute(
                "select net.http_post('http://example.test/', headers := %s)",
                (Jsonb({"Content-Type": value}),),
            )


def test_params_are_url_encoded_and_appended(base_conn: Conn) -> None:
    assert scalar(base_conn, "select net._urlencode_string('a b/é~-._*!&=')") == (
        "a%20b%2F%C3%A9~-._%2A%21%26%3D"
    )
    assert scalar(base_conn, "select net._urlencode_string(null)") is None
    assert scalar(base_conn, "select net._encode_url_with_params_array(null, null)") is None
    # curl's URL API keeps the query and fragment, lower-cases the scheme, resolves dot segments.
    assert (
        scalar(
            base_conn,
            "select net._encode_url_with_params_array('HTTP://Example.COM/a/../b?x=1#frag',"
            " array['a=b', 'c=%20d'])",
        )
        == "http://Example.COM/b?x=1&a=b&c=%20d#frag"
    )
    assert (
        scalar(base_conn, "select net._encode_url_with_params_array('http://h:8080', '{}')")
        == "http://h:8080/"
    )
    with base_conn.transaction(force_rollback=True):
        request_id = scalar(
            base_conn,
            """select net.http_get('http://example.test/p?keep=1',"""
            """ params := '{"a b": "c&d", "n": 1, "한": "=/?"}')""",
        )
        assert queued(base_conn, request_id)[1] == (
            "http://example.test/p?keep=1&n=1&a%20b=c%26d&%ED%95%9C=%3D%2F%3F"
        )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/malformed_url", 'invalid URL "/malformed_url": Bad scheme'),
        ("localhost:6666", 'invalid URL "localhost:6666": Unsupported URL scheme'),
        ("http://", 'invalid URL "http://": No host part in the URL'),
        ("http://h:99999/", 'invalid URL "http://h:99999/": Port number was not a decimal'),
        ("http://a b/", 'invalid URL "http://a b/": Bad hostname'),
        ("http:////h", 'invalid URL "http:////h": Unsupported number of slashes'),
    ],
)
def test_invalid_urls_fail_synchronously(base_conn: Conn, url: str, message: str) -> None:
    for call in ("net.http_get(%s)", "net.http_post(%s)", "net.http_delete(%s)"):
        with pytest.raises(psycopg.errors.InternalError_, match=re.escape(message)):
            base_conn.execute(f"select {call}", (url,))
    assert scalar(base_conn, "select count(*) from net.http_request_queue") == 0


def test_null_url_violates_not_null(base_conn: Conn) -> None:
    for call in ("net.http_get(null)", "net.http_post(null)", "net.http_delete(null)"):
        with pytest.raises(
            psycopg.errors.NotNullViolation, match='null value in column "url" of relation'
        ):
            base_conn.execute(f"select {call}")


# --- delivery ----------------------------------------------------------------------------------


def test_only_committed_requests_are_sent(
    rt: Runtime, base_dbname: str, net_conn: Conn, endpoint: Endpoint
) -> None:
    pending_path, rolled_back_path, marker_path = unique("p"), unique("r"), unique("m")
    with psycopg.connect(rt.dsn(base_dbname, "postgres")) as open_tx:
        pending_id = scalar(open_tx, "select net.http_get(%s)", (endpoint.url(pending_path),))
        with psycopg.connect(rt.dsn(base_dbname, "postgres")) as other:
            scalar(other, "select net.http_get(%s)", (endpoint.url(rolled_back_path),))
            other.rollback()
        # A request committed later is delivered while the first is still uncommitted...
        marker_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(marker_path),))
        assert wait_response(net_conn, marker_id)["status_code"] == 200
        assert endpoint.to(pending_path) == []
        assert response_row(net_conn, pending_id) is None
        # ...and the first goes out once it commits.
        open_tx.commit()
    assert wait_response(net_conn, pending_id)["status_code"] == 200
    assert [s.method for s in endpoint.to(pending_path)] == ["GET"]
    # The rolled-back request never existed for the worker.
    assert endpoint.to(rolled_back_path) == []
    assert scalar(net_conn, "select count(*) from net.http_request_queue") == 0
    assert scalar(net_conn, "select count(*) from net._http_response") == 2


def test_success_rows_and_what_the_endpoint_receives(net_conn: Conn, endpoint: Endpoint) -> None:
    get_path, post_path, delete_path, bare_path = (
        unique("g"),
        unique("p"),
        unique("d"),
        unique("b"),
    )
    get_id = scalar(
        net_conn,
        """select net.http_get(%s, params := '{"x": "1 2"}', headers := '{"X-Test": "yes"}')""",
        (endpoint.url(get_path + "?a=b"),),
    )
    post_id = scalar(
        net_conn,
        """select net.http_post(%s, body := '{"hello": "세계"}')""",
        (endpoint.url(post_path),),
    )
    delete_id = scalar(
        net_conn,
        """select net.http_delete(%s, body := '{"n": 1}')""",
        (endpoint.url(delete_path),),
    )
    bare_id = scalar(
        net_conn,
        "select net.http_post(%s, body := null, headers := null)",
        (endpoint.url(bare_path),),
    )

    row = wait_response(net_conn, get_id)
    assert (row["status_code"], row["timed_out"], row["error_msg"]) == (200, False, None)
    assert row["content_type"] == "application/json"
    assert row["headers"]["content-type"] == "application/json"
    assert row["content"] == (f'{{"method":"GET","path":"{get_path}","query":"a=b&x=1%202"}}')
    [seen] = endpoint.to(get_path)
    assert (seen.method, seen.query, seen.body) == ("GET", "a=b&x=1%202", b"")
    assert seen.header("x-test") == ["yes"]
    assert seen.header("user-agent") == ["pg_net/0.20.4"]

    assert wait_response(net_conn, post_id)["status_code"] == 200
    [seen] = endpoint.to(post_path)
    assert seen.method == "POST"
    assert seen.body == '{"hello": "세계"}'.encode()
    assert seen.header("content-type") == ["application/json"]
    assert seen.header("user-agent") == ["pg_net/0.20.4"]

    assert wait_response(net_conn, delete_id)["status_code"] == 200
    [seen] = endpoint.to(delete_path)
    assert (seen.method, seen.body) == ("DELETE", b'{"n": 1}')

    # NULL headers still reach the worker as an empty header list (pg_net builds it with
    # array(select ... from jsonb_each_text(headers))), so the User-Agent is added; libcurl
    # sends an empty POST as a form post.
    assert wait_response(net_conn, bare_id)["status_code"] == 200
    [seen] = endpoint.to(bare_path)
    assert (seen.method, seen.body) == ("POST", b"")
    assert seen.header("content-length") == ["0"]
    assert seen.header("content-type") == ["application/x-www-form-urlencoded"]
    assert seen.header("user-agent") == ["pg_net/0.20.4"]


def test_http_errors_are_successful_transfers(net_conn: Conn, endpoint: Endpoint) -> None:
    ids = {
        code: scalar(net_conn, "select net.http_get(%s)", (endpoint.url(f"/status/{code}"),))
        for code in (404, 503)
    }
    for code, request_id in ids.items():
        row = wait_response(net_conn, request_id)
        assert (row["status_code"], row["timed_out"], row["error_msg"]) == (code, False, None)
        assert row["content"] == f"answered {code}"
        assert row["content_type"] == "text/plain; charset=utf-8"
        result = net_conn.execute(
            "select (r).status::text, (r).message, ((r).response).status_code,"
            " ((r).response).body from net._http_collect_response(%s) r",
            (request_id,),
        ).fetchone()
        assert result == ("SUCCESS", "ok", code, f"answered {code}")


def test_redirects_are_followed(net_conn: Conn, endpoint: Endpoint) -> None:
    tail = uuid.uuid4().hex[:10]
    request_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(f"/redirect/{tail}"),))
    row = wait_response(net_conn, request_id)
    assert row["status_code"] == 200
    assert row["content"] == f'{{"method":"GET","path":"/echo/{tail}","query":""}}'


def test_timeout_gives_a_timed_out_error_row(net_conn: Conn, endpoint: Endpoint) -> None:
    request_id = scalar(
        net_conn,
        "select net.http_get(%s, timeout_milliseconds := 300)",
        (endpoint.url("/sleep/3000"),),
    )
    row = wait_response(net_conn, request_id)
    assert (row["status_code"], row["timed_out"], row["content"], row["headers"]) == (
        None,
        True,
        None,
        None,
    )
    assert re.fullmatch(
        r"Timeout of 300 ms reached\. Total time: \d+\.\d{6} ms \(DNS time: \d+\.\d{6} ms,"
        r" TCP/SSL handshake time: \d+\.\d{6} ms, HTTP Request/Response time: \d+\.\d{6} ms\)",
        row["error_msg"],
    ), row["error_msg"]


def test_connection_refused_gives_an_error_row(net_conn: Conn) -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    request_id = scalar(net_conn, "select net.http_get(%s)", (f"http://127.0.0.1:{port}/",))
    row = wait_response(net_conn, request_id)
    # pg_net records libcurl's curl_easy_strerror() text; curl 8 spells out "Could not".
    message = pycurl.easy_strerror(pycurl.E_COULDNT_CONNECT)
    assert message in ("Couldn't connect to server", "Could not connect to server")
    assert (row["status_code"], row["timed_out"], row["error_msg"]) == (None, False, message)
    result = net_conn.execute(
        "select (r).status::text, (r).message, (r).response is null"
        " from net._http_collect_response(%s) r",
        (request_id,),
    ).fetchone()
    assert result == ("ERROR", message, True)


def test_collect_response_shapes(net_conn: Conn, endpoint: Endpoint) -> None:
    missing = net_conn.execute(
        "select (r).status::text, (r).message, (r).response is null"
        " from net._http_collect_response(987654321) r"
    ).fetchone()
    assert missing == ("ERROR", "request matching request_id not found", True)

    path = unique("c")
    request_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(path),))
    # async := false waits (in a later transaction) until the worker has recorded the response.
    net_conn.execute("set statement_timeout = '30s'")
    result = net_conn.execute(
        "select (r).status::text, (r).message, ((r).response).status_code,"
        " ((r).response).headers ->> 'content-type', ((r).response).body"
        " from net._http_collect_response(%s, async := false) r",
        (request_id,),
    ).fetchone()
    net_conn.execute("reset statement_timeout")
    assert result == (
        "SUCCESS",
        "ok",
        200,
        "application/json",
        f'{{"method":"GET","path":"{path}","query":""}}',
    )


def test_a_batch_is_sent_concurrently(net_conn: Conn, endpoint: Endpoint) -> None:
    group = uuid.uuid4().hex[:10]
    with net_conn.transaction():  # one commit, one wake, one batch
        ids = [
            scalar(net_conn, "select net.http_get(%s)", (endpoint.url(f"/slow/{group}/{i}"),))
            for i in range(3)
        ]
    for request_id in ids:
        assert wait_response(net_conn, request_id)["status_code"] == 200
    assert endpoint.peak[group] == 3


def test_expired_responses_are_deleted_on_the_next_wake_after_a_restart(
    net_conn: Conn, admin_base_conn: Conn, base_dbname: str, endpoint: Endpoint
) -> None:
    old_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(unique("old")),))
    wait_response(net_conn, old_id)
    [before] = worker_backends(net_conn)

    # A database setting only reaches the worker when it reconnects, i.e. after worker_restart().
    admin_base_conn.execute(
        sql.SQL("alter database {} set pg_net.ttl = '3 seconds'").format(
            sql.Identifier(base_dbname)
        )
    )
    assert scalar(net_conn, "select net.worker_restart()") is True
    eventually(
        lambda: (pids := worker_backends(net_conn)) and before not in pids,
        "the worker to reconnect",
    )
    # Expiry only happens when the worker is awake: the old row outlives its ttl until a wake.
    eventually(
        lambda: scalar(
            net_conn,
            "select created < now() - interval '3 seconds' from net._http_response where id = %s",
            (old_id,),
        ),
        "the old response to pass its ttl",
    )
    assert response_row(net_conn, old_id) is not None

    new_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(unique("new")),))
    eventually(lambda: response_row(net_conn, old_id) is None, "the old response to expire")
    assert wait_response(net_conn, new_id)["status_code"] == 200


def test_check_worker_is_up_follows_the_worker(
    net_conn: Conn, admin_base_conn: Conn, base_dbname: str
) -> None:
    net_conn.execute("select net.check_worker_is_up()")
    ident = sql.Identifier(base_dbname)
    # The worker never serves templates: it leaves this database while it is one.
    admin_base_conn.execute(sql.SQL("alter database {} is_template true").format(ident))
    try:
        eventually(lambda: not worker_backends(net_conn), "the worker to leave")
        with pytest.raises(
            psycopg.errors.RaiseException, match="the pg_net background worker is not up"
        ):
            net_conn.execute("select net.check_worker_is_up()")
    finally:
        admin_base_conn.execute(sql.SQL("alter database {} is_template false").format(ident))
    net_conn.execute("set statement_timeout = '30s'")
    net_conn.execute("select net.wait_until_running()")
    net_conn.execute("select net.check_worker_is_up()")


def _children(pid: int) -> list[int]:
    """The supervisor's net worker child (it also runs PostgREST and the gateway)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"net-worker" in cmdline:
            found.append(int(entry.name))
    return found


def test_supervisor_restarts_a_killed_worker(
    rt: Runtime, net_conn: Conn, endpoint: Endpoint
) -> None:
    supervisor_pid = supervisor.networker_pid(rt)
    assert supervisor_pid is not None
    [worker_pid] = _children(supervisor_pid)
    os.kill(worker_pid, signal.SIGKILL)
    eventually(lambda: not worker_backends(net_conn), "the killed worker's connection to go")

    # Committed while no worker runs: the restarted worker sends it when it connects.
    path = unique("k")
    request_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(path),))
    assert wait_response(net_conn, request_id)["status_code"] == 200
    assert len(endpoint.to(path)) == 1
    [new_worker] = _children(supervisor_pid)
    assert new_worker != worker_pid
    net_conn.execute("select net.check_worker_is_up()")


@pytest.mark.slow
def test_pg_cron_job_calls_net_http_post(rt: Runtime, endpoint: Endpoint) -> None:
    tag = uuid.uuid4().hex[:12]
    path = f"/cron/{tag}"
    command = (
        f"select net.http_post(url := '{endpoint.url(path)}', body := '{{\"job\": \"{tag}\"}}')"
    )
    with psycopg.connect(rt.dsn(MAIN_DB, "postgres"), autocommit=True) as conn:
        job_id = scalar(
            conn, "select cron.schedule(%s, '* * * * *', %s)", (f"net-test-{tag}", command)
        )
        try:
            seen = eventually(lambda: endpoint.to(path), "the cron job's request", timeout=130)
            assert seen[0].method == "POST"
            assert seen[0].body == f'{{"job": "{tag}"}}'.encode()
            assert seen[0].header("user-agent") == ["pg_net/0.20.4"]
            eventually(
                lambda: scalar(
                    conn,
                    "select count(*) from cron.job_run_details"
                    " where jobid = %s and status = 'succeeded'",
                    (job_id,),
                ),
                "cron.job_run_details to say succeeded",
            )
        finally:
            conn.execute("select cron.unschedule(%s)", (job_id,))


# --- how the worker fails: as pg_net, a crash loses the batch in flight -------------------------


def _worker_child(rt: Runtime) -> int:
    supervisor_pid = supervisor.networker_pid(rt)
    assert supervisor_pid is not None
    [worker_pid] = _children(supervisor_pid)
    return worker_pid


def test_worker_connects_as_postgres_and_triggers_run_as_postgres(net_conn: Conn) -> None:
    row = net_conn.execute(
        "select a.usename, r.rolsuper from pg_stat_activity a join pg_roles r"
        " on r.rolname = a.usename where a.application_name = %s"
        " and a.datname = current_database()",
        (WORKER_APP,),
    ).fetchone()
    assert row == ("postgres", False)
    # Supabase's own check: a trigger on net._http_response runs as the worker's role.
    net_conn.execute("create table public.inserted_by (who text)")
    net_conn.execute(
        "create function public.record_inserter() returns trigger language plpgsql as"
        " $$ begin insert into public.inserted_by values (current_user); return new; end $$"
    )
    net_conn.execute(
        "create trigger record_inserter after insert on net._http_response"
        " for each row execute function public.record_inserter()"
    )
    request_id = scalar(net_conn, "select net.http_get('http://127.0.0.1:9/refused')")
    wait_response(net_conn, request_id)
    assert net_conn.execute("select who from public.inserted_by").fetchall() == [("postgres",)]


def test_no_transaction_is_open_while_requests_are_in_flight(
    net_conn: Conn, endpoint: Endpoint
) -> None:
    group = uuid.uuid4().hex[:10]
    request_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(f"/slow/{group}/0"),))
    eventually(lambda: endpoint.active.get(group), "the request to be in flight")
    net_conn.execute("select pg_stat_clear_snapshot()")
    state = net_conn.execute(
        "select state, xact_start from pg_stat_activity where application_name = %s"
        " and datname = current_database()",
        (WORKER_APP,),
    ).fetchone()
    assert state is not None
    assert state[0] in ("idle", "active")
    assert state[1] is None
    assert wait_response(net_conn, request_id)["status_code"] == 200


def _kill_worker_mid_batch(rt: Runtime, conn: Conn, endpoint: Endpoint, count: int) -> list[int]:
    group = uuid.uuid4().hex[:10]
    with conn.transaction():
        ids = [
            scalar(conn, "select net.http_get(%s)", (endpoint.url(f"/sleep/3000/{group}/{i}"),))
            for i in range(count)
        ]
    eventually(
        lambda: len([s for s in endpoint.seen if f"/{group}/" in s.path]) == count,
        "the whole batch to be in flight",
    )
    os.kill(_worker_child(rt), signal.SIGKILL)
    # The restarted worker serves the database again; a later request proves it has drained.
    eventually(lambda: worker_backends(conn), "the restarted worker")
    probe = scalar(conn, "select net.http_get(%s)", (endpoint.url(unique("after-crash")),))
    assert wait_response(conn, probe)["status_code"] == 200
    return ids


def test_a_worker_killed_mid_batch_loses_the_batch_and_never_resends(
    rt: Runtime, net_conn: Conn, endpoint: Endpoint
) -> None:
    before = len(endpoint.seen)
    ids = _kill_worker_mid_batch(rt, net_conn, endpoint, 20)
    sent = [s for s in endpoint.seen[before:] if s.path.startswith("/sleep/3000/")]
    assert len(sent) == 20  # each once: nothing sent twice after the restart
    assert len({s.path for s in sent}) == 20
    assert scalar(net_conn, "select count(*) from net.http_request_queue") == 0
    assert (
        scalar(net_conn, "select count(*) from net._http_response where id = any(%s)", (ids,)) == 0
    )


def test_idle_in_transaction_timeout_does_not_make_the_worker_resend(
    net_conn: Conn, admin_base_conn: Conn, base_dbname: str, endpoint: Endpoint
) -> None:
    admin_base_conn.execute(
        sql.SQL("alter database {} set idle_in_transaction_session_timeout = '100ms'").format(
            sql.Identifier(base_dbname)
        )
    )
    [before] = worker_backends(net_conn)
    net_conn.execute("select net.worker_restart()")
    eventually(
        lambda: (pids := worker_backends(net_conn)) and before not in pids,
        "the worker to reconnect",
    )
    group = uuid.uuid4().hex[:10]
    with net_conn.transaction():
        ids = [
            scalar(net_conn, "select net.http_get(%s)", (endpoint.url(f"/slow/{group}/{i}"),))
            for i in range(5)
        ]
    for request_id in ids:
        assert wait_response(net_conn, request_id)["status_code"] == 200
    assert sorted(s.path for s in endpoint.seen if f"/slow/{group}/" in s.path) == sorted(
        f"/slow/{group}/{i}" for i in range(5)
    )


def test_worker_restart_is_served_while_a_truncate_holds_the_queue(
    rt: Runtime, net_conn: Conn, base_dbname: str, endpoint: Endpoint
) -> None:
    [before] = worker_backends(net_conn)
    with psycopg.connect(rt.dsn(base_dbname, "postgres")) as locker:
        locker.execute("truncate net.http_request_queue")  # holds the lock until rollback
        assert scalar(net_conn, "select net.worker_restart()") is True
        eventually(
            lambda: (pids := worker_backends(net_conn)) and before not in pids,
            "the worker to restart although the queue is locked",
        )
        locker.rollback()
    request_id = scalar(net_conn, "select net.http_get(%s)", (endpoint.url(unique("unlocked")),))
    assert wait_response(net_conn, request_id)["status_code"] == 200


def _kill_supervisor(rt: Runtime) -> list[int]:
    """SIGKILL the supervisor; returns the processes it left behind (PostgREST, the gateway)."""
    supervisor_pid = supervisor.networker_pid(rt)
    assert supervisor_pid is not None
    children = [p for p in supervisor.owned_processes(rt) if p != supervisor_pid]
    worker_pid = _worker_child(rt)
    os.kill(supervisor_pid, signal.SIGKILL)
    eventually(lambda: not _alive(supervisor_pid), "the supervisor to die")
    # The worker notices and ends; what cannot (PostgREST, the gateway) is listed as orphaned.
    eventually(lambda: not _alive(worker_pid), "the orphaned worker to exit by itself")
    assert supervisor.networker_pid(rt) is None
    left = set(children) - {worker_pid}
    assert left
    assert set(supervisor.orphans(rt)) == left
    return sorted(left)


def test_a_killed_supervisor_leaves_no_orphan_behind(rt: Runtime, net_conn: Conn) -> None:
    # stop ends the orphans.
    orphaned = _kill_supervisor(rt)
    supervisor.stop_networker(rt)
    assert not any(_alive(p) for p in orphaned)
    assert supervisor.owned_processes(rt) == []
    supervisor.ensure_networker(rt)
    eventually(lambda: len(worker_backends(net_conn)) == 1, "one worker connection")

    # start ends them before starting a fresh set: one worker, no second PostgREST.
    orphaned = _kill_supervisor(rt)
    new_supervisor = supervisor.ensure_networker(rt)
    assert not any(_alive(p) for p in orphaned)
    eventually(lambda: _children(new_supervisor), "the new worker")
    eventually(lambda: len(worker_backends(net_conn)) == 1, "one worker connection")
    assert supervisor.orphans(rt) == []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- response headers libcurl accepts (pg_net's malformed-header tests) -----------------------


@pytest.fixture
def raw_server() -> Iterator[Callable[[bytes], str]]:
    """A one-shot HTTP server answering with the raw bytes given; returns its URL."""
    servers: list[socket.socket] = []

    def serve(reply: bytes) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        servers.append(listener)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/"

    yield serve
    for listener in servers:
        listener.close()


@pytest.mark.parametrize(
    ("line", "name"),
    [
        (b"Spaces In Header Name: yes", "Spaces In Header Name"),
        (b"Trailing-Space : yes", "Trailing-Space "),
        (b"Caf\xc3\xa9: yes", "Caf\u00e9"),
        (b"Latin-\xe9: yes", "Latin-\ufffd"),
        (b"MissingValue: ", "MissingValue"),
    ],
    ids=["spaces", "trailing-whitespace", "utf8", "non-utf8", "missing-value"],
)
def test_odd_response_header_names_are_recorded_like_pg_net(
    net_conn: Conn, raw_server: Callable[[bytes], str], line: bytes, name: str
) -> None:
    reply = b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    request_id = scalar(net_conn, "select net.http_get(%s)", (raw_server(reply),))
    row = wait_response(net_conn, request_id)
    assert (row["status_code"], row["error_msg"], row["content"]) == (200, None, "ok")
    assert name in row["headers"]
    status = net_conn.execute(
        "select (r).status::text from net._http_collect_response(%s) r", (request_id,)
    ).fetchone()
    assert status == ("SUCCESS",)
