"""The Python entry points, for notebooks and scripts as much as for the `crosskd` command (a thin layer over these).

    import crosskd

    result = crosskd.distill("configs/reference.yaml", overrides=["training.max_steps=10"])
    result.best_bpb, result.initial_bpb, result.teacher_bpb, result.student_dir

A config is a YAML/JSON path, a mapping of sections (as the file holds them) or a built `Config`; dotted
`section.key=value` overrides apply on top of it either way.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from crosskd.config import ChatConfig, Config, config_from_dict
from crosskd.config import load_config as load_config_file
from crosskd.data.stdlib import heldout_text
from crosskd.data.chat import Message
from crosskd.data.chat_windows import ChatRenderer, ChatTemplateError
from crosskd.doctor import require_fast_checks
from crosskd.evaluate import bits_per_byte, chat_reply, folder_heldout_bpb
from crosskd.models.loading import load_model
from crosskd.models.reference import SetupError, ensure_reference_models
from crosskd.report.model_card import write_model_card
from crosskd.report.page import report_path, write_report
from crosskd.data.teacher_text import TeacherTextError
from crosskd.teacher.cache import DEFAULT_SHARD_MEGABYTES, CacheSummary, TeacherCacheError, write_teacher_cache
from crosskd.teacher.writing import WritingSummary
from crosskd.teacher.writing import write_teacher_text as write_teacher_text_folder
from crosskd.train.checkpoint import CheckpointError
from crosskd.train.recipe import RunFolderError, TrainingStopped, TrainResult, train
from crosskd.vocab.transfer import transfer_class

ConfigSource = Config | str | Path | Mapping[str, Any] | None


def load_config(config: ConfigSource = None, overrides: Sequence[str] = ()) -> Config:
    """A validated config from a path, a mapping of sections or a `Config` (None: the defaults), with overrides."""
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), list(overrides))
    if isinstance(config, Mapping):
        return config_from_dict(config, list(overrides))
    return load_config_file(config, list(overrides))


def distill(config: ConfigSource, overrides: Sequence[str] = (), resume: str | None = None,
            debug: bool = False, overwrite: bool = False, doctor: bool = True) -> TrainResult:
    """Train the student as configured and return the run's result: its folders, held-out BPB before, best, final
    and of the teacher, and the skipped steps. `resume`: "latest" or a checkpoint folder. `overwrite`: delete the run
    folder first when it holds another run (`RunFolderError` otherwise). Raises `TrainingStopped` when the run stopped
    on purpose (an emergency checkpoint was written first), `CheckpointError` when the checkpoint to resume is
    damaged or of another config.

    `doctor`: first run the fast checks of `crosskd doctor` (tokenizers, alignment, schedule; no model is loaded):
    warnings are printed, a failing check raises `crosskd.doctor.DoctorFailed` before anything is loaded or written
    (docs/DOCTOR.md).

    The main process then writes the exported student's model card and the run's report (`report_path`), both read
    back from the run folder's records (docs/REPORT.md)."""
    config = load_config(config, overrides)

    def fast_checks(accelerator) -> None:
        require_fast_checks(config, accelerator.num_processes,
                            echo=print if accelerator.is_main_process else lambda line: None)

    result = train(config, resume=resume, debug=debug, overwrite=overwrite, preflight=fast_checks if doctor else None)
    if PartialState().is_main_process:
        write_model_card(result.student_dir, result.run_dir)
        write_report([result.run_dir])
    return result


def cache_teacher(config: ConfigSource, overrides: Sequence[str] = (), processes: int = 1,
                  shard_megabytes: float = DEFAULT_SHARD_MEGABYTES, progress: bool = True) -> CacheSummary:
    """Run the teacher once over the windows the configured run reads and store what its vocabulary transfer needs
    (docs/CACHE.md); train from it with `teacher.source=cache`."""
    config = load_config(config, overrides)
    transfer = transfer_class(config.objective)
    return write_teacher_cache(config, transfer.teacher_needs(config.objective),
                               transfer.prepares_on_training_windows(config.objective), processes=processes,
                               shard_megabytes=shard_megabytes, progress=progress)


def write_teacher_text(config: ConfigSource, overrides: Sequence[str] = (), progress: bool = True) -> WritingSummary:
    """Sample the teacher's continuations of the run's first training windows into `data.teacher_text.dir`
    (resumes); a run with the same config trains on them (docs/TEACHER_TEXT.md)."""
    return write_teacher_text_folder(load_config(config, overrides), progress=progress)


def cli_train(args) -> int:
    try:
        result = distill(args.config, args.overrides, resume=args.resume, debug=args.debug,
                         overwrite=args.overwrite, doctor=not args.no_doctor)
    except TrainingStopped:
        return 1  # the reason and the emergency checkpoint were printed when the run stopped
    except (RunFolderError, CheckpointError) as error:
        print(f"crosskd train: error: {error}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    teacher = f"{result.teacher_bpb:.4f}" if result.teacher_bpb is not None else "n/a"
    print(
        f"\nheld-out bits per byte: student before {result.initial_bpb:.4f} -> best {result.best_bpb:.4f} "
        f"(step {result.best_step}) | teacher {teacher}\n"
        f"skipped steps: {result.nonfinite_skipped} non-finite, {result.overflow_skipped} fp16 overflow\n"
        f"student saved to {result.student_dir} (load with AutoModelForCausalLM.from_pretrained)\n"
        f"report: {report_path(result.run_dir)}"
    )
    return 0


def cli_cache_teacher(args) -> int:
    try:
        summary = cache_teacher(args.config, args.overrides, processes=args.processes,
                                shard_megabytes=args.shard_megabytes or DEFAULT_SHARD_MEGABYTES)
    except TeacherCacheError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.describe())
    train_command = ["crosskd", "train", args.config, *args.overrides, "teacher.source=cache",
                     f"teacher.cache_dir={summary.cache_dir}"]
    print(f"train from it with: {shlex.join(train_command)}")
    return 0


def cli_write_teacher_text(args) -> int:
    try:
        summary = write_teacher_text(args.config, args.overrides)
    except TeacherTextError as error:
        print(f"crosskd write-teacher-text: error: {error}", file=sys.stderr)
        return 2
    print(summary.describe())
    print(f"train on it with: {shlex.join(['crosskd', 'train', args.config, *args.overrides])}")
    return 0


def _load_for_cli(spec: str):
    """A model folder, GGUF file or crosskd checkpoint's exported student, with its tokenizer."""
    return load_model(spec, "student")


def cli_eval(args) -> int:
    loaded = _load_for_cli(args.model)
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise SystemExit(f"crosskd eval: {path} does not exist; pass a UTF-8 text file with --text-file")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        text = heldout_text()
    result = bits_per_byte(loaded.model, loaded.tokenizer, text)
    print(
        f"{args.model}: bits per byte {result.bits_per_byte:.4f}, perplexity {result.perplexity:.3f} "
        f"({result.scored_tokens} tokens, {result.scored_bytes} bytes scored)"
    )
    return 0


def cli_generate(args) -> int:
    loaded = _load_for_cli(args.model)
    if args.chat:
        try:
            renderer = ChatRenderer(loaded.tokenizer, ChatConfig(system_prompt=args.system,
                                                                 student_template=args.chat_template), "student")
        except ChatTemplateError as error:
            raise SystemExit(f"crosskd generate: {error} (here: --chat-template)") from error
        print(chat_reply(loaded.model, renderer, (Message("user", args.prompt),), args.max_new_tokens))
        return 0
    if args.system or args.chat_template:
        raise SystemExit("crosskd generate: --system and --chat-template apply to --chat only")
    inputs = loaded.tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(loaded.tokenizer.decode(output[0], skip_special_tokens=True))
    return 0


def cli_setup_models(args) -> int:
    started = time.monotonic()
    try:
        pair = ensure_reference_models(args.cache_dir, measure_bpb=None if args.skip_bpb_check else folder_heldout_bpb,
                                       reverify=args.reverify)
    except SetupError as error:
        print(f"crosskd setup-models: error: {error}", file=sys.stderr)
        return 1
    print(f"teacher: {pair.teacher_dir}\nstudent: {pair.student_dir}")
    print(f"[setup-models] done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return 0
