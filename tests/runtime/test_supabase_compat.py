"""The bootstrap against a fresh Supabase project: roles, auth helpers, extensions, pg_cron.

Expected values are transcribed from the reference (supabase/postgres init scripts and
migrations, supabase/auth migrations, pg_cron 1.4.2 as Debian ships it).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.abc import Query

from service.runtime.cluster import ADMIN_USER, Runtime

Conn = psycopg.Connection[tuple[object, ...]]


def _one(conn: Conn, query: Query, params: tuple[object, ...] = ()) -> object:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def admin(rt: Runtime, base_dbname: str) -> Iterator[Conn]:
    with psycopg.connect(rt.dsn(base_dbname, ADMIN_USER), autocommit=True) as c:
        yield c


# --- roles -----------------------------------------------------------------------------------

ROLE_ATTRS = (
    "rolsuper",
    "rolinherit",
    "rolcanlogin",
    "rolbypassrls",
    "rolcreaterole",
    "rolcreatedb",
    "rolreplication",
)
EXPECTED_ROLES = {
    #                     super  inherit login  bypass createrole createdb replication
    "supabase_admin": (True, True, True, True, True, True, True),
    "postgres": (False, True, True, True, True, True, True),
    "anon": (False, True, False, False, False, False, False),
    "authenticated": (False, True, False, False, False, False, False),
    "service_role": (False, True, False, True, False, False, False),
    "authenticator": (False, False, True, False, False, False, False),
    "supabase_auth_admin": (False, False, True, False, False, False, False),
}


def test_roles_have_supabase_attributes(base_conn: Conn) -> None:
    query = sql.SQL("select rolname, {} from pg_roles where rolname = any(%s)").format(
        sql.SQL(", ").join(map(sql.Identifier, ROLE_ATTRS))
    )
    rows = base_conn.execute(query, (list(EXPECTED_ROLES),)).fetchall()
    assert {str(r[0]): tuple(r[1:]) for r in rows} == EXPECTED_ROLES


def test_role_memberships(base_conn: Conn) -> None:
    rows = base_conn.execute(
        """
        select m.rolname, r.rolname
          from pg_auth_members a
          join pg_roles m on m.oid = a.member
          join pg_roles r on r.oid = a.roleid
         where m.rolname = any(%s)
           -- Roles are cluster-wide: the product's own roles (created by migrations in other
           -- databases of this cluster) are not part of the platform's shape.
           and (r.rolname = any(%s) or r.rolname like 'pg\\_%%')
        """,
        (list(EXPECTED_ROLES), list(EXPECTED_ROLES)),
    ).fetchall()
    memberships: dict[str, set[str]] = {name: set() for name in EXPECTED_ROLES}
    for member, role in rows:
        memberships[str(member)].add(str(role))
    assert memberships == {
        "supabase_admin": set(),
        # supabase_auth_admin membership was removed in 2024-03.
        "postgres": {
            "anon",
            "authenticated",
            "service_role",
            "pg_monitor",
            "pg_read_all_data",
            "pg_signal_backend",
        },
        "anon": set(),
        "authenticated": set(),
        "service_role": set(),
        # Its supabase_admin membership was revoked in 2022-11.
        "authenticator": {"anon", "authenticated", "service_role"},
        "supabase_auth_admin": set(),
    }


def test_role_settings(base_conn: Conn) -> None:
    rows = base_conn.execute(
        "select r.rolname, s.setconfig from pg_db_role_setting s "
        "join pg_roles r on r.oid = s.setrole where s.setdatabase = 0 and r.rolname = any(%s)",
        (list(EXPECTED_ROLES),),
    ).fetchall()
    assert {str(name): sorted(config) for name, config in rows} == {
        "anon": ["statement_timeout=3s"],
        "authenticated": ["statement_timeout=8s"],
        "authenticator": ["lock_timeout=8s", "statement_timeout=8s"],
        "postgres": ['search_path="$user", public, extensions'],
        "supabase_auth_admin": ["search_path=auth"],
    }


def test_postgres_session_is_not_superuser(rt: Runtime, base_dbname: str) -> None:
    with psycopg.connect(rt.dsn(base_dbname, "postgres")) as conn:
        row = conn.execute(
            "select current_user, current_setting('is_superuser'), current_setting('search_path')"
        ).fetchone()
    assert row == ("postgres", "off", '"$user", public, extensions')


# --- auth --------------------------------------------------------------------------------------


def _claim_pattern(claim: str) -> str:
    return (
        f"select coalesce(nullif(current_setting('request.jwt.claim.{claim}', true), ''),"
        f"(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> '{claim}'))"
    )


# supabase/auth migrations 20220224000811 and 20220531120530.
AUTH_HELPERS = {
    "uid": ("uuid", _claim_pattern("sub") + "::uuid"),
    "role": ("text", _claim_pattern("role") + "::text"),
    "email": ("text", _claim_pattern("email") + "::text"),
    "jwt": (
        "jsonb",
        "select coalesce(nullif(current_setting('request.jwt.claim', true), ''),"
        "nullif(current_setting('request.jwt.claims', true), ''))::jsonb",
    ),
}


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def test_auth_helpers_are_defined_as_in_supabase_auth(base_conn: Conn) -> None:
    rows = base_conn.execute(
        """
        select p.proname, pg_get_function_result(p.oid), p.prosrc, l.lanname, p.provolatile,
               p.prosecdef, pg_get_function_arguments(p.oid), pg_get_userbyid(p.proowner),
               has_function_privilege('anon', p.oid, 'EXECUTE'),
               has_function_privilege('authenticated', p.oid, 'EXECUTE')
          from pg_proc p join pg_language l on l.oid = p.prolang
         where p.pronamespace = 'auth'::regnamespace
        """
    ).fetchall()
    found = {str(r[0]): r[1:] for r in rows}
    assert set(found) == set(AUTH_HELPERS)
    for name, (result, body) in AUTH_HELPERS.items():
        res, src, lang, volatility, secdef, args, owner, anon, authed = found[name]
        assert isinstance(src, str)
        assert _squash(src) == _squash(body), name
        assert (res, lang, volatility, secdef, args, owner, anon, authed) == (
            result,
            "sql",
            "s",
            False,
            "",
            "supabase_auth_admin",
            True,
            True,
        ), name
    comments = dict(
        base_conn.execute(
            "select p.proname, obj_description(p.oid, 'pg_proc') from pg_proc p "
            "where p.pronamespace = 'auth'::regnamespace"
        ).fetchall()
    )
    assert comments == {
        "uid": "Deprecated. Use auth.jwt() -> 'sub' instead.",
        "role": "Deprecated. Use auth.jwt() -> 'role' instead.",
        "email": "Deprecated. Use auth.jwt() -> 'email' instead.",
        "jwt": None,
    }


HELPERS = "select auth.uid(), auth.role(), auth.email(), auth.jwt()"


def test_auth_helpers_read_request_jwt_claims(base_conn: Conn) -> None:
    sub = uuid.uuid4()
    claims = {"sub": str(sub), "role": "authenticated", "email": "a@example.com", "aal": "aal1"}
    with base_conn.transaction():
        base_conn.execute("set local role authenticated")
        base_conn.execute(
            "select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),)
        )
        row = base_conn.execute(HELPERS + ", current_user").fetchone()
    assert row == (sub, "authenticated", "a@example.com", claims, "authenticated")
    # Transaction-local, as PostgREST sets them: gone after commit.
    assert base_conn.execute(HELPERS).fetchone() == (None, None, None, None)


def test_auth_uid_reads_the_legacy_claim_setting(base_conn: Conn) -> None:
    legacy, other = uuid.uuid4(), uuid.uuid4()
    with base_conn.transaction():
        base_conn.execute("set local role authenticated")
        base_conn.execute("select set_config('request.jwt.claim.sub', %s, true)", (str(legacy),))
        # auth.jwt() reads request.jwt.claim (the whole object), not the per-claim settings.
        assert base_conn.execute(HELPERS).fetchone() == (legacy, None, None, None)
        # The per-claim setting wins over request.jwt.claims.
        base_conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            (json.dumps({"sub": str(other), "role": "anon"}),),
        )
        assert base_conn.execute(HELPERS).fetchone() == (
            legacy,
            "anon",
            None,
            {"sub": str(other), "role": "anon"},
        )


def test_auth_helpers_are_null_without_claims(base_conn: Conn) -> None:
    assert base_conn.execute(HELPERS).fetchone() == (None, None, None, None)
    with base_conn.transaction():
        for setting in ("request.jwt.claims", "request.jwt.claim", "request.jwt.claim.sub"):
            base_conn.execute("select set_config(%s, '', true)", (setting,))
        assert base_conn.execute(HELPERS).fetchone() == (None, None, None, None)


def test_auth_users_shape(base_conn: Conn) -> None:
    cols = dict(
        base_conn.execute(
            "select attname, format_type(atttypid, atttypmod) from pg_attribute "
            "where attrelid = 'auth.users'::regclass and attnum > 0 and not attisdropped"
        ).fetchall()
    )
    # The columns a billing schema may reference (§4.4 minimal stub), with Supabase's types.
    expected = {
        "id": "uuid",
        "instance_id": "uuid",
        "aud": "character varying(255)",
        "role": "character varying(255)",
        "email": "character varying(255)",
        "phone": "text",
        "raw_app_meta_data": "jsonb",
        "raw_user_meta_data": "jsonb",
        "is_sso_user": "boolean",
        "is_anonymous": "boolean",
        "created_at": "timestamp with time zone",
        "updated_at": "timestamp with time zone",
        "deleted_at": "timestamp with time zone",
    }
    assert {k: cols.get(k) for k in expected} == expected
    row = base_conn.execute(
        """
        select c.relrowsecurity, pg_get_userbyid(c.relowner),
               (select pg_get_constraintdef(k.oid) from pg_constraint k
                 where k.conrelid = c.oid and k.conname = 'users_pkey')
          from pg_class c where c.oid = 'auth.users'::regclass
        """
    ).fetchone()
    assert row == (True, "supabase_auth_admin", "PRIMARY KEY (id)")
    # Supabase's testing guide inserts users directly as postgres.
    uid = uuid.uuid4()
    base_conn.execute("insert into auth.users (id, email) values (%s, 'u@example.com')", (uid,))
    assert _one(base_conn, "select email from auth.users where id = %s", (uid,)) == "u@example.com"
    # As on Supabase, postgres may pass its privileges on auth.users on.
    for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"):
        assert _one(
            base_conn,
            "select has_table_privilege('postgres', 'auth.users', %s)",
            (f"{privilege} WITH GRANT OPTION",),
        ), privilege


def test_postgres_cannot_create_objects_in_auth(base_conn: Conn) -> None:
    assert _one(base_conn, "select has_schema_privilege('postgres', 'auth', 'CREATE')") is False
    assert _one(base_conn, "select has_schema_privilege('postgres', 'auth', 'USAGE')") is True
    for statement in [
        "create table auth.billing_customers (id uuid)",
        "create function auth.tenant() returns uuid language sql as 'select null::uuid'",
        "create view auth.v as select 1",
    ]:
        with pytest.raises(errors.InsufficientPrivilege):
            base_conn.execute(statement)


# --- extensions, time zone ---------------------------------------------------------------------


def test_extensions_live_where_supabase_puts_them(base_conn: Conn) -> None:
    rows = dict(
        base_conn.execute(
            "select extname, extnamespace::regnamespace::text from pg_extension"
        ).fetchall()
    )
    assert {k: rows.get(k) for k in ("pgcrypto", "uuid-ossp", "pg_cron")} == {
        "pgcrypto": "extensions",
        "uuid-ossp": "extensions",
        "pg_cron": "pg_catalog",
    }
    # Debian bookworm's pg_cron 1.4.2 (SQL version 1.4-1); Supabase runs 1.6.4.
    assert _one(base_conn, "select extversion from pg_extension where extname = 'pg_cron'") == (
        "1.4-1"
    )
    row = base_conn.execute(
        "select length(extensions.gen_random_bytes(16)), "
        "extensions.uuid_generate_v4() is not null, "
        "encode(extensions.digest('abc', 'sha256'), 'hex')"
    ).fetchone()
    assert row == (16, True, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    for role in ("postgres", "anon", "authenticated", "service_role"):
        assert (
            _one(base_conn, "select has_schema_privilege(%s, 'extensions', 'USAGE')", (role,))
            is True
        )


def test_database_time_zone_is_utc(base_conn: Conn) -> None:
    assert _one(base_conn, "select current_setting('TimeZone')") == "UTC"
    assert _one(base_conn, "select to_char(timestamptz '2026-01-01 09:00+09', 'HH24:MI')") == (
        "00:00"
    )


# --- pg_cron -------------------------------------------------------------------------------------


def test_cron_grants_for_postgres(base_conn: Conn) -> None:
    checks = {
        "has_schema_privilege('postgres', 'cron', 'USAGE WITH GRANT OPTION')": True,
        "has_schema_privilege('postgres', 'cron', 'CREATE')": False,
        "has_table_privilege('postgres', 'cron.job', 'SELECT WITH GRANT OPTION')": True,
    }
    for priv in ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"):
        checks[f"has_table_privilege('postgres', 'cron.job', '{priv}')"] = False
    for priv in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES"):
        checks[f"has_table_privilege('postgres', 'cron.job_run_details', '{priv}')"] = True
    checks["has_table_privilege('postgres', 'cron.job_run_details', 'TRIGGER')"] = False
    for check, expected in checks.items():
        assert _one(base_conn, f"select {check}") is expected, check
    not_executable = base_conn.execute(
        "select p.oid::regprocedure::text from pg_proc p "
        "where p.pronamespace = 'cron'::regnamespace "
        "and not has_function_privilege('postgres', p.oid, 'EXECUTE WITH GRANT OPTION')"
    ).fetchall()
    assert not_executable == []
    functions = base_conn.execute(
        "select p.oid::regprocedure::text from pg_proc p "
        "where p.pronamespace = 'cron'::regnamespace order by 1"
    ).fetchall()
    names = {str(f[0]) for f in functions}
    assert {
        "cron.schedule(text,text)",
        "cron.schedule(text,text,text)",
        "cron.unschedule(bigint)",
        "cron.unschedule(name)",  # text since pg_cron 1.5
        "cron.alter_job(bigint,text,text,text,text,boolean)",
        "cron.schedule_in_database(text,text,text,text,text,boolean)",
    } <= names


def test_cron_job_is_written_only_through_the_functions(base_conn: Conn) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        base_conn.execute("insert into cron.job (schedule, command) values ('* * * * *', 'x')")

    jobid = _one(base_conn, "select cron.schedule('billing-tick', '* * * * *', 'select 1')")
    assert isinstance(jobid, int)
    # Upsert on (jobname, username): same job, new schedule and command.
    again = _one(base_conn, "select cron.schedule('billing-tick', '*/5 * * * *', 'select 2')")
    assert again == jobid
    rows = base_conn.execute(
        "select jobid, jobname::text, schedule, command, username, active, "
        "database = current_setting('cron.database_name') from cron.job"
    ).fetchall()
    assert rows == [(jobid, "billing-tick", "*/5 * * * *", "select 2", "postgres", True, True)]

    for statement in [
        "update cron.job set active = false",
        "delete from cron.job where jobid = %s",
    ]:
        with pytest.raises(errors.InsufficientPrivilege):
            base_conn.execute(statement, (jobid,) if "%s" in statement else ())

    # The migration-safe removal pattern.
    removed = base_conn.execute(
        "select cron.unschedule(jobid) from cron.job where jobname = 'billing-tick'"
    ).fetchall()
    assert removed == [(True,)]
    assert _one(base_conn, "select count(*) from cron.job") == 0
    with pytest.raises(errors.InternalError, match="could not find valid entry for job"):
        base_conn.execute("select cron.unschedule('billing-tick')")


def test_seconds_schedules_are_rejected_on_pg_cron_1_4(base_conn: Conn) -> None:
    for schedule in ("30 seconds", "0 12 $ * *"):
        with pytest.raises(errors.InvalidParameterValue, match="invalid schedule"):
            base_conn.execute("select cron.schedule('fast', %s, 'select 1')", (schedule,))
    assert _one(base_conn, "select count(*) from cron.job") == 0
