"""The local runtime's lifecycle: start again and again, stop, restart after a 'reboot', reset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service.runtime import supervisor
from service.runtime.cluster import ADMIN_USER, BASE_DB, MAIN_DB, Runtime


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_main_database_runs_pg_cron_as_supabase_does(rt: Runtime) -> None:
    with rt.connect(MAIN_DB) as conn:
        launcher = conn.execute(
            "select count(*) from pg_stat_activity where backend_type = 'pg_cron launcher'"
        ).fetchone()
        settings = dict(
            conn.execute(
                "select name, setting from pg_settings where name in "
                "('cron.database_name', 'shared_preload_libraries', 'TimeZone', "
                "'cron.use_background_workers')"
            ).fetchall()
        )
    assert launcher == (1,)
    assert settings == {
        "cron.database_name": "postgres",
        "shared_preload_libraries": "pg_cron,pg_stat_statements,plpgsql",
        "TimeZone": "UTC",
        "cron.use_background_workers": "on",
    }


def test_base_template_is_a_template_and_the_main_db_is_not(rt: Runtime) -> None:
    with rt.connect("template1") as conn:
        rows = dict(
            conn.execute(
                "select datname, datistemplate from pg_database where datname in (%s, %s)",
                (BASE_DB, MAIN_DB),
            ).fetchall()
        )
        owners = dict(
            conn.execute(
                "select datname, pg_get_userbyid(datdba) from pg_database "
                "where datname in (%s, %s)",
                (BASE_DB, MAIN_DB),
            ).fetchall()
        )
    assert rows == {BASE_DB: True, MAIN_DB: False}
    assert owners == {BASE_DB: "postgres", MAIN_DB: "postgres"}


def test_start_is_idempotent(rt: Runtime) -> None:
    with rt.connect(MAIN_DB) as conn:
        before = conn.execute("select pg_postmaster_start_time()").fetchone()
    rt.start()
    rt.start()
    with rt.connect(MAIN_DB) as conn:
        after = conn.execute("select pg_postmaster_start_time()").fetchone()
    assert before == after, "start() on a running, current cluster must not restart it"
    assert rt.status()["current"] is True


@pytest.fixture(scope="module")
def scratch_runtime(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Runtime, dict[str, str]]]:
    """A second, throw-away runtime in its own directory and port, built from nothing."""
    base = Path("/var/tmp") / f"saju-scratch-{os.getpid()}"
    env = {
        **os.environ,
        "SAJU_RUNTIME_DIR": str(base),
        "SAJU_DB_PORT": "54399",
        # Its own Data API ports too, beside the session's runtime.
        "SAJU_API_PORT": "54397",
        "SAJU_REST_PORT": "54398",
    }
    runtime = Runtime(root=Runtime.from_env().root, base_dir=base, port=54399)
    yield runtime, env
    _cli(env, "db", "stop")
    subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.slow
def test_cli_lifecycle_from_nothing(scratch_runtime: tuple[Runtime, dict[str, str]]) -> None:
    runtime, env = scratch_runtime
    for _ in range(2):  # the first start builds the cluster, the second finds it running
        proc = _cli(env, "db", "start")
        assert proc.returncode == 0, proc.stderr
        assert "local database up" in proc.stdout
    status = _cli(env, "db", "status")
    assert status.returncode == 0
    state = json.loads(status.stdout)
    assert state["running"] is True
    assert state["current"] is True
    assert state["port"] == 54399
    assert isinstance(state["net_worker"], int)

    # A reboot: everything stops; the next start brings the same cluster back.
    assert _cli(env, "db", "stop").returncode == 0
    assert _cli(env, "db", "status").returncode == 3
    assert supervisor.networker_pid(runtime) is None
    with pytest.raises(psycopg.OperationalError):
        runtime.connect(MAIN_DB, ADMIN_USER)


@pytest.mark.slow
def test_cli_restart_and_reset(scratch_runtime: tuple[Runtime, dict[str, str]]) -> None:
    runtime, env = scratch_runtime
    assert _cli(env, "db", "start").returncode == 0
    with runtime.connect(MAIN_DB, "postgres") as conn:
        conn.execute("create table public.marker (id int)")
    assert _cli(env, "db", "stop").returncode == 0
    assert _cli(env, "db", "start").returncode == 0
    with runtime.connect(MAIN_DB, "postgres") as conn:
        assert conn.execute("select to_regclass('public.marker')::text").fetchone() == ("marker",)
    proc = _cli(env, "db", "reset")
    assert proc.returncode == 0, proc.stderr
    with runtime.connect(MAIN_DB, "postgres") as conn:
        assert conn.execute("select to_regclass('public.marker')").fetchone() == (None,)
    migrate = _cli(env, "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr
    with runtime.connect(MAIN_DB, "postgres") as conn:
        assert conn.execute("select to_regnamespace('billing')::text").fetchone() == ("billing",)

    # Sized like Supabase's Large add-on and back: shared_buffers needs the restart start does.
    def shared_buffers() -> object:
        with runtime.connect(MAIN_DB, "postgres") as conn:
            row = conn.execute("select current_setting('shared_buffers')").fetchone()
        return None if row is None else row[0]

    assert _cli({**env, "SAJU_DB_COMPUTE": "large"}, "db", "start").returncode == 0
    assert shared_buffers() == "2GB"
    assert _cli(env, "db", "start").returncode == 0
    assert shared_buffers() == "128MB"
    wrong = _cli({**env, "SAJU_DB_COMPUTE": "huge"}, "db", "start")
    assert wrong.returncode != 0
    assert "SAJU_DB_COMPUTE must be one of local, large" in wrong.stderr


def test_connecting_needs_the_password(rt: Runtime) -> None:
    bad = rt.dsn(MAIN_DB, "postgres").replace(":postgres@", ":wrong@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad, connect_timeout=5)


def test_a_stale_pidfile_naming_another_process_is_not_the_supervisor(
    tmp_path: Path,
) -> None:
    """After a reboot the recorded pid may belong to something else; start must not trust it."""
    runtime = Runtime(root=Runtime.from_env().root, base_dir=tmp_path, port=1)
    runtime.run_dir.mkdir(parents=True)
    (runtime.run_dir / "net-supervisor.pid").write_text(f"{os.getpid()}\n")
    assert supervisor.networker_pid(runtime) is None
    (runtime.run_dir / "net-supervisor.pid").write_text("not a pid\n")
    assert supervisor.networker_pid(runtime) is None


def test_the_running_supervisor_is_recognised(rt: Runtime) -> None:
    pid = supervisor.networker_pid(rt)
    assert pid is not None
    assert supervisor.ensure_networker(rt) == pid, "a second start must not spawn another"


def test_a_cluster_that_cannot_start_says_why() -> None:
    """Port taken by the running cluster: the CLI prints the server's own complaint, exit 1."""
    env = {**os.environ, "SAJU_RUNTIME_DIR": str(Path("/var/tmp") / f"saju-clash-{os.getpid()}")}
    env["SAJU_DB_PORT"] = str(Runtime.from_env().port)  # already in use by the session's cluster
    try:
        proc = _cli(env, "db", "start")
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        assert "could not create any TCP/IP sockets" in proc.stderr, proc.stderr
    finally:
        _cli(env, "db", "stop")
        subprocess.run(["rm", "-rf", env["SAJU_RUNTIME_DIR"]], check=False)
