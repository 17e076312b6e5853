"""Markdown reports with PNG plots: what ``bench --report`` and ``demo`` write.

    write_report("bench/report.md", results)              # results: list[bench.BenchResult]
    write_report("demo-report/report.md", results, extra_tables=[
        Section("Accuracy against the FP32 reference", rows=[{"engine": "int8", "top-1": 0.91}]),
    ])

writes ``report.md`` and, beside it, ``report-throughput.png`` (img/s against batch size, one
line per engine) and ``report-latency.png`` (one panel per batch size, one bar per engine: p50,
p90 and p99 stacked in fading shades). Every file is written to a temporary name and renamed, so
a failed or interrupted write leaves no half-written report. Plots use matplotlib's Agg renderer
through the object API (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import atomic_path, check_writable_dir, write_text_atomic

if TYPE_CHECKING:
    from alexnet_deploy.bench import BenchResult

DEFAULT_TITLE = "alexnet-deploy benchmark"
PCT_SHADES = (("p50", 1.0), ("p90", 0.55), ("p99", 0.25))  # (percentile, bar alpha)


@dataclass
class Section:
    """An extra markdown section for a report (e.g. the demo's validation tables).

    Args:
        title: the section heading.
        rows: table rows, each a mapping (column -> value) or a sequence of values. Defaults to
            none (no table).
        columns: column headings; defaults to the keys of the mapping rows, in first-seen order.
        text: markdown shown under the heading, before the table. Defaults to "".
    """

    title: str
    rows: Sequence[Mapping[str, Any] | Sequence[Any]] = ()
    columns: Sequence[str] | None = None
    text: str = ""

    def to_markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.text:
            parts += [self.text.strip(), ""]
        if self.rows:
            parts += [markdown_table(self.rows, self.columns), ""]
        return "\n".join(parts)


def _as_section(item: Any) -> Section:
    if isinstance(item, Section):
        return item
    if isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3):
        return Section(*item)
    raise TypeError(f"extra table {item!r}: expected a Section or (title, rows[, columns])")


# ---- markdown ----

def format_value(value: Any) -> str:
    """Numbers to a readable fixed precision (3 significant digits, at most 2 decimals at 1 and
    up); None to '-'; everything else ``str``. Pipes are escaped for tables."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        a = abs(value)
        if a >= 100:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        if a == 0:
            return "0"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any] | Sequence[Any]],
                   columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; numeric columns are right-aligned."""
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise TypeError("rows that are not mappings need explicit columns")
            columns += [k for k in row if k not in columns]
    cells = [[row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
             for row in rows]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                   for r in cells if i < len(r) and r[i] is not None) and cells
               for i in range(len(columns))]
    lines = ["| " + " | ".join(format_value(c) for c in columns) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(format_value(v) for v in r) + " |" for r in cells]
    return "\n".join(lines)


def results_rows(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """One row per batch size and engine (batch sizes outer, so engines sit side by side)."""
    base = results[0]
    sizes = sorted({r.batch_size for res in results for r in res.results})
    rows = []
    for b in sizes:
        b0 = base.at(b)
        for res in results:
            r = res.at(b)
            if r is None:
                continue
            row = {"engine": res.name, "backend": res.backend, "precision": res.precision,
                   "batch": b, "img/s": r.throughput, "p50 ms": r.latency_ms.p50,
                   "p90 ms": r.latency_ms.p90, "p99 ms": r.latency_ms.p99}
            if len(results) > 1:
                row["img/s vs first"] = (f"{r.throughput / b0.throughput:.2f}x" if b0 else "-")
            rows.append(row)
    return rows


def stage_rows(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """GPU runners' H2D / compute / D2H medians and the enqueue (launch) time (empty when no
    runner reported them)."""
    rows = []
    for res in results:
        for r in res.results:
            if r.stages_ms:
                row = {"engine": res.name, "batch": r.batch_size}
                for key, label in (("h2d", "H2D p50 ms"), ("compute", "compute p50 ms"),
                                   ("d2h", "D2H p50 ms"), ("enqueue", "enqueue p50 ms")):
                    row[label] = r.stages_ms[key].p50 if key in r.stages_ms else None
                rows.append(row)
    return rows


def render_markdown(results: Sequence[BenchResult], plots: Sequence[tuple[str, str]],
                    extra: Sequence[Section], title: str, intro: str) -> str:
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro.strip(), ""]
    for section in extra:
        parts.append(section.to_markdown())
    if results:
        first = results[0]
        parts += ["## Benchmark", ""]
        if len(results) > 1:
            parts += [f"Engines were interleaved; ratios are against the first, `{first.name}`.",
                      ""]
        parts += [markdown_table(results_rows(results)), ""]
        stages = stage_rows(results)
        if stages:
            parts += ["GPU time split (CUDA events, median per call):", "",
                      markdown_table(stages), ""]
        for caption, name in plots:
            parts += [f"![{caption}]({name})", ""]
        parts += ["### How it was measured", ""]
        parts += [f"- host: {first.host}", f"- inputs: {first.inputs}",
                  f"- method: {first.method}"]
        versions = {f"{r.backend} {r.backend_version}".strip() for r in results}
        parts.append("- backends: " + ", ".join(sorted(versions)))
        parts += [f"- note ({r.name}): {n}" for r in results for n in r.notes]
        parts.append("- semantics: see docs/bench.md (latency percentiles are nearest-rank; "
                     "throughput = batch x calls / timed wall time)")
        parts.append("")
    return "\n".join(parts)


# ---- plots ----

def _label(res: BenchResult) -> str:
    return f"{res.name} ({res.backend}, {res.precision})"


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_throughput(results: Sequence[BenchResult], dest: Path) -> None:
    """Img/s against batch size (log2 axis), one line per engine."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    sizes = sorted({r.batch_size for res in results for r in res.results})
    ymax = max((r.throughput for res in results for r in res.results), default=1.0)
    labelled: dict[int, list[float]] = {}
    for res, color in zip(results, _colors(len(results))):
        pts = sorted((r.batch_size, r.throughput) for r in res.results)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2, color=color,
                label=_label(res))
        for x, y in pts:  # value labels, skipped where they would overprint another
            if all(abs(y - other) > 0.05 * ymax for other in labelled.get(x, [])):
                labelled.setdefault(x, []).append(y)
                ax.annotate(f"{y:.0f}" if y >= 100 else f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=8, color=color)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in sizes])
    if len(sizes) == 1:
        ax.set_xlim(sizes[0] / 2, sizes[0] * 2)
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
    ax.set_xlabel("batch size (images per call, log2 scale)")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title("Throughput vs batch size (higher is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, dest)


def plot_latency(results: Sequence[BenchResult], dest: Path) -> None:
    """One panel per batch size; per engine a bar to p50 with p90 and p99 stacked above it in
    fading shades of the engine's colour."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    sizes = sorted({r.batch_size for res in results for r in res.results})
    ncols = min(len(sizes), 4)
    nrows = math.ceil(len(sizes) / ncols)
    width = max(8.0, 1.0 + ncols * (1.2 + 0.5 * len(results)))
    fig = Figure(figsize=(width, 1.6 + 0.2 * max(len(results), 3) + 3.2 * nrows), dpi=120,
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = _colors(len(results))
    letters = [_letter(i) for i in range(len(results))]
    for k, b in enumerate(sizes):
        ax = axes[k // ncols][k % ncols]
        top = 0.0
        for i, (res, color) in enumerate(zip(results, colors)):
            r = res.at(b)
            if r is None:
                continue
            lo = 0.0
            for pct, alpha in PCT_SHADES:
                hi = getattr(r.latency_ms, pct)
                ax.bar(i, hi - lo, bottom=lo, width=0.7, color=color, alpha=alpha,
                       edgecolor=color, linewidth=0.8)
                lo = hi
            top = max(top, r.latency_ms.p99)
        for i, res in enumerate(results):  # p50 values: inside the bar, or above a short one
            r = res.at(b)
            if r is None:
                continue
            p50 = r.latency_ms.p50
            if p50 >= 0.12 * top:
                ax.annotate(_ms(p50), (i, p50 / 2), ha="center", va="center", fontsize=8,
                            color="white", fontweight="bold")
            else:
                ax.annotate(f"p50 {_ms(p50)}", (i, r.latency_ms.p99), textcoords="offset points",
                            xytext=(0, 3), ha="center", va="bottom", fontsize=8, color="0.15")
        ax.set_title(f"batch {b}", fontsize=10)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(letters, fontsize=9)
        ax.set_xlim(-0.6, max(len(results), 2) - 0.4)
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)
        ax.grid(True, axis="y", alpha=0.3)
        if k % ncols == 0:
            ax.set_ylabel("latency per call (ms)")
    for k in range(len(sizes), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    # legend: engines in the first column, what the shades mean in the second
    engines = [Patch(color=c, label=f"{letter}: {_label(res)}")
               for letter, res, c in zip(letters, results, colors)]
    shades = [Patch(facecolor="0.35", alpha=alpha,
                    label=f"{pct} latency" + (" (solid bar)" if pct == "p50" else ""))
              for pct, alpha in PCT_SHADES]
    rows = max(len(engines), len(shades))
    blank = Patch(visible=False, label=" ")
    handles = engines + [blank] * (rows - len(engines)) + shades + [blank] * (rows - len(shades))
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=2,
               frameon=False)
    fig.suptitle("Latency per call: p50 solid, p90 and p99 lighter above it (lower is better)",
                 fontsize=11)
    _save(fig, dest)


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else str(i + 1)


def _save(fig: Any, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


# ---- the report ----

def plot_paths(path_md: Path) -> tuple[Path, Path]:
    """The throughput and latency plots :func:`write_report` puts beside ``path_md``."""
    return (path_md.with_name(f"{path_md.stem}-throughput.png"),
            path_md.with_name(f"{path_md.stem}-latency.png"))


def write_report(path_md: Path | str, results: Sequence[BenchResult] = (),
                 extra_tables: Sequence[Section | tuple] = (), *, title: str = DEFAULT_TITLE,
                 intro: str = "") -> list[Path]:
    """Write the markdown report and its plots; return the paths written (markdown first).

    Args:
        path_md: the ``.md`` file to write; plots go beside it as ``STEM-throughput.png`` and
            ``STEM-latency.png``.
        results: :class:`~alexnet_deploy.bench.BenchResult` list, the first being the baseline
            of the ratios. Defaults to none (a report of ``extra_tables`` only, no plots).
        extra_tables: extra sections (:class:`Section` or ``(title, rows[, columns])``), placed
            after the title and ``intro`` and before the benchmark section. Defaults to none.
        title: the report's heading. Defaults to "alexnet-deploy benchmark".
        intro: markdown under the heading. Defaults to "".

    Raises:
        UserError: the report's folder does not exist or is not writable, or a write fails.
    """
    path_md = Path(path_md)
    if path_md.is_dir():
        raise UserError(f"report path {path_md} is a folder: give a file name such as "
                        f"{path_md / 'report.md'}")
    try:
        check_writable_dir(path_md)
    except UserError as e:
        raise UserError(f"cannot write report {path_md}: {e}") from None
    results = list(results)
    extra = [_as_section(s) for s in extra_tables]
    plots = []
    written = []
    try:
        if results:
            throughput, latency = plot_paths(path_md)
            plot_throughput(results, throughput)
            plot_latency(results, latency)
            plots = [("Throughput vs batch size", throughput.name),
                     ("Latency percentiles per batch size", latency.name)]
            written += [throughput, latency]
        write_text_atomic(path_md, render_markdown(results, plots, extra, title, intro))
    except OSError as e:
        raise UserError(f"cannot write report {path_md}: {e.strerror or e}") from e
    return [path_md, *written]
