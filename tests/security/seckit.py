"""What the security suite shares: the database's objects read from the catalogs, who is meant to
reach each of them, and a snapshot of every table's contents that a refused call must leave as it
was.

The expectations are rules per schema, not a list of objects: a table, view or function added
later in a known schema is checked against its schema's rule without touching this file, and an
object in a schema that has no rule fails the suite until someone decides who may reach it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

# The roles a request or a login can act as.
SUBSCRIBER = "authenticated"
ROLES = ("anon", SUBSCRIBER, "analyst", "billing_service", "service_role")

# The project's own schemas: the rule of each names who may do what; everyone else gets nothing.
# Relations: role -> privileges. Functions: a rule on the function's name -> roles.
RELATION_RULES: dict[str, dict[str, frozenset[str]]] = {
    "billing": {},
    "billing_history": {},
    "api": {},  # functions only
    "api_impl": {},
    "analytics": {"analyst": frozenset({"SELECT"})},
    "public": {},  # alembic's bookkeeping table, when migrations ran through alembic
}
FUNCTION_RULES: dict[str, Callable[[str], frozenset[str]]] = {
    "api": lambda name: frozenset({SUBSCRIBER}),
    # The service's entry points say so in their name; nothing else in billing is callable.
    "billing": lambda name: frozenset({"billing_service"} if name.startswith("service_") else ()),
    "billing_history": lambda name: frozenset(),
    "api_impl": lambda name: frozenset(),
    "analytics": lambda name: frozenset(),
    "public": lambda name: frozenset(),
}
# Supabase's own schemas (here the local runtime's stand-ins, pinned by tests/runtime): their
# privileges are the platform's, not the project's. None of them is exposed by the Data API.
PLATFORM_SCHEMAS = frozenset({"auth", "cron", "extensions", "net", "vault"})
# Tables that change by themselves while a test runs (the net worker's queue and responses,
# pg_cron's run log), left out of the "nothing changed" comparison.
RESTLESS = frozenset({"net.http_request_queue", "net._http_response", "cron.job_run_details"})

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")


@dataclass(frozen=True)
class Relation:
    schema: str
    name: str
    kind: str  # r table, p partitioned table, v view, m materialized view, S sequence
    first_column: str | None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def granted(self, role: str) -> frozenset[str]:
        """The privileges ``role`` is meant to hold."""
        return RELATION_RULES.get(self.schema, {}).get(role, frozenset())


@dataclass(frozen=True)
class Function:
    oid: int
    schema: str
    name: str
    signature: str  # regprocedure text, e.g. billing.tick()
    arg_types: tuple[str, ...]
    returns_trigger: bool
    arg_names: tuple[str, ...] = ()
    is_procedure: bool = False

    def granted(self, role: str) -> bool:
        rule = FUNCTION_RULES.get(self.schema)
        return rule is not None and role in rule(self.name)

    def null_call(self) -> sql.Composed:
        """``select schema.fn((select null::t1), …)``: enough to be refused, never to run.

        A sub-select, not a bare null: the planner folds a strict function of constant nulls
        to null without ever checking the privilege to execute it."""
        # A procedure is called, not selected, and CALL takes no sub-select (nor folds anything).
        null = "null::{}" if self.is_procedure else "(select null::{})"
        args = sql.SQL(", ").join(sql.SQL(null).format(sql.SQL(t)) for t in self.arg_types)
        verb = sql.SQL("call" if self.is_procedure else "select")
        return sql.SQL("{} {}({})").format(verb, sql.Identifier(self.schema, self.name), args)


_USER_SCHEMAS = """
    select n.nspname from pg_namespace n
     where n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
     order by 1
"""

_RELATIONS = """
    select n.nspname, c.relname, c.relkind::text,
           (select a.attname from pg_attribute a
             where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
               and a.attidentity = '' and a.attgenerated = ''
             order by a.attnum limit 1)
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any(%s) and c.relkind in ('r', 'p', 'v', 'm', 'S', 'f')
     order by 1, 2
"""

_FUNCTIONS = """
    select p.oid::int, n.nspname, p.proname, p.oid::regprocedure::text,
           array(select format_type(t, null) from unnest(p.proargtypes::oid[]) t),
           p.prorettype in ('trigger'::regtype, 'event_trigger'::regtype),
           array(select coalesce(nullif(a, ''), 'arg' || i)
                   from unnest(coalesce(p.proargnames[1:p.pronargs],
                                        array_fill(''::text, array[p.pronargs])))
                        with ordinality u(a, i)),
           p.prokind = 'p'
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = any(%s) and p.prokind in ('f', 'p')
     order by 1
"""


@dataclass(frozen=True)
class Catalog:
    schemas: tuple[str, ...]
    relations: tuple[Relation, ...]
    functions: tuple[Function, ...]

    @classmethod
    def read(cls, conn: psycopg.Connection[Any], schemas: list[str] | None = None) -> Catalog:
        names = schemas or [r[0] for r in conn.execute(_USER_SCHEMAS).fetchall()]
        relations = tuple(Relation(*row) for row in conn.execute(_RELATIONS, (names,)).fetchall())
        functions = tuple(
            Function(oid, schema, name, signature, tuple(args), trig, tuple(arg_names), proc)
            for oid, schema, name, signature, args, trig, arg_names, proc in conn.execute(
                _FUNCTIONS, (names,)
            ).fetchall()
        )
        return cls(tuple(names), relations, functions)

    @classmethod
    def project(cls, conn: psycopg.Connection[Any]) -> Catalog:
        """The objects of the project's own schemas (every schema but the platform's)."""
        return cls.read(conn, cls.read(conn).project_schemas)

    @property
    def project_schemas(self) -> list[str]:
        return [s for s in self.schemas if s not in PLATFORM_SCHEMAS]

    def unclassified(self) -> list[str]:
        """Schemas nobody has written a rule for."""
        return [
            s
            for s in self.schemas
            if s not in PLATFORM_SCHEMAS and (s not in RELATION_RULES or s not in FUNCTION_RULES)
        ]


def contents(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """A digest of every table's rows and every sequence's position, in every schema."""
    rows = conn.execute(
        """select n.nspname, c.relname, c.relkind::text
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
              and c.relkind in ('r', 'S')
            order by 1, 2"""
    ).fetchall()
    digest: dict[str, str] = {}
    for schema, name, kind in rows:
        if f"{schema}.{name}" in RESTLESS:
            continue
        ident = sql.Identifier(schema, name)
        query = (
            sql.SQL("select last_value::text || ':' || is_called::text from {}").format(ident)
            if kind == "S"
            else sql.SQL(
                "select count(*)::text || ':' || coalesce(md5(string_agg(t::text, ',' order by"
                " t::text)), '') from {} t"
            ).format(ident)
        )
        row = conn.execute(query).fetchone()
        assert row is not None
        digest[f"{schema}.{name}"] = row[0]
    return digest


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Names of the tables (or sequences) whose contents differ."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def claims_of(sub: str) -> str:
    """The ``request.jwt.claims`` of a signed-in subscriber, as PostgREST sets them."""
    return json.dumps({"sub": sub, "role": SUBSCRIBER, "aud": SUBSCRIBER})
