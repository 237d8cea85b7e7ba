"""The report's figures, each a function of the runs' records. Matplotlib on its Agg canvas (no display, no pyplot
state shared between reports); every figure returns PNG bytes, or None when no run logged what it shows."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crosskd.report.records import RunRecords, summarise

RUN_STYLES = ("-", "--", ":", "-.")
# Train-record keys drawn by a figure of their own; whatever else a run logs is a diagnostic (router, MoE teacher).
SCALAR_KEYS = {"kind", "step", "progress", "total", "temperature", "lr", "grad_norm", "tokens_per_second",
               "nonfinite_skipped", "overflow_skipped", "kd_position_share", "wall_seconds", "peak_memory_bytes"}
FAMILY_PREFIXES = ("loss/", "raw/", "lr/", "weight/")
# Eval-record keys of the BPB figure; the rest of an eval record is knowledge retention.
BPB_KEYS = {"kind", "step", "bpb", "perplexity"}


@dataclass
class Line:
    run: int  # index into the report's runs: its line style (or colour when a panel draws one quantity)
    key: str  # what it shows: its colour when a panel draws several quantities
    steps: list[float]
    values: list[float]
    options: dict = field(default_factory=dict)  # extra matplotlib options (markers, a constant line's style)


@dataclass
class Panel:
    title: str
    lines: list[Line]
    ylabel: str = ""


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _keys(records: list[dict], prefix: str) -> list[str]:
    return sorted({key for record in records for key in record if key.startswith(prefix)})


def _key_panel(title: str, runs: list[RunRecords], keys_of, ylabel: str = "", records_of=lambda run: run.train,
               label_of=lambda key: key) -> Panel:
    """One panel, a line per run and key; `keys_of(run)` picks which of a run's keys it draws."""
    lines = [Line(index, label_of(key), *_series(records_of(run), key))
             for index, run in enumerate(runs) for key in keys_of(run)]
    return Panel(title, [line for line in lines if line.steps], ylabel)


def _render(panels: list[Panel], names: list[str], columns: int = 2) -> bytes | None:
    panels = [panel for panel in panels if panel.lines]
    if not panels:
        return None
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.4 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    several_runs = len(names) > 1
    for ax, panel in zip(axes, panels):
        keys = sorted({line.key for line in panel.lines})
        for line in panel.lines:
            by_key = len(keys) > 1
            colour = f"C{keys.index(line.key) % 10}" if by_key else f"C{line.run % 10}"
            style = RUN_STYLES[line.run % len(RUN_STYLES)] if by_key and several_runs else "-"
            label = (f"{names[line.run]}: {line.key}" if by_key else names[line.run]) if several_runs else line.key
            ax.plot(line.steps, line.values, **{"color": colour, "linestyle": style, "label": label,
                                                **line.options})
        ax.set_title(panel.title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _png(figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def loss_components(runs: list[RunRecords], names: list[str]) -> bytes | None:
    """Per run: the weighted components stacked, their sum and the logged total (they must coincide)."""
    figure = Figure(figsize=(6.4 * len(runs), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(runs), squeeze=False, sharey=True).ravel()
    every_term = sorted({key for run in runs for key in _keys(run.train, "loss/")})  # a term's colour on every panel
    for ax, run, name in zip(axes, runs, names):
        keys = _keys(run.train, "loss/")
        records = [r for r in run.train if all(math.isfinite(r.get(k, math.nan)) for k in [*keys, "total"])]
        steps = [r["step"] for r in records]
        ax.stackplot(steps, *[[r[k] for r in records] for k in keys], labels=[k.removeprefix("loss/") for k in keys],
                     colors=[f"C{every_term.index(k) % 10}" for k in keys], alpha=0.75)
        ax.plot(steps, [r["total"] for r in records], color="black", linewidth=2, label="logged total")
        ax.plot(steps, [sum(r[k] for k in keys) for r in records], color="red", linestyle="--", linewidth=1,
                label="sum of components")
        ax.set_title(f"weighted loss components: {name}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _png(figure)


def raw_terms(runs: list[RunRecords], names: list[str]) -> bytes | None:
    terms = sorted({key for run in runs for key in _keys(run.train, "raw/")})
    return _render([_key_panel(term.removeprefix("raw/"), runs, lambda run, term=term: [term], "before its weight",
                               label_of=lambda key: key.removeprefix("raw/"))
                    for term in terms], names)


def held_out_bpb(runs: list[RunRecords], names: list[str]) -> bytes | None:
    """Every evaluation of the student (step 0 is the untouched student), with the untouched student's and the
    teacher's BPB as constant lines."""
    lines = []
    for index, run in enumerate(runs):
        summary = summarise(run)
        steps, values = _series(run.evals, "bpb")
        if summary.before_bpb is not None:
            steps, values = [0, *steps], [summary.before_bpb, *values]
        colour = f"C{index % 10}"  # one colour per run; the line style tells student, untouched and teacher apart
        lines.append(Line(index, "student", steps, values, {"marker": "o", "color": colour}))
        span = [0, run.train[-1]["step"]]
        for key, value, style in (("untouched student", summary.before_bpb, "--"),
                                  ("teacher", summary.teacher_bpb, ":")):
            if value is not None:
                lines.append(Line(index, key, span, [value, value], {"linestyle": style, "color": colour}))
    return _render([Panel("held-out bits per byte", [line for line in lines if line.steps], "BPB")], names,
                   columns=1)


def retention(runs: list[RunRecords], names: list[str]) -> bytes | None:
    """What else each evaluation measured: top-1 agreement, KL(teacher || student), the loss terms held out."""
    keys = sorted({key for run in runs for record in run.evals for key in record if key not in BPB_KEYS})
    return _render([_key_panel(key, runs, lambda run, key=key: [key], records_of=lambda run: run.evals)
                    for key in keys], names, columns=3)


def schedule(runs: list[RunRecords], names: list[str]) -> bytes | None:
    return _render([
        _key_panel("KD temperature", runs, lambda run: ["temperature"], "τ"),
        _key_panel("loss weights (curriculum)", runs, _weights_in_use, "weight",
                   label_of=lambda key: key.removeprefix("weight/")),
        _key_panel("learning rate per parameter group", runs, lambda run: _keys(run.train, "lr/"), "lr",
                   label_of=lambda key: key.removeprefix("lr/")),
    ], names, columns=3)


def _weights_in_use(run: RunRecords) -> list[str]:
    """The weights of the terms a run has: a weight that stays 0 belongs to a term that is switched off."""
    return [key for key in _keys(run.train, "weight/") if any(record.get(key) for record in run.train)]


def throughput_and_health(runs: list[RunRecords], names: list[str]) -> bytes | None:
    return _render([
        _key_panel("throughput", runs, lambda run: ["tokens_per_second"], "tokens / s"),
        _key_panel("skipped steps (cumulative)", runs, lambda run: ["nonfinite_skipped", "overflow_skipped"],
                   "steps"),
        _key_panel("share of student positions with a KD target", runs, lambda run: ["kd_position_share"],
                   "share"),
        _key_panel("gradient norm (before clipping)", runs, lambda run: ["grad_norm"]),
    ], names)


def diagnostics(runs: list[RunRecords], names: list[str]) -> bytes | None:
    """Router health (expert shares, gate entropy, per-group error) and an MoE teacher's expert-usage entropy: one
    panel per family of keys (the part before '/')."""
    families = sorted({key.split("/")[0] for run in runs for key in _diagnostic_keys(run)})

    def members(family: str):
        return lambda run: [key for key in _diagnostic_keys(run) if key.split("/")[0] == family]

    return _render([_key_panel(family, runs, members(family), label_of=lambda key: key.split("/", 1)[-1])
                    for family in families], names)


def _diagnostic_keys(run: RunRecords) -> list[str]:
    return sorted({key for record in run.train for key in record
                   if key not in SCALAR_KEYS and not key.startswith(FAMILY_PREFIXES)})
