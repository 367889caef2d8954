"""The runtime's two modes: fast for tests (crash safety traded for speed), durable with Supabase's
settings for the demo, benchmarks and chaos runs; switching is a reload, in both directions."""

from __future__ import annotations

from dataclasses import replace

from service.runtime.cluster import DURABILITY_SETTINGS, Runtime


def settings(rt: Runtime) -> dict[str, str]:
    with rt.connect() as conn:
        return {
            name: str(conn.execute("select current_setting(%s)", (name,)).fetchone()[0])  # type: ignore[index]
            for name in DURABILITY_SETTINGS
        }


def test_the_cluster_runs_in_the_mode_asked_for(rt: Runtime) -> None:
    """Fast unless SAJU_DB_DURABLE=1."""
    assert settings(rt) == dict.fromkeys(DURABILITY_SETTINGS, "on" if rt.durable else "off")


def test_durable_mode_turns_on_what_supabase_has_on_and_back(rt: Runtime) -> None:
    try:
        replace(rt, durable=True).start()
        assert settings(rt) == dict.fromkeys(DURABILITY_SETTINGS, "on")
        replace(rt, durable=False).start()
        assert settings(rt) == dict.fromkeys(DURABILITY_SETTINGS, "off")
    finally:
        rt.start()  # the mode this run asked for
