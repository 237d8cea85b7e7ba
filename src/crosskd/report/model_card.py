"""The exported student's model card (README.md, the Hugging Face convention): where it came from, how it was made
and how good it is, from the run folder's own records."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from crosskd.report.records import read_run, summarise, summary_rows


def write_model_card(student_dir: Path, run_dir: Path) -> Path:
    """Write the card into the exported student folder, atomically (a reader never sees half a card)."""
    path = Path(student_dir) / "README.md"
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(model_card(run_dir))
    os.replace(partial, path)
    return path


def model_card(run_dir: Path) -> str:
    run = read_run(run_dir)
    models, data, objective = (run.config.get(section, {}) for section in ("models", "data", "objective"))
    student, teacher = models.get("student"), models.get("teacher")
    metadata = {"library_name": "transformers", "tags": ["crosskd", "knowledge-distillation", "cross-tokenizer"]}
    if _is_hub_id(student):
        metadata["base_model"] = student  # the Hub links the card to its base model; a local path would not resolve
    summary = summarise(run)
    table = "\n".join(f"| {what} | {value} |" for what, value in summary_rows(summary) if what != "command")
    commands = "\n".join(summary.commands) or "(not recorded: the run predates command logging)"
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# Student distilled from {teacher}

A causal language model distilled by crosskd across tokenizers: the student keeps its own
tokenizer and learns from a teacher whose tokenizer differs.

- **Base student:** `{student}`
- **Teacher:** `{teacher}`
- **Data:** `{data.get('source')}`, {_data_shape(data)}
- **Method:** `{objective.get('strategy')}` vocabulary transfer, divergence `{objective.get('divergence')}`, KD weight
  {objective.get('kd_alpha')} on the teacher's top-{objective.get('kd_top_k')}, LM weight {objective.get('lm_alpha')}

## Held-out bits per byte (lower is better)

The exported weights are the best evaluated student by held-out BPB, not necessarily the last.

| | |
| --- | --- |
{table}

## The command that made it

```
{commands}
```

## Settings

The resolved configuration of the run (`config.yaml` in its run folder; `crosskd train config.yaml` repeats it):

```yaml
{yaml.safe_dump(run.config, sort_keys=False).strip()}
```
"""


def _data_shape(data: dict) -> str:
    """How the run read its data: windows of text, or conversations (whose BPB is on the responses only)."""
    if data.get("format", "text") == "text":
        return f"windows of {data.get('window_tokens')} student tokens"
    return (f"`{data['format']}` conversations of at most {data.get('window_tokens')} student tokens, each model "
            "rendering them with its own chat template; loss and held-out BPB on the responses only")


def _is_hub_id(spec: str | None) -> bool:
    """`owner/name` on the Hugging Face Hub, as opposed to a local folder, a file or a `tiny:`/`reference:` model."""
    return bool(spec) and ":" not in spec and spec.count("/") == 1 and not Path(spec).exists()
