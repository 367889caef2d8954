"""The billing migrations follow the project's rules: naming, one thin alembic revision each, SQL
that runs unchanged on Supabase, and a documented, locked-down surface in the migrated schema."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import psycopg

from service.runtime.migrations import MIGRATION_NAME, migrations_dir

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ROOT / "alembic" / "versions"
BILLING = sorted(
    p for p in migrations_dir().glob("*.sql") if p.name > "20261121000000_foundation.sql"
)


def test_billing_migrations_exist_and_are_named_by_rule() -> None:
    assert [p.name for p in BILLING] == [
        "20261121200000_billing_model.sql",
        "20261121200100_billing_core.sql",
        "20261121200200_billing_service.sql",
        "20261121200300_billing_operator.sql",
        "20261121200400_billing_api.sql",
        "20261121200500_billing_scheduler.sql",
        "20261121200600_billing_security.sql",
        "20261203200000_scale.sql",
    ]
    assert all(MIGRATION_NAME.match(p.name) for p in BILLING)


def test_every_migration_has_a_thin_alembic_revision_in_order() -> None:
    sql = sorted(p for p in migrations_dir().glob("*.sql"))
    previous = None
    for path in sql:
        stamp = path.name.split("_", 1)[0]
        revision = VERSIONS / f"{path.stem}.py"
        assert revision.exists(), f"no alembic revision for {path.name}"
        tree = ast.parse(revision.read_text())
        values = {
            node.targets[0].id: node.value.value  # type: ignore[attr-defined]
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        }
        assert values["revision"] == stamp
        assert values["down_revision"] == previous
        upgrade = next(
            n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "upgrade"
        )
        assert ast.unparse(upgrade.body[0]) == "run_revision(revision)"
        assert len(upgrade.body) == 1
        previous = stamp


def test_the_tick_is_scheduled_every_minute() -> None:
    text = (migrations_dir() / "20261121200500_billing_scheduler.sql").read_text()
    assert (
        "select cron.schedule('saju-billing-tick', '* * * * *', 'select billing.tick()');" in text
    )


def test_billing_sql_runs_unchanged_on_supabase() -> None:
    for path in BILLING:
        text = path.read_text()
        code = re.sub(r"--[^\n]*", "", text)  # what comments say does not run
        assert not re.search(r"\bconcurrently\b", code, re.I), path.name
        assert not re.search(
            r"^\s*(commit|begin|start transaction|rollback)\s*;", code, re.I | re.M
        ), path.name
        assert not re.search(r"insert\s+into\s+vault\.", code, re.I), path.name
        # pg_cron 1.4 has five-field minute schedules only.
        for schedule in re.findall(r"cron\.schedule\(\s*'[^']*'\s*,\s*'([^']*)'", code):
            assert len(schedule.split()) == 5, (path.name, schedule)
        assert not re.search(r"(test_sk_|live_sk_|test_ck_|live_ck_)", code), path.name


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
