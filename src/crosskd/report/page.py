"""`crosskd report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page (figures embedded as PNG) of what one or
several runs did, from their own records. Several runs are overlaid on every figure (LM-only against KD)."""

from __future__ import annotations

import base64
import html
import sys
from pathlib import Path

from crosskd.config import flatten_config
from crosskd.report import plots
from crosskd.report.records import NotARunFolder, RunRecords, read_run, summarise, summary_rows

REPORT_FOLDER = "report"
PAGE_NAME = "index.html"
# (figure, heading, what to look for)
SECTIONS = (
    (plots.loss_components, "Loss components",
     "The weighted terms stacked; their sum must coincide with the logged total (a gap is a logging bug)."),
    (plots.raw_terms, "Raw terms",
     "Each term normalised by its positions, before its weight (KD with its τ² factor): an unnormalised or "
     "exploding term shows here first."),
    (plots.held_out_bpb, "Held-out bits per byte",
     "The student at each evaluation (step 0: untouched), with the untouched student and the teacher as lines."),
    (plots.retention, "Knowledge retention (held out)",
     "Top-1 agreement and KL(teacher ‖ student) at the KD positions, and every loss term on held-out windows."),
    (plots.schedule, "Schedule",
     "Temperature, the curriculum's loss weights and the learning rate of each parameter group."),
    (plots.throughput_and_health, "Throughput and step health",
     "Tokens per second, steps skipped for non-finite values or fp16 overflow, the share of student positions "
     "that have a KD target, the gradient norm."),
    (plots.diagnostics, "Router and expert diagnostics",
     "The router's expert shares, gate entropy and per-group error, and an MoE teacher's expert-usage entropy."),
)


def report_path(run_dir: str | Path) -> Path:
    """Where `write_report` puts the page of a run by default."""
    return Path(run_dir) / REPORT_FOLDER / PAGE_NAME


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write the page for `run_dirs` into `out_dir` (default: the first run's report/ folder); returns its path."""
    runs = [read_run(run_dir) for run_dir in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else runs[0].run_dir / REPORT_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PAGE_NAME
    path.write_text(render_page(runs))
    return path


def run_names(runs: list[RunRecords]) -> list[str]:
    """Folder names, or whole paths where two runs share a folder name."""
    names = [run.name for run in runs]
    return [str(run.run_dir) if names.count(run.name) > 1 else run.name for run in runs]


def render_page(runs: list[RunRecords]) -> str:
    names = run_names(runs)
    figures = []
    for figure, heading, caption in SECTIONS:
        png = figure(runs, names)
        if png is not None:
            encoded = base64.b64encode(png).decode("ascii")
            figures.append(f"<section><h2>{html.escape(heading)}</h2><p>{html.escape(caption)}</p>"
                           f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{encoded}"></section>')
    title = "crosskd report: " + ", ".join(names)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
td.command {{ font-family: monospace; white-space: pre-wrap; max-width: 40em; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
{_summary_table(runs, names)}
{_settings_table(runs, names)}
{"".join(figures)}
</body>
</html>
"""


def _summary_table(runs: list[RunRecords], names: list[str]) -> str:
    per_run = [summary_rows(summarise(run)) for run in runs]
    header = "<tr><th></th>" + "".join(f"<th>{html.escape(name)}</th>" for name in names) + "</tr>"
    rows = []
    for position, (what, _) in enumerate(per_run[0]):
        cell_class = ' class="command"' if what == "command" else ""
        cells = "".join(f"<td{cell_class}>{html.escape(rows_of_run[position][1])}</td>" for rows_of_run in per_run)
        rows.append(f"<tr><th>{html.escape(what)}</th>{cells}</tr>")
    folders = "".join(f"<td>{html.escape(str(run.run_dir))}</td>" for run in runs)
    return f"<table>{header}<tr><th>run folder</th>{folders}</tr>{''.join(rows)}</table>"


def _settings_table(runs: list[RunRecords], names: list[str]) -> str:
    """The models, and the settings in which the runs differ (all of them would bury the one that matters)."""
    flat = [flatten_config(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    shown = [key for key in keys if key.startswith("models.") or len({repr(f.get(key)) for f in flat}) > 1]
    if len(runs) > 1:
        shown = [key for key in shown if key != "output.run_dir"]
    header = "<tr><th>setting</th>" + "".join(f"<th>{html.escape(name)}</th>" for name in names) + "</tr>"
    rows = "".join(f"<tr><th>{html.escape(key)}</th>"
                   + "".join(f"<td>{html.escape(str(f.get(key, '(absent)')))}</td>" for f in flat) + "</tr>"
                   for key in shown)
    intro = "Settings that differ between the runs" if len(runs) > 1 else "Models"
    return f"<h2>{intro}</h2><p>The full resolved config is each run's config.yaml.</p><table>{header}{rows}</table>"


def cli_report(args) -> int:
    try:
        path = write_report(args.run_dirs, args.out)
    except NotARunFolder as error:
        print(f"crosskd report: {error}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
