"""Runs every pgTAP file in supabase/tests with pg_prove, each in a fresh migrated database.

As `supabase test db` runs all files in name order in one database, the shared helpers file
(schema ``tests``, not rolled back) runs first in the same database as each file; it also runs on
its own, and twice in a row to show that it is idempotent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from service.runtime.cluster import ADMIN_USER, LOCAL_PASSWORD, Runtime, project_root

PGTAP_FILES = sorted((project_root() / "supabase" / "tests").rglob("*.sql"))
HELPERS = project_root() / "supabase" / "tests" / "database" / "01_helpers.sql"


def _pg_prove(rt: Runtime, dbname: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    """pg_prove over ``paths`` in that order (one psql session each) in database ``dbname``."""
    pg_prove = shutil.which("pg_prove")
    assert pg_prove, "pg_prove is missing (Debian: libtap-parser-sourcehandler-pgtap-perl)"
    # As `supabase test db` does: pgTAP lives in `extensions` for the duration of the run.
    with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as conn:
        conn.execute("create extension if not exists pgtap with schema extensions")
    return subprocess.run(
        [pg_prove, "-h", rt.host, "-p", str(rt.port), "-U", "postgres", "-d", dbname]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": LOCAL_PASSWORD},
        timeout=600,
        check=False,
    )


def _assert_passed(proc: subprocess.CompletedProcess[str], files: int) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Result: PASS" in proc.stdout, proc.stdout
    assert f"Files={files}," in proc.stdout, proc.stdout


def test_pgtap_files_exist() -> None:
    assert PGTAP_FILES, "supabase/tests holds no pgTAP files"
    assert HELPERS in PGTAP_FILES, "the shared helpers file is missing"
    # `supabase test db` runs the files in name order: the helpers must come before their users.
    users = [p for p in PGTAP_FILES if p != HELPERS and "tests." in p.read_text()]
    assert users, "no pgTAP file uses the shared helpers"
    assert all(p.name > HELPERS.name for p in users), [p.name for p in users]


@pytest.mark.parametrize(
    "path", PGTAP_FILES, ids=[p.relative_to(project_root()).as_posix() for p in PGTAP_FILES]
)
def test_pgtap(rt: Runtime, dbname: str, path: Path) -> None:
    files = [path] if path == HELPERS else [HELPERS, path]
    _assert_passed(_pg_prove(rt, dbname, *files), len(files))


def test_pgtap_helpers_file_is_idempotent(rt: Runtime, dbname: str) -> None:
    _assert_passed(_pg_prove(rt, dbname, HELPERS), 1)
    _assert_passed(_pg_prove(rt, dbname, HELPERS), 1)
