"""Calendar-month periods in Asia/Seoul (invariant 4), checked against an independent Python
computation: every anchor day 1–31, anchors in every month, 40 months ahead (through the leap day
of 2028 and the non-leap 2100), at local times on both sides of the UTC date line."""

from __future__ import annotations

import calendar
from datetime import datetime, time, timedelta

import psycopg
from dbkit import ANCHOR_31_PERIOD_STARTS, SEOUL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MONTHS_AHEAD = 40


def expected_start(anchor: datetime, n: int) -> datetime:
    """The anchor's local date-time n calendar months later, clamped to the month's last day."""
    local = anchor.astimezone(SEOUL)
    months = local.month - 1 + n
    year, month = local.year + months // 12, months % 12 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day)


def sql_starts(
    conn: psycopg.Connection[tuple[object, ...]], anchors: list[datetime], months: int
) -> dict:
    rows = conn.execute(
        """select a.i, n, billing.period_start(a.anchor, n)
             from unnest(%s::timestamptz[]) with ordinality as a(anchor, i)
            cross join generate_series(0, %s) as n""",
        (anchors, months),
    ).fetchall()
    return {(int(i) - 1, n): start for i, n, start in rows}


def anchors_for(years: list[int], at: time) -> list[datetime]:
    return [
        datetime.combine(datetime(y, m, d).date(), at, tzinfo=SEOUL)
        for y in years
        for m in range(1, 13)
        for d in range(1, calendar.monthrange(y, m)[1] + 1)
    ]


def test_every_anchor_day_for_forty_months(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    # 00:30 and 23:30 in Seoul fall on different UTC dates; 10:00 is a typical sign-up time.
    for at in (time(0, 30), time(10, 0), time(23, 30, 59, 999999)):
        anchors = anchors_for([2027, 2028], at) + anchors_for([2099], at)
        got = sql_starts(conn, anchors, MONTHS_AHEAD)
        assert len(got) == len(anchors) * (MONTHS_AHEAD + 1)
        mismatches = [
            (anchors[i], n, start, expected_start(anchors[i], n))
            for (i, n), start in got.items()
            if start != expected_start(anchors[i], n)
        ]
        assert mismatches == []
    assert {a.day for a in anchors} == set(range(1, 32))


def test_anchor_31_walks_the_month_ends(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    anchor = datetime(2027, 12, 31, 10, 0, tzinfo=SEOUL)
    got = sql_starts(conn, [anchor], 14)
    local_days = [got[0, n].astimezone(SEOUL).strftime("%Y-%m-%d %H:%M") for n in range(15)]
    assert local_days == ANCHOR_31_PERIOD_STARTS


def test_leap_day_anchor_and_century(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    leap = datetime(2028, 2, 29, 9, 0, tzinfo=SEOUL)
    got = sql_starts(conn, [leap], 48)
    # Feb 29 → 29th of each month, Feb 28 in common years, Feb 29 again in 2032.
    assert got[0, 1].astimezone(SEOUL).date().isoformat() == "2028-03-29"
    assert got[0, 12].astimezone(SEOUL).date().isoformat() == "2029-02-28"
    assert got[0, 13].astimezone(SEOUL).date().isoformat() == "2029-03-29"
    assert got[0, 48].astimezone(SEOUL).date().isoformat() == "2032-02-29"
    century = sql_starts(conn, [datetime(2099, 12, 31, 12, 0, tzinfo=SEOUL)], 2)
    assert (
        century[0, 2].astimezone(SEOUL).date().isoformat() == "2100-02-28"
    )  # 2100 is no leap year


def test_periods_are_contiguous_months_not_30_days(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    anchors = anchors_for([2028], time(10, 0))
    got = sql_starts(conn, anchors, 24)
    for i in range(len(anchors)):
        lengths = {(got[i, n + 1] - got[i, n]) for n in range(24)}
        assert lengths <= {timedelta(days=d) for d in (28, 29, 30, 31)}
        assert len(lengths) > 1  # a month is not a fixed number of days
        for n in range(25):
            local = got[i, n].astimezone(SEOUL)
            assert local.time() == time(10, 0)
            # Back on the anchor day whenever the month has it.
            if anchors[i].day <= calendar.monthrange(local.year, local.month)[1]:
                assert local.day == anchors[i].day


# The connection is shared by the examples on purpose: the function is pure.
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    anchor=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(SEOUL)
    ),
    n=st.integers(min_value=0, max_value=1200),
)
def test_any_anchor_any_month(
    conn: psycopg.Connection[tuple[object, ...]], anchor: datetime, n: int
) -> None:
    got = conn.execute("select billing.period_start(%s, %s)", (anchor, n)).fetchone()
    assert got is not None
    assert got[0] == expected_start(anchor, n)
