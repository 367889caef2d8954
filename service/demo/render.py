"""The demo report as a self-contained HTML file (charts inline as SVG, no network) and as text."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import date
from pathlib import Path

import jinja2
import markupsafe
import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from service.demo.report import Report

_COLORS = {
    "blue": "#3366cc",
    "green": "#2e9e5b",
    "red": "#d9534f",
    "orange": "#f0ad4e",
    "grey": "#8c8c8c",
    "purple": "#7b5ea7",
}


def won(amount: int) -> str:
    return f"{amount:,} KRW"


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG sits inside the HTML


def _thousands(ax: Axes) -> None:
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def _label(month: date) -> str:
    return f"{month:%Y-%m}"


def chart_mrr(report: Report) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = [_label(m.month) for m in report.mrr]
    ax.bar(labels, [m.mrr for m in report.mrr], color=_COLORS["blue"], label="MRR (KRW)")
    ax.set_ylabel("MRR (KRW)")
    _thousands(ax)
    twin = ax.twinx()
    twin.plot(
        labels,
        [m.paying_subscriptions for m in report.mrr],
        color=_COLORS["orange"],
        marker="o",
        label="paying subscriptions",
    )
    twin.set_ylabel("paying subscriptions")
    twin.set_ylim(bottom=0)
    ax.set_title("MRR and paying subscriptions at each month's end", pad=26)
    ax.tick_params(axis="x", rotation=45)
    bars, line = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(
        bars[0] + line[0],
        bars[1] + line[1],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=2,
        frameon=False,
    )
    return _svg(fig)


def _grouped(
    labels: Sequence[str], series: Mapping[str, tuple[Sequence[int], str]], title: str, ylabel: str
) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / max(1, len(series))
    for i, (name, (values, color)) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width=width, label=name, color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_ylabel(ylabel)
    _thousands(ax)
    ax.set_title(title)
    ax.legend(frameon=False)
    return _svg(fig)


def chart_movements(report: Report) -> str:
    mv = report.movements
    dunning = {m.month: m.recovered for m in report.dunning}
    return _grouped(
        [_label(m.month) for m in mv],
        {
            "new": ([m.new_subscriptions for m in mv], _COLORS["green"]),
            "reactivated": ([m.reactivated for m in mv], _COLORS["blue"]),
            "churned": ([m.churned for m in mv], _COLORS["red"]),
            "recovered from dunning": ([dunning.get(m.month, 0) for m in mv], _COLORS["purple"]),
        },
        "New, reactivated, churned and recovered by month",
        "subscriptions",
    )


def chart_charges(report: Report) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = [_label(m.month) for m in report.charges]
    ok = [m.succeeded for m in report.charges]
    declined = [m.declined for m in report.charges]
    failed = [m.failed for m in report.charges]
    ax.bar(labels, ok, color=_COLORS["green"], label="succeeded")
    ax.bar(labels, declined, bottom=ok, color=_COLORS["red"], label="declined")
    ax.bar(
        labels,
        failed,
        bottom=[a + b for a, b in zip(ok, declined, strict=True)],
        color=_COLORS["orange"],
        label="failed",
    )
    ax.set_ylim(0, max([1, *(m.attempts for m in report.charges)]) * 1.15)
    ax.set_ylabel("charge attempts")
    ax.set_title("Settled charge attempts by outcome")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(frameon=False, loc="upper left")
    return _svg(fig)


def _horizontal(labels: Sequence[str], values: Sequence[int], title: str, color: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(3, len(labels)) + 0.8))
    ax.barh(list(labels)[::-1], list(values)[::-1], color=color)
    for y, v in enumerate(list(values)[::-1]):
        ax.text(v, y, f" {v:,}", va="center")
    ax.set_xlim(0, max([1, *values]) * 1.15)
    ax.set_title(title)
    return _svg(fig)


def chart_statuses(report: Report) -> str:
    return _horizontal(
        [s.status for s in report.statuses],
        [s.subscriptions for s in report.statuses],
        "Subscriptions by status now",
        _COLORS["blue"],
    )


def chart_declines(report: Report) -> str:
    return _horizontal(
        [f"{d.error_code} ({d.classification})" for d in report.declines],
        [d.attempts for d in report.declines],
        "Declined and failed charge attempts by Toss code",
        _COLORS["red"],
    )


def chart_revenue(report: Report) -> str:
    rv = report.revenue
    return _grouped(
        [_label(m.month) for m in rv],
        {
            "gross": ([m.gross for m in rv], _COLORS["blue"]),
            "refunded": ([m.refunded for m in rv], _COLORS["red"]),
            "net": ([m.net for m in rv], _COLORS["green"]),
        },
        "Revenue by month (KRW, cash basis)",
        "KRW",
    )


def cohort_table(report: Report) -> tuple[list[int], list[tuple[str, int, list[float | None]]]]:
    """The retention triangle: (months since start, [(cohort, size, rate per month or None)])."""
    width = 1 + max((c.months_since_start for c in report.cohorts), default=0)
    rows: dict[date, tuple[int, list[float | None]]] = {}
    for c in report.cohorts:
        rates = rows.setdefault(c.cohort_month, (c.cohort_size, [None] * width))[1]
        rates[c.months_since_start] = float(c.retention_rate)
    return list(range(width)), [(_label(m), n, r) for m, (n, r) in rows.items()]


def text(report: Report, people: Mapping[str, object]) -> str:
    """The plain-text summary (also written to report.txt)."""
    r = report
    inv = r.invariants
    start = f"{r.clock.started_on:%Y-%m-%d}" if r.clock.started_on else "-"
    out = [
        "saju-billing demo report (figures from the analytics views, read as role analyst)",
        f"simulated {start} .. {r.clock.as_of:%Y-%m-%d} (test clock), "
        f"{r.subscriptions} subscriptions, {r.attempts} settled charge attempts",
        "",
        "month     MRR (KRW)  paying  new  react.  churned  attempts  succeeded  declined  failed",
    ]
    for m, mv, c in zip(r.mrr, r.movements, r.charges, strict=True):
        out.append(
            f"{_label(m.month)}  {m.mrr:>11,}  {m.paying_subscriptions:>6}  "
            f"{mv.new_subscriptions:>3}  {mv.reactivated:>6}  {mv.churned:>7}  {c.attempts:>8}  "
            f"{c.succeeded:>9}  {c.declined:>8}  {c.failed:>6}"
        )
    out += [
        "",
        "subscriptions by status: "
        + ", ".join(f"{s.status} {s.subscriptions}" for s in r.statuses),
        f"charge success rate: {r.success_rate:.1%}; by attempt number: "
        + ", ".join(f"#{a.attempt_number} {a.success_rate:.0%}" for a in r.by_attempt),
        "decline reasons: "
        + (", ".join(f"{d.error_code} {d.attempts}" for d in r.declines) or "none"),
        f"dunning: {r.dunning_total('episodes')} episodes: {r.dunning_total('recovered')} "
        f"recovered, {r.dunning_total('lost')} lost, {r.dunning_total('in_progress')} in "
        f"progress; recovery rate {r.recovery_rate:.0%}, "
        f"mean {r.mean_hours_to_recover / 24:.1f} days to recover",
        f"revenue: gross {won(r.revenue_total('gross'))}, refunded "
        f"{won(r.revenue_total('refunded'))} in {r.revenue_total('refunds')} refunds, "
        f"net {won(r.revenue_total('net'))}",
        f"credits: {r.credits_total('granted')} granted, {r.credits_total('consumed')} used, "
        f"{r.credits_total('expired')} expired, {r.credits_total('revoked')} revoked, "
        f"{r.credits_total('remaining')} left",
        "people: " + ", ".join(f"{k} {v}" for k, v in people.items() if k != "refused"),
        "",
        "invariants (all must be 0):",
        f"  periods charged twice at the sandbox: {inv.periods_charged_twice}",
        f"  approvals missing from the ledger:    {inv.approvals_missing}",
        f"  attempts left unknown:                {inv.attempts_unknown}",
        f"  money at Toss minus payments' balance: {inv.money_difference}",
        "  => " + ("OK" if inv.ok else "VIOLATED"),
    ]
    return "\n".join(out) + "\n"


_TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("service.demo", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)


def html(report: Report, people: Mapping[str, object]) -> str:
    months, cohorts = cohort_table(report)
    charts = {
        "mrr": chart_mrr(report),
        "movements": chart_movements(report),
        "statuses": chart_statuses(report),
        "charges": chart_charges(report),
        "declines": chart_declines(report) if report.declines else "",
        "revenue": chart_revenue(report),
    }
    return _TEMPLATE.get_template("report.html").render(
        r=report,
        inv=asdict(report.invariants),
        cohort_months=months,
        cohorts=cohorts,
        people={k: v for k, v in people.items() if k != "refused"},
        # The SVG is matplotlib's own output from numbers and fixed labels: safe to inline.
        charts={k: markupsafe.Markup(v) for k, v in charts.items()},  # noqa: S704
        won=won,
    )


def write(report: Report, out_dir: Path, people: Mapping[str, object]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "report.html": html(report, people),
        "report.txt": text(report, people),
        "report.json": report.to_json(),
    }
    for name, content in files.items():
        (out_dir / name).write_text(content, encoding="utf-8")
    return [out_dir / name for name in files]
