"""The privilege matrix in direct SQL, over every table, view, sequence and function of the
project's schemas, read from the catalogs: for each role (anon, two subscribers, analyst,
billing_service, service_role) every operation is either meant (the schema's rule in seckit says
so) and works, or is refused with SQLSTATE 42501 — and after all the refused attempts, made in
autocommit so a wrongly allowed one would stick, no table or sequence has changed.

pgTAP (supabase/tests/database/10_billing_surface.sql) pins the names and grants; this walks
whatever the catalogs hold, so an object added later is covered without being listed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from dbkit import Billing, TossSandbox, serve_sandbox
from psycopg import sql
from seckit import (
    PLATFORM_SCHEMAS,
    ROLES,
    SUBSCRIBER,
    TABLE_PRIVILEGES,
    Catalog,
    Relation,
    changed,
    claims_of,
    contents,
)

from service.runtime.cluster import ADMIN_USER, Runtime

Conn = psycopg.Connection[Any]


@pytest.fixture
def populated(rt: Runtime, dbname: str) -> tuple[str, str]:
    """Two subscribers whose first period is paid, so every refusal has rows to protect."""
    subs = (str(uuid.uuid4()), str(uuid.uuid4()))
    with serve_sandbox() as (url, clock):
        toss = TossSandbox(url, clock)
        bl = Billing(rt, dbname, toss)
        try:
            for sub in subs:
                bl.register(sub)
            for row in bl.claim():
                assert bl.serve(row).detail["applied"] is True
            # A refund request and a webhook in the inbox, so those tables are not empty either.
            bl.billing("request_refund", bl.scalar("select id from billing.payments limit 1"))
        finally:
            bl.close()
            toss.close()
    return subs


@pytest.fixture
def admin(rt: Runtime, dbname: str) -> Iterator[Conn]:
    with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as c:
        yield c


def act_as(conn: Conn, role: str, sub: str | None = None) -> None:
    conn.execute(sql.SQL("set role {}").format(sql.Identifier(role)))
    conn.execute("select set_config('request.jwt.claims', %s, false)", (claims_of(sub or ""),))


def refusal(conn: Conn, statement: sql.Composed) -> str | None:
    """The SQLSTATE the statement was refused with, or None when it ran."""
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def statements(rel: Relation) -> dict[str, sql.Composed]:
    ident = sql.Identifier(rel.schema, rel.name)
    if rel.kind == "S":
        name = sql.Literal(rel.qualified)
        return {
            "SELECT": sql.SQL("select last_value from {}").format(ident),
            "UPDATE": sql.SQL("select setval({}, 1)").format(name),
            "USAGE": sql.SQL("select nextval({})").format(name),
        }
    col = sql.Identifier(rel.first_column or "")
    out: dict[str, sql.Composed] = {
        "SELECT": sql.SQL("select * from {} limit 1").format(ident),
        "INSERT": sql.SQL("insert into {} default values").format(ident),
        "UPDATE": sql.SQL("update {} set {} = {}").format(ident, col, col),
        "DELETE": sql.SQL("delete from {}").format(ident),
    }
    if rel.kind in ("r", "p"):
        out["TRUNCATE"] = sql.SQL("truncate {}").format(ident)
    return out


def refused_with(rel: Relation) -> tuple[str, ...]:
    # A view that is not updatable is refused by the rewriter before privileges are looked at.
    return ("42501", "55000") if rel.kind in ("v", "m") else ("42501",)


def has_privilege(conn: Conn, role: str, rel: Relation, privilege: str) -> bool:
    check = "has_sequence_privilege" if rel.kind == "S" else "has_table_privilege"
    row = conn.execute(
        sql.SQL("select {}(%s, %s, %s)").format(sql.Identifier(check)),
        (role, rel.qualified, privilege),
    ).fetchone()
    assert row is not None
    return bool(row[0])


def callers(subs: tuple[str, str]) -> list[tuple[str, str | None]]:
    return [(r, None) for r in ROLES if r != SUBSCRIBER] + [(SUBSCRIBER, s) for s in subs]


def test_every_schema_has_a_rule(admin: Conn) -> None:
    catalog = Catalog.read(admin)
    assert catalog.unclassified() == []
    # The platform's schemas are only those Supabase brings.
    assert set(catalog.schemas) - set(catalog.project_schemas) <= PLATFORM_SCHEMAS


def test_no_role_reaches_a_relation_beyond_its_rule_and_refusals_change_nothing(
    admin: Conn, populated: tuple[str, str]
) -> None:
    catalog = Catalog.project(admin)
    assert len(catalog.relations) >= 30  # billing's tables and analytics' views at least
    before = contents(admin)
    surprises: list[tuple[str, str, str, str | None]] = []
    allowed = 0
    for role, sub in callers(populated):
        act_as(admin, role, sub)
        for rel in catalog.relations:
            for privilege, statement in statements(rel).items():
                state = refusal(admin, statement)
                if privilege in rel.granted(role):
                    allowed += 1
                    if state is not None:
                        surprises.append((role, rel.qualified, privilege, state))
                elif state not in refused_with(rel):
                    surprises.append((role, rel.qualified, privilege, state))
        admin.execute("reset role")
    assert surprises == []
    # And the catalog agrees: no privilege beyond the rule, whatever the statement said.
    held = [
        (role, rel.qualified, privilege)
        for role in ROLES
        for rel in catalog.relations
        for privilege in (("SELECT", "UPDATE", "USAGE") if rel.kind == "S" else TABLE_PRIVILEGES)
        if privilege not in rel.granted(role) and has_privilege(admin, role, rel, privilege)
    ]
    assert held == []
    # analyst reads every analytics view; nothing else is allowed anywhere.
    views = [r for r in catalog.relations if r.schema == "analytics"]
    assert allowed == len(views) > 0
    assert changed(before, contents(admin)) == []


def test_no_role_executes_a_function_beyond_its_rule_and_refusals_change_nothing(
    admin: Conn, populated: tuple[str, str]
) -> None:
    catalog = Catalog.project(admin)
    before = contents(admin)
    wrong_grants: list[tuple[str, str]] = []
    surprises: list[tuple[str, str, str | None]] = []
    for role, sub in callers(populated):
        for fn in catalog.functions:
            reach = admin.execute(
                "select has_schema_privilege(%s, %s, 'usage')"
                " and has_function_privilege(%s, %s::oid, 'execute')",
                (role, fn.schema, role, fn.oid),
            ).fetchone()
            assert reach is not None
            if reach[0] != fn.granted(role):
                wrong_grants.append((role, fn.signature))
        act_as(admin, role, sub)
        for fn in catalog.functions:
            if fn.granted(role):
                continue  # behaviour, not privilege: the api and service tests call these
            state = refusal(admin, fn.null_call())
            # A trigger function is refused by the parser before its privilege is looked at.
            if state != "42501" and not (fn.returns_trigger and state == "0A000"):
                surprises.append((role, fn.signature, state))
        admin.execute("reset role")
    assert wrong_grants == []
    assert surprises == []
    assert changed(before, contents(admin)) == []
    # The rules are not vacuous: subscribers call api.*, the service its service_* functions.
    granted = {(r, f.schema) for f in catalog.functions for r in ROLES if f.granted(r)}
    assert granted == {(SUBSCRIBER, "api"), ("billing_service", "billing")}


def test_the_service_role_and_the_analyst_cannot_widen_their_own_reach(
    admin: Conn, populated: tuple[str, str]
) -> None:
    """Grants, policy changes and role switches from the non-owner roles are refused too."""
    before = contents(admin)
    attempts = [
        "grant select on billing.payment_methods to {role}",
        "alter table billing.payment_methods disable row level security",
        "create policy open on billing.payments for select using (true)",
        "grant postgres to {role}",
        "create table billing.mine (id int)",
        "create function public.mine() returns int language sql as 'select 1'",
    ]
    for role in ROLES:
        act_as(admin, role, populated[0] if role == SUBSCRIBER else None)
        for attempt in attempts:
            statement = sql.SQL(attempt).format(role=sql.Identifier(role))
            assert refusal(admin, statement) == "42501", (role, attempt)
        admin.execute("reset role")
    assert changed(before, contents(admin)) == []
