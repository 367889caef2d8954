"""Migrations: naming, one Alembic revision per SQL file, and both runners producing one schema."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from service.runtime import migrations, testdb
from service.runtime.cluster import ADMIN_USER, BASE_DB, LOCAL_PASSWORD, Runtime, project_root

ROOT = project_root()
SQL_FILES = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
REVISION_FILES = sorted((ROOT / "alembic" / "versions").glob("*.py"))


def _revision_module(path: Path) -> dict[str, object]:
    tree = ast.parse(path.read_text())
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = (
                ast.literal_eval(node.value) if isinstance(node.value, ast.Constant) else None
            )
    values["source"] = path.read_text()
    return values


def test_sql_migration_names_follow_the_rule() -> None:
    assert SQL_FILES
    for f in SQL_FILES:
        assert migrations.MIGRATION_NAME.match(f.name), f"bad migration name: {f.name}"
    versions = [f.name.split("_", 1)[0] for f in SQL_FILES]
    assert len(versions) == len(set(versions)), "two migrations share a timestamp"


def test_every_sql_migration_has_exactly_one_thin_revision() -> None:
    revisions = {str(_revision_module(p)["revision"]): p for p in REVISION_FILES}
    for f in SQL_FILES:
        version, name = f.stem.split("_", 1)
        assert version in revisions, f"{f.name} has no Alembic revision"
        rev = revisions[version]
        assert rev.name == f"{version}_{name}.py", f"revision file for {f.name} is {rev.name}"
        source = rev.read_text()
        assert "run_revision(revision)" in source, f"{rev.name} must only run its SQL file"
        assert "op.execute" not in source
        assert "sa." not in source
    assert len(revisions) == len(SQL_FILES), "a revision exists without its SQL file"


def test_revisions_form_one_chain_in_file_order() -> None:
    chain = [_revision_module(p) for p in REVISION_FILES]
    expected_down: object = None
    for mod in sorted(chain, key=lambda m: str(m["revision"])):
        assert mod["down_revision"] == expected_down, mod["revision"]
        expected_down = mod["revision"]


def test_migrations_are_supabase_safe() -> None:
    for f in SQL_FILES:
        code = re.sub(r"--[^\n]*", "", f.read_text())  # what comments say does not run
        assert not re.search(r"\bconcurrently\b", code, re.I), f"{f.name}: CONCURRENTLY"
        assert not re.search(
            r"^\s*(commit|begin|start transaction|rollback)\s*;", code, re.I | re.M
        ), f"{f.name}: transaction control breaks the Supabase runner"
        assert not re.search(r"insert\s+into\s+vault\.", code, re.I), f"{f.name}: use create_secret"
        # pg_cron 1.4.2 (local) has five-field minute schedules only ('30 seconds' needs 1.5+).
        for schedule in re.findall(r"cron\.schedule\(\s*'[^']*'\s*,\s*'([^']*)'", code):
            assert len(schedule.split()) == 5, (f.name, schedule)
        assert not re.search(r"(test_sk_|live_sk_|test_ck_|live_ck_)", code), f"{f.name}: a key"


def test_the_tick_is_scheduled_every_minute() -> None:
    # The last schedule of the job is the one in force.
    text = "\n".join(f.read_text() for f in SQL_FILES)
    schedules = re.findall(r"cron\.schedule\('saju-billing-tick', '([^']*)', '([^']*)'\)", text)
    assert schedules[-1] == ("* * * * *", "call billing.run_ticks()")


def _schema_dump(rt: Runtime, db: str) -> str:
    proc = subprocess.run(
        [
            "pg_dump",
            "--schema-only",
            "--no-owner",
            "--exclude-table=public.alembic_version",
            # The Supabase CLI's own history of applied migrations and seeds.
            "--exclude-schema=supabase_migrations",
            "-h",
            rt.host,
            "-p",
            str(rt.port),
            "-U",
            ADMIN_USER,
            "-d",
            db,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "PGPASSWORD": LOCAL_PASSWORD},
    )
    # pg_dump 15.14+ wraps the dump in \restrict/\unrestrict lines with a random token.
    lines = proc.stdout.splitlines()
    return "\n".join(line for line in lines if not line.startswith(("\\restrict", "\\unrestrict")))


def test_psql_and_alembic_produce_the_same_schema(rt: Runtime, template: str) -> None:
    """The files run unchanged by psql (as the Supabase CLI would, one transaction each)."""
    db = testdb.clone(rt, BASE_DB, prefix="test")
    try:
        env = {**os.environ, "PGPASSWORD": LOCAL_PASSWORD}
        for f in SQL_FILES:
            subprocess.run(
                [
                    "psql",
                    "-X",
                    "-q",
                    "-1",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    rt.host,
                    "-p",
                    str(rt.port),
                    "-U",
                    "postgres",
                    "-d",
                    db,
                    "-f",
                    str(f),
                ],
                check=True,
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
        seed = ROOT / "supabase" / "seed.sql"
        if seed.exists():
            migrations.run_sql_file(rt.dsn(db), seed)
        assert _schema_dump(rt, db) == _schema_dump(rt, template)
    finally:
        testdb.drop(rt, db)


def test_the_supabase_cli_db_push_produces_the_same_schema(
    rt: Runtime, template: str, tmp_path: Path
) -> None:
    """The real Supabase CLI applies the migrations and the seed to a fresh project database."""
    cli = ROOT / ".local" / "bin" / "supabase"
    assert os.access(cli, os.X_OK), "the Supabase CLI is missing; ./dev.sh setup installs it"
    db = testdb.clone(rt, BASE_DB, prefix="test")
    try:
        # Supabase's own postgres database lets postgres CREATE (schemas); a clone needs the grant.
        with psycopg.connect(rt.dsn(db, ADMIN_USER), autocommit=True) as conn:
            conn.execute(
                sql.SQL("grant create on database {} to postgres").format(sql.Identifier(db))
            )
        url = f"postgresql://postgres:{LOCAL_PASSWORD}@{rt.host}:{rt.port}/{db}?sslmode=disable"
        proc = subprocess.run(
            [str(cli), "db", "push", f"--remote={url}", "--yes", "--include-seed",
             "--workdir", str(ROOT)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            # No telemetry or update check; the CLI's state stays in the test's directory.
            env={**os.environ, "HOME": str(tmp_path), "DO_NOT_TRACK": "1",
                 "SUPABASE_TELEMETRY_DISABLED": "1", "SUPABASE_NO_UPDATE_NOTIFIER": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for f in SQL_FILES:
            assert f"Applying migration {f.name}" in proc.stdout + proc.stderr
        with psycopg.connect(rt.dsn(db, ADMIN_USER)) as conn:
            versions = conn.execute(
                "select version from supabase_migrations.schema_migrations order by 1"
            ).fetchall()
        assert [v for (v,) in versions] == [f.name.split("_", 1)[0] for f in SQL_FILES]
        assert _schema_dump(rt, db) == _schema_dump(rt, template)
    finally:
        testdb.drop(rt, db)


def test_foundation_refuses_a_database_without_pg_net(rt: Runtime, base_dbname: str) -> None:
    with psycopg.connect(rt.dsn(base_dbname, ADMIN_USER), autocommit=True) as conn:
        conn.execute("drop schema net cascade")
    with pytest.raises(psycopg.errors.RaiseException, match=r"pg_net \(schema net\) is not"):
        migrations.upgrade(rt.dsn(base_dbname))


def test_foundation_refuses_a_database_without_vault(rt: Runtime, base_dbname: str) -> None:
    with psycopg.connect(rt.dsn(base_dbname, ADMIN_USER), autocommit=True) as conn:
        conn.execute("drop schema vault cascade")
    with pytest.raises(psycopg.errors.RaiseException, match=r"Vault \(schema vault\) is not"):
        migrations.upgrade(rt.dsn(base_dbname))


def test_alembic_records_head_and_is_idempotent(rt: Runtime, dbname: str) -> None:
    head = max(f.name.split("_", 1)[0] for f in SQL_FILES)
    migrations.upgrade(rt.dsn(dbname))  # already at head: a no-op
    with psycopg.connect(rt.dsn(dbname)) as conn:
        row = conn.execute("select version_num from public.alembic_version").fetchone()
    assert row == (head,)


def test_every_function_is_documented_and_locked_down(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    undocumented = conn.execute(
        """select p.oid::regprocedure::text from pg_proc p
            where p.pronamespace in ('billing'::regnamespace, 'api'::regnamespace)
              and obj_description(p.oid, 'pg_proc') is null"""
    ).fetchall()
    assert undocumented == []
    public_exec = conn.execute(
        """select p.oid::regprocedure::text from pg_proc p
            where p.pronamespace in ('billing'::regnamespace, 'api'::regnamespace)
              and has_function_privilege('public', p.oid, 'execute')"""
    ).fetchall()
    assert public_exec == []
    definer_without_path = conn.execute(
        """select p.oid::regprocedure::text from pg_proc p
            where p.pronamespace in ('billing'::regnamespace, 'api'::regnamespace)
              and p.prosecdef and not coalesce(p.proconfig @> array['search_path=""'], false)"""
    ).fetchall()
    assert definer_without_path == []
    unnamed = conn.execute(
        """select conrelid::regclass::text, conname from pg_constraint
            where connamespace = 'billing'::regnamespace and conname !~ '_(pkey|key|fkey|check)$'"""
    ).fetchall()
    assert unnamed == []
