"""The demo report as a self-contained HTML file (charts inline as SVG, no network) and as text."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict
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


def _months(report: Report) -> list[str]:
    return [f"{m.month:%Y-%m}" for m in report.mrr]


def chart_mrr(report: Report) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = _months(report)
    ax.bar(labels, [m.mrr for m in report.mrr], color=_COLORS["blue"])
    ax.set_ylabel("MRR (KRW)")
    _thousands(ax)
    twin = ax.twinx()
    twin.plot(labels, [m.paying for m in report.mrr], color=_COLORS["orange"], marker="o")
    twin.set_ylabel("paying subscribers")
    twin.set_ylim(bottom=0)
    ax.set_title("MRR and paying subscribers at each month's end")
    ax.tick_params(axis="x", rotation=45)
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
    return _grouped(
        [f"{m.month:%Y-%m}" for m in mv],
        {
            "new": ([m.new for m in mv], _COLORS["green"]),
            "churned": ([m.churned for m in mv], _COLORS["red"]),
            "recovered": ([m.recovered for m in mv], _COLORS["purple"]),
        },
        "New, churned and recovered by month",
        "subscriptions / periods",
    )


def chart_charges(report: Report) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = [f"{m.month:%Y-%m}" for m in report.charges]
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
    ax.set_ylim(0, max([1, *(m.succeeded + m.declined + m.failed for m in report.charges)]) * 1.15)
    ax.set_ylabel("charge attempts")
    ax.set_title("Charge attempts by outcome")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(frameon=False)
    return _svg(fig)


def _horizontal(labels: Sequence[str], values: Sequence[int], title: str, color: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(3, len(labels)) + 0.8))
    ax.barh(list(labels)[::-1], list(values)[::-1], color=color)
    for y, v in enumerate(list(values)[::-1]):
        ax.text(v, y, f" {v}", va="center")
    ax.set_title(title)
    return _svg(fig)


def chart_statuses(report: Report) -> str:
    return _horizontal(
        list(report.statuses),
        list(report.statuses.values()),
        "Subscriptions by status now",
        _COLORS["blue"],
    )


def chart_declines(report: Report) -> str:
    return _horizontal(
        [f"{d.code} ({d.classification})" for d in report.declines],
        [d.attempts for d in report.declines],
        "Failed charge attempts by Toss code",
        _COLORS["red"],
    )


def chart_revenue(report: Report) -> str:
    rv = report.revenue
    return _grouped(
        [f"{m.month:%Y-%m}" for m in rv],
        {
            "gross": ([m.gross for m in rv], _COLORS["blue"]),
            "refunded": ([m.refunded for m in rv], _COLORS["red"]),
            "net": ([m.gross - m.refunded for m in rv], _COLORS["green"]),
        },
        "Revenue by month (KRW)",
        "KRW",
    )


def text(report: Report, people: Mapping[str, object]) -> str:
    """The plain-text summary (also written to report.txt)."""
    r = report
    out = [
        "saju-billing demo report",
        f"simulated {r.span.started_at:%Y-%m-%d} .. {r.span.ended_at:%Y-%m-%d} (test clock), "
        f"{r.span.customers} subscribers, {r.span.attempts} charge attempts, "
        f"{r.span.webhooks} Toss webhooks",
        "",
        "month     MRR (KRW)  paying  new  churned  recovered  succeeded  declined  failed",
    ]
    for m, mv, c in zip(r.mrr, r.movements, r.charges, strict=True):
        out.append(
            f"{m.month:%Y-%m}  {m.mrr:>11,}  {m.paying:>6}  {mv.new:>3}  {mv.churned:>7}  "
            f"{mv.recovered:>9}  {c.succeeded:>9}  {c.declined:>8}  {c.failed:>6}"
        )
    out += [
        "",
        "subscriptions by status: " + ", ".join(f"{k} {v}" for k, v in r.statuses.items()),
        f"charge success rate: {r.success_rate:.1%}",
        "decline reasons: " + (", ".join(f"{d.code} {d.attempts}" for d in r.declines) or "none"),
        f"dunning: {r.dunning.periods} periods with a failed charge: {r.dunning.recovered} "
        f"recovered, {r.dunning.lost} lost, {r.dunning.in_progress} in progress; "
        f"mean {r.dunning.mean_days_to_recover:.1f} days to recover",
        f"refunds: {r.refunds.succeeded} made ({r.refunds.full} full, {r.refunds.partial} "
        f"partial) of {r.refunds.requested} requested, {won(r.refunds.amount)}",
        f"credits: {r.credits.granted} granted, {r.credits.used} used, {r.credits.expired} "
        f"expired, {r.credits.revoked} revoked",
        "people: " + ", ".join(f"{k} {v}" for k, v in people.items() if k != "refused"),
        "",
        "invariants (all must be 0):",
        f"  periods charged twice at the sandbox: {r.invariants.periods_charged_twice}",
        f"  approvals missing from the ledger:    {r.invariants.approvals_missing}",
        f"  attempts left unknown:                {r.invariants.attempts_unknown}",
        f"  money at Toss minus payments' balance: {r.invariants.money_difference}",
        "  => " + ("OK" if r.invariants.ok else "VIOLATED"),
    ]
    return "\n".join(out) + "\n"


_TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("service.demo", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)


def html(report: Report, people: Mapping[str, object]) -> str:
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
