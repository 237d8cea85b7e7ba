"""Regenerate the schedule table in docs/SCHEDULES.md and the plot docs/schedules.png from crosskd.schedules.

    python bench/schedule_table.py

Every alpha is set to 1, so each column reads as the fraction of that term's alpha reached at progress p (the KD
column is the warm-up fraction of kd_alpha); the temperature column is absolute. Ranges are the defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from crosskd.schedules import CURRICULUM_TERMS, ScheduleSettings, loss_weights, temperature  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
TABLE_START, TABLE_END = "<!-- schedule-table:start -->", "<!-- schedule-table:end -->"
TABLE_PROGRESS = (0.0, 0.05, 0.1, 0.2, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 1.0)
TERMS = ("kd", *CURRICULUM_TERMS)


def unit_alpha_settings() -> ScheduleSettings:
    alphas = {f.name: 1.0 for f in dataclasses.fields(ScheduleSettings) if f.name.endswith("_alpha")}
    # An anneal, to show the temperature function's shape (a run's config defaults to τ = 1 throughout).
    return ScheduleSettings(**alphas, temperature_start=2.0, temperature_end=1.5)


def markdown_table(settings: ScheduleSettings) -> str:
    header = "| p | " + " | ".join(TERMS) + " | temperature |"
    rule = "|" + "---|" * (len(TERMS) + 2)
    rows = []
    for p in TABLE_PROGRESS:
        weights = loss_weights(p, settings)
        cells = [f"{weights[term]:.3f}" for term in TERMS] + [f"{temperature(p, settings):.3f}"]
        rows.append(f"| {p:.2f} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def replace_between_markers(text: str, replacement: str) -> str:
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    return f"{before}{TABLE_START}\n{replacement}\n{TABLE_END}{after}"


def plot(settings: ScheduleSettings, path: Path) -> None:
    progress = [i / 400 for i in range(401)]
    figure, (weights_axis, temperature_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for term in TERMS:
        # Feature and attention share a ramp by default: dashed so both stay visible.
        style = "--" if term == "attention" else "-"
        weights_axis.plot(progress, [loss_weights(p, settings)[term] for p in progress], style, label=term)
    weights_axis.set_ylabel("fraction of alpha")
    weights_axis.legend(loc="lower right")
    weights_axis.set_title("crosskd default schedules")
    temperature_axis.plot(progress, [temperature(p, settings) for p in progress], color="black")
    temperature_axis.set_ylabel("KD temperature")
    temperature_axis.set_xlabel("progress p = optimizer step / total optimizer steps")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    settings = unit_alpha_settings()
    table = markdown_table(settings)
    print(table)
    doc = DOCS / "SCHEDULES.md"
    doc.write_text(replace_between_markers(doc.read_text(), table))
    plot(settings, DOCS / "schedules.png")
    print(f"wrote {doc} and {DOCS / 'schedules.png'}")


if __name__ == "__main__":
    main()
