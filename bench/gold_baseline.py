"""Method B of the quality benchmark: TRL's experimental GOLD trainer (trl 1.16) with its ULD loss, off-policy.

Same budget as bench/quality.py: the protocol's 240 windows (`protocol_train_windows`), 4 per optimizer step in
protocol order, 60 steps, AdamW lr 2e-5 constant after 6 warm-up steps, clipping 1.0, seed 0, fp32 on CPU; then
held-out BPB with crosskd's `bits_per_byte`. Writes bench/results/quality/gold.json (the summary of quality.py reads it).

How the windows reach GOLD (it was built for prompt/completion chat data):
- Each window's 256 student ids go in as they are (a pre-tokenised dataset, `skip_prepare_dataset`): GOLD's collator
  needs at least one prompt token to exist, so token 0 is the prompt and tokens 1..255 the completion. The student is
  therefore trained to predict tokens 1..255, the same targets as crosskd's LM loss on a 256-token window.
- The teacher gets text: GOLD re-tokenises `original_prompt_text` / `original_completion_text` (the student ids
  decoded without cleaning, separators included as `<|endoftext|>`, which Qwen's tokenizer reads as its own separator)
  with the teacher tokenizer and appends the teacher's eos, which its loss skips.
- Student byte offsets (completion-relative) are computed the way GOLD does for its own id-sourced (on-policy)
  batches: cumulative `piece_byte_len` of each token. No eos is appended on the student side, so
  `uld_skip_student_eos=False` (otherwise the window's last token would be dropped from the loss).
- GOLD's sampler shuffles; `ProtocolOrderGOLDTrainer` keeps its RepeatSampler but without shuffling, so step k reads
  windows 4k..4k+3 as every crosskd method does.
- Loss: ULD with cross-entropy weight 1 and distillation weight 1 (the ULD paper's CE + ULD recipe, and crosskd's
  lm_alpha = kd_alpha = 1); everything else GOLD's defaults (extended ULD, 'observed' merge, temperatures 1).

    python bench/gold_baseline.py                        # the full run (about an hour here)
    python bench/gold_baseline.py --steps 2 --output runs/bench-quality/gold-2steps.json   # does it train?
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach the hub
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from transformers import TrainerCallback

from crosskd.data.stdlib import heldout_text
from crosskd.data.windows import protocol_train_windows, window_ids_sha256
from crosskd.evaluate import bits_per_byte
from crosskd.models.loading import load_model, load_tokenizer
from quality import (
    BASE_CONFIG,
    GOLD,
    LM_ONLY,
    PROTOCOL_STEPS,
    REPO,
    machine,
    measure_floor,
    peak_rss_mib,
    protocol_config,
    result_path,
)
from trl.experimental.gold import GOLDConfig, GOLDTrainer
from trl.experimental.utils import piece_byte_len
from trl.trainer.utils import RepeatSampler

WINDOWS_PER_STEP = 4
WINDOW_TOKENS = 256
PROMPT_TOKENS = 1  # GOLD's collator refuses an example without prompt tokens


class ProtocolOrderGOLDTrainer(GOLDTrainer):
    """GOLD with its own sampler minus the shuffle: the protocol fixes the window order."""

    def _get_train_sampler(self, dataset=None):
        return RepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size * self.accelerator.num_processes,
            repeat_count=self.args.gradient_accumulation_steps,
            shuffle=False,
        )


class StepRecorder(TrainerCallback):
    """Wall time of each optimizer step and the logged loss / gradient norm."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.logs: list[dict] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append({"step": state.global_step, **logs})


def window_examples(windows, student_tokenizer) -> tuple[list[dict], int]:
    """GOLD examples from protocol windows, and how many windows' decoded text disagrees with their piece bytes
    (a window cut inside a multi-byte character decodes to U+FFFD; the byte offsets then drift for that window)."""
    examples, drifting = [], 0
    for window in windows:
        ids = [int(token) for token in window.student_ids]
        pieces = student_tokenizer.convert_ids_to_tokens(ids[PROMPT_TOKENS:])
        offsets, cumulative = [], 0
        for piece in pieces:
            length = piece_byte_len(piece)
            offsets.append((cumulative, cumulative + length))
            cumulative += length

        def decode(token_ids):
            return student_tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        completion_text = decode(ids[PROMPT_TOKENS:])
        drifting += len(completion_text.encode("utf-8")) != cumulative
        examples.append({
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "completion_mask": [0] * PROMPT_TOKENS + [1] * (len(ids) - PROMPT_TOKENS),
            "byte_offsets": [(0, 0)] * PROMPT_TOKENS + offsets,
            "original_prompt_text": decode(ids[:PROMPT_TOKENS]),
            "original_completion_text": completion_text,
        })
    return examples, drifting


def gold_arguments(steps: int, output_dir: Path, teacher_dir: str) -> GOLDConfig:
    return GOLDConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=WINDOWS_PER_STEP,
        gradient_accumulation_steps=1,
        learning_rate=2e-5,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=6,
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        seed=0,
        data_seed=0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; crosskd does not checkpoint the student
        max_length=WINDOW_TOKENS,
        lmbda=0.0,  # off-policy: the dataset's windows only, no student generations
        use_uld_loss=True,
        uld_crossentropy_weight=1.0,
        uld_distillation_weight=1.0,
        uld_skip_student_eos=False,
        teacher_tokenizer_name_or_path=teacher_dir,
        dataset_kwargs={"skip_prepare_dataset": True},
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )


def run(steps: int) -> dict:
    config = protocol_config(LM_ONLY, steps)  # only models and data settings are read from it
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    host = machine()
    windows = protocol_train_windows(load_tokenizer(config.models.student, "student"),
                                     load_tokenizer(config.models.teacher, "teacher"),
                                     count=steps * WINDOWS_PER_STEP, window_tokens=WINDOW_TOKENS)
    # The floor loads and frees its own pair first, so the peak RSS counts one student and one teacher, not two.
    floor = measure_floor(config, windows)
    student = load_model(config.models.student, "student")
    teacher = load_model(config.models.teacher, "teacher", dtype="float32")
    examples, drifting = window_examples(windows, student.tokenizer)
    text = heldout_text()
    bpb_before = bits_per_byte(student.model, student.tokenizer, text).bits_per_byte

    start_weights = [p.detach().clone() for p in student.model.parameters()]
    recorder = StepRecorder()
    teacher_dir = teacher.model.config._name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GOLD warns about its experimental status and defaults
        trainer = ProtocolOrderGOLDTrainer(
            model=student.model,
            teacher_model=teacher.model,
            args=gold_arguments(steps, REPO / "runs" / "bench-quality" / "gold", teacher_dir),
            train_dataset=Dataset.from_list(examples),
            processing_class=student.tokenizer,
            callbacks=[recorder],
        )
    trainer.train()
    trained = trainer.model
    weight_change = torch.sqrt(sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(trained.parameters(), start_weights)))
    bpb_after = bits_per_byte(trained, student.tokenizer, text).bits_per_byte

    losses = [entry["loss"] for entry in recorder.logs]
    median_step = statistics.median(recorder.step_seconds)
    tokens_per_step = WINDOWS_PER_STEP * WINDOW_TOKENS
    return {
        "method": GOLD,
        "group": "B",
        "description": "TRL experimental GOLD trainer, ULD loss (CE 1 + ULD 1), off-policy (lmbda 0)",
        "bpb_final": bpb_after,
        "bpb_best": bpb_after,  # GOLD runs without intermediate evaluation: the final student is the only one
        "bpb_student_before": bpb_before,
        "steps": len(recorder.step_seconds),
        "losses": losses,
        "losses_finite": all(map(math.isfinite, losses)),
        "grad_norms": [entry.get("grad_norm") for entry in recorder.logs],
        "weight_change_l2": float(weight_change),
        "median_step_seconds": median_step,
        "mean_step_seconds": statistics.fmean(recorder.step_seconds),
        "min_step_seconds": min(recorder.step_seconds),
        "max_step_seconds": max(recorder.step_seconds),
        "tokens_per_second": tokens_per_step / median_step,
        "step_over_floor": median_step / floor["seconds"],
        "floor": floor,
        "peak_rss_mib": peak_rss_mib(),
        "windows": {
            "count": len(windows),
            "protocol_sha256": window_ids_sha256(windows),
            "fed_as": "student input_ids of each window unchanged (token 0 = prompt, 1..255 = completion); the "
                      "teacher re-tokenises the decoded text of both parts",
            "windows_whose_decoded_text_drifts_from_piece_bytes": drifting,
        },
        "gold_config": {key: value for key, value in trainer.args.to_dict().items()
                        if key in ("lmbda", "beta", "use_uld_loss", "use_extended_uld", "uld_token_merge_strategy",
                                   "uld_crossentropy_weight", "uld_distillation_weight", "uld_student_temperature",
                                   "uld_teacher_temperature", "uld_skip_student_eos", "uld_skip_teacher_eos",
                                   "learning_rate", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "optim",
                                   "per_device_train_batch_size", "max_steps", "seed", "gradient_checkpointing")},
        "base_config": str(BASE_CONFIG.relative_to(REPO)),
        "machine": host,
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/gold_baseline.py" + ("" if steps == PROTOCOL_STEPS else f" --steps {steps}"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=PROTOCOL_STEPS)
    parser.add_argument("--output", type=Path, default=result_path(GOLD))
    args = parser.parse_args()
    record = run(args.steps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({key: record[key] for key in ("bpb_student_before", "bpb_final", "losses", "weight_change_l2",
                                                   "median_step_seconds", "step_over_floor")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
