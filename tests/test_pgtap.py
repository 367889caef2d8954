"""Runs every pgTAP file in supabase/tests with pg_prove, each in a fresh migrated database."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from service.runtime.cluster import ADMIN_USER, LOCAL_PASSWORD, Runtime, project_root

PGTAP_FILES = sorted((project_root() / "supabase" / "tests").rglob("*.sql"))


def test_pgtap_files_exist() -> None:
    assert PGTAP_FILES, "supabase/tests holds no pgTAP files"


@pytest.mark.parametrize(
    "path", PGTAP_FILES, ids=[p.relative_to(project_root()).as_posix() for p in PGTAP_FILES]
)
def test_pgtap(rt: Runtime, dbname: str, path: Path) -> None:
    pg_prove = shutil.which("pg_prove")
    assert pg_prove, "pg_prove is missing (Debian: libtap-parser-sourcehandler-pgtap-perl)"
    # As `supabase test db` does: pgTAP lives in `extensions` for the duration of the run.
    with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as conn:
        conn.execute("create extension if not exists pgtap with schema extensions")
    proc = subprocess.run(
        [pg_prove, "-h", rt.host, "-p", str(rt.port), "-U", "postgres", "-d", dbname, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": LOCAL_PASSWORD},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Result: PASS" in proc.stdout, proc.stdout
