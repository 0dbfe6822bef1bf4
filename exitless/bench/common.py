"""Shared benchmark plumbing: guest JSON results, CPU accounting, interleaved rounds, tables and JSON output.

Every comparison row of a benchmark is measured in several *rounds*, interleaved
(row A, row B, …, row A, row B, …) so that a slow drift of the machine (another
process on the other core, the host moving our vCPUs) lands on every row alike;
a row reports the median of its rounds, the per-round values and their spread
(min–max), and the human table marks which rows are within the best row's spread.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.table import Table

from ..errors import ExitlessError

T = TypeVar("T")

#: ``vs_best`` values: the best median of its group, within the best row's spread, outside it
BEST, TIE, BEHIND = "best", "within_best_spread", "outside_best_spread"
#: Above this ``other_load_pct`` in some round, the table carries a warning.
BUSY_MACHINE_PCT = 10.0
_MARK = {BEST: " ★", TIE: " ≈", BEHIND: ""}


class BenchError(ExitlessError, RuntimeError):
    pass


def guest_result(console_bytes: bytes, app: str) -> dict:
    """The one JSON line the guest kit prints, starting with {"app": ...}."""
    for line in reversed(console_bytes.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith('{"app":'):
            result = json.loads(line)
            if result.get("app") != app:
                raise BenchError(f"expected a {app} result, got {result.get('app')}")
            if "error" in result and set(result) <= {"app", "rw", "error"}:
                # the guest kit refused its arguments (a count it cannot take...): nothing was measured
                raise BenchError(f"the guest kit refused the {app} run: {result['error']}")
            return result
    tail = console_bytes.decode(errors="replace")[-800:]
    raise BenchError(f"the guest printed no {app} result; its console ended with:\n{tail}")


def process_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


#: A sample may carry the CPU seconds its own long-lived helpers (a vhost-user back-end process, not
#: yet reaped) spent meanwhile, so that :class:`OtherLoad` does not count them as another's load.
HELPER_CPU_KEY = "_helper_cpu_s"


def _machine_busy_seconds() -> tuple[float, int]:
    """(CPU seconds every CPU spent busy since boot, number of CPUs) from /proc/stat."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    fields = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(fields) - fields[3] - fields[4]
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), ncpu


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


class OtherLoad:
    """How busy the machine was with *other* work while a sample ran, in % of all its CPUs:
    every CPU's busy time (/proc/stat, 10 ms ticks) minus this process's, its reaped
    children's and its helpers' — the condition that moves the figures between rounds."""

    def __init__(self):
        self.busy0, self.ncpu = _machine_busy_seconds()
        self.own0, self.t0 = _own_cpu_seconds(), time.monotonic()

    def percent(self, helper_cpu_s: float = 0.0) -> float:
        busy, _ = _machine_busy_seconds()
        wall = max(time.monotonic() - self.t0, 1e-9)
        other = (busy - self.busy0) - (_own_cpu_seconds() - self.own0) - helper_cpu_s
        return max(0.0, min(100.0, 100.0 * other / (wall * self.ncpu)))


# --------------------------------------------------------------------------- rounds


Progress = Callable[[str, int, int], None]
"""``progress(label, step, steps)``: called before each of ``steps`` steps (``step`` counts from 0)."""


#: Why a differential per-operation figure is null (the row's ``exits_note``).
NEGATIVE_DIFFERENCE = "not measurable: the short run counted more than the long one (noise beat the signal)"


def differential_per_op(full: float | None, base: float | None, ops: int) -> tuple[float | None, str | None]:
    """``(full - base) / ops``, the per-operation cost measured as a long run minus a short one.

    Returns (value, None), or (None, reason) when the value is unknown (a counter missing, no
    operations) or the difference is negative: a negative count per operation is never published.
    """
    if full is None or base is None:
        return None, None
    if ops <= 0:
        return None, "not measurable: the short run did as many operations as the long one"
    if full < base:
        return None, NEGATIVE_DIFFERENCE
    return (full - base) / ops, None


def no_progress(label: str, step: int, steps: int) -> None:
    pass


def interleave(rows: Sequence[T], rounds: int, sample: Callable[[T, int], dict],
               progress: Progress = no_progress, label: Callable[[T], str] = str) -> list[list[dict]]:
    """Measure every row ``rounds`` times, round-robin: all rows of round 1, then all of round 2, ….

    ``sample(row, round_index)`` returns one measurement (a dict); the result holds,
    for each row in order, its list of measurements in round order, each with
    ``other_load_pct`` (:class:`OtherLoad`) added.
    """
    if rounds < 1:
        raise BenchError(f"--rounds {rounds}: at least 1")
    samples: list[list[dict]] = [[] for _ in rows]
    for r in range(rounds):
        for i, row in enumerate(rows):
            progress(f"round {r + 1}/{rounds}: {label(row)}", r * len(rows) + i, rounds * len(rows))
            load = OtherLoad()
            s = sample(row, r)
            s["other_load_pct"] = load.percent(s.pop(HELPER_CPU_KEY, 0.0))
            samples[i].append(s)
    return samples


def aggregate(samples: Sequence[dict], metrics: Iterable[str], summed: Iterable[str] = ("errors",)) -> dict:
    """One row from its rounds: the metrics (and ``other_load_pct`` when the samples have it) are
    medians (over the rounds where they are not None), with ``per_round`` (every round's value,
    None included) and ``spread`` ({"min", "max"}); ``summed`` keys are totals over the rounds
    (errors are never a median); ``exits_note`` says how many rounds had no differential figure and
    why; other keys come from the last round."""
    row = dict(samples[-1])
    row["rounds"] = len(samples)
    row["per_round"], row["spread"] = {}, {}
    metrics = list(metrics) + (["other_load_pct"] if any("other_load_pct" in s for s in samples) else [])
    for key in metrics:
        values = [s.get(key) for s in samples]
        known = [v for v in values if v is not None]
        row[key] = statistics.median(known) if known else None
        row["per_round"][key] = values
        row["spread"][key] = {"min": min(known), "max": max(known)} if known else None
    for key in summed:
        if any(key in s for s in samples):
            row[key] = sum(s.get(key) or 0 for s in samples)
    # a round's null differential figure says why, for the row as a whole
    notes = [s["exits_note"] for s in samples if s.get("exits_note")]
    row.pop("exits_note", None)
    if notes:
        row["exits_note"] = f"{len(notes)} of {len(samples)} rounds: {notes[0]}"
    return row


def mark_best(rows: Sequence[dict], metric: str, *, higher_is_better: bool,
              group: Callable[[dict], object] = lambda r: None) -> None:
    """Set ``row["vs_best"][metric]`` for each row of each ``group``: BEST for the best median,
    TIE when the row's min–max overlaps the best row's min–max (the rounds cannot tell them apart),
    BEHIND otherwise.  Rows without the metric are left out."""
    groups: dict[object, list[dict]] = {}
    for r in rows:
        if r.get(metric) is not None and r.get("spread", {}).get(metric):
            groups.setdefault(group(r), []).append(r)
    for members in groups.values():
        best = (max if higher_is_better else min)(members, key=lambda r: r[metric])
        lo, hi = best["spread"][metric]["min"], best["spread"][metric]["max"]
        for r in members:
            s = r["spread"][metric]
            verdict = BEST if r is best else TIE if s["min"] <= hi and s["max"] >= lo else BEHIND
            r.setdefault("vs_best", {})[metric] = verdict


def ratio_over_rounds(num: dict | None, den: dict | None, metric: str) -> dict | None:
    """``num[metric] / den[metric]`` round by round (rows measured side by side in the same round),
    as {"median", "min", "max", "per_round"}; None if either row is missing."""
    if not num or not den:
        return None
    pairs = zip(num["per_round"][metric], den["per_round"][metric])
    ratios = [a / b for a, b in pairs if a is not None and b]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_round": ratios}


def ratio_notes(ratios: dict[str, dict]) -> list[str]:
    """One line per :func:`ratio_over_rounds` result (``rows``, if present, names the two rows)."""
    return [f"{name}: {r['median']:.3f} (min–max over the rounds {r['min']:.3f}–{r['max']:.3f})"
            + (f": {r['rows']}" if "rows" in r else "") for name, r in ratios.items()]


# --------------------------------------------------------------------------- output


def plot_panels(rows: Sequence[dict], path: str, panels: Sequence[tuple[str, str, str]],
                label: Callable[[dict], str], colors: dict[str, str], ncols: int | None = None) -> None:
    """One bar chart per ``(test, metric, title)`` of ``panels``, side by side (``ncols`` to a line; default
    all on one), written as a PNG to ``path``.

    Bars are the rows of that test (``label(row)`` under each), coloured by ``colors[row["vmm"]]``, with
    the rounds' min–max as error bars where a row has a ``spread`` for the metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # a panel whose test was not run (``--tests`` subset) is left out, not drawn empty
    panels = [p for p in panels if any(r["test"] == p[0] and r.get(p[1]) is not None for r in rows)] or panels[:1]
    ncols = min(ncols or len(panels), len(panels))
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 4 * nrows), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (test, key, title) in zip(axes, panels):
        sel = [r for r in rows if r["test"] == test and r.get(key) is not None]
        spans = [r.get("spread", {}).get(key) for r in sel]
        yerr = None
        if sel and all(spans):
            yerr = [[r[key] - sp["min"] for r, sp in zip(sel, spans)], [sp["max"] - r[key] for r, sp in zip(sel, spans)]]
        ax.bar([label(r) for r in sel], [r[key] for r in sel], yerr=yerr, capsize=2,
               color=[colors.get(r["vmm"], "tab:gray") for r in sel])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    axes[0].legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Report:
    """Where a bench command writes.

    ``json_dest``: None (no JSON), ``"-"`` (stdout carries only the JSON; tables,
    notes and progress go to stderr), or a file path.  Progress is shown on stderr
    with rich when stderr is a terminal, and not at all otherwise.
    """

    def __init__(self, json_dest: str | None):
        self.json_dest = json_dest
        human = sys.stderr if json_dest == "-" else sys.stdout
        self.console = Console(file=human, width=max(200, Console(file=human).width))
        self._err = Console(stderr=True)

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def table(self, title: str, rows: list[dict], columns: list[tuple[str, str]], *,
              spread: Iterable[str] = ()) -> None:
        """``columns``: (key, header); keys in ``spread`` show "median (min–max)" and the vs_best mark."""
        spread = set(spread)
        table = Table(title=title)
        for _, header in columns:
            table.add_column(header, justify="right")
        for row in rows:
            table.add_row(*(_cell(row, key) if key in spread else _fmt(row.get(key)) for key, _ in columns))
        self.console.print(table)

    def ties_note(self, rounds: int, rows: Sequence[dict] = (), *, polling: bool = True) -> None:
        """Explain the marks; warn when other work loaded the machine during some round (``polling``:
        some rows poll, and share their cores with that load)."""
        if rounds > 1:
            self.note(f"median (min–max) of {rounds} interleaved rounds; ★ best of its test, ≈ within the best "
                      "row's min–max (the rounds cannot tell the two apart)")
        busiest = max((v for r in rows for v in (r.get("per_round") or {}).get("other_load_pct") or []
                       if v is not None), default=0.0)
        if busiest > BUSY_MACHINE_PCT:
            self.note(f"warning: other processes kept up to {busiest:.0f}% of the machine busy during some rounds "
                      "(column 'other load %'): " +
                      ("rows where both sides poll share their cores with them, and their figures are not those "
                       "of a quiet machine" if polling else "the figures are not those of a quiet machine"))

    def json(self, rows: list[dict]) -> None:
        if self.json_dest is None:
            return
        text = json.dumps(rows, indent=2)
        if self.json_dest == "-":
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        else:
            Path(self.json_dest).write_text(text + "\n")

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        """A :data:`Progress` callable: a rich bar on stderr if it is a terminal, else silence."""
        if not self._err.is_terminal:
            yield no_progress
            return
        from rich import progress as rp

        with rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                         rp.TimeElapsedColumn(), console=self._err, transient=True) as bar:
            task = bar.add_task("", total=None)

            def step(label: str, done: int, steps: int) -> None:
                bar.update(task, description=label, completed=done, total=steps)

            yield step


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _cell(row: dict, key: str) -> str:
    text = _fmt(row.get(key))
    s = (row.get("spread") or {}).get(key)
    if s and row.get("rounds", 1) > 1:
        text += f" ({_fmt(s['min'])}–{_fmt(s['max'])})"
    return text + _MARK.get((row.get("vs_best") or {}).get(key), "")
