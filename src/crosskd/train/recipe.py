"""`crosskd train`: one explicit distillation loop, read top to bottom.

    config -> models -> data -> objective (vocabulary transfer, heads) -> optimizer -> [resume] -> loop:
        for each optimizer step:
            weights, temperature = schedules(progress)
            read the step's micro-batches; select each one's positions; count them over all micro-batches and processes
            for each micro-batch: teacher signal (no_grad) -> student forward -> terms -> combine (global counts)
                -> backward
            unscale, clip; a non-finite loss or gradient skips the step; optimizer + scheduler step
            log; evaluate; checkpoint
    -> export the best student (by held-out BPB) as a Hugging Face folder
"""

from __future__ import annotations

import contextlib
import math
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.profiler import record_function
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from crosskd.config import Config, config_differences
from crosskd.data.collate import collate_windows
from crosskd.data.corpus import TrainingCorpus, windows_per_step
from crosskd.evaluate import BPBResult, bits_per_byte, chat_reply, responses_bits_per_byte
from crosskd.losses.selection import step_counts
from crosskd.models.allocator import freed_memory_kept
from crosskd.models.loading import LoadedModel, load_model
from crosskd.models.precision import MixedPrecision
from crosskd.schedules import ScheduleSettings, loss_weights, schedule_settings, temperature
from crosskd.train.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    TrainingState,
    checkpoint_name,
    checkpoint_problem,
    load_checkpoint,
    newest_valid_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from crosskd.train.logbook import LOG_FILE, Logbook, check_sum, format_step_line, peak_memory_bytes
from crosskd.train.objective import DistillationObjective
from crosskd.vocab.transfer import ParameterGroup


CONFIG_FILE = "config.yaml"
# Keys a resumed run may change: where it writes and how often it logs, nothing it computes.
RESUME_FREE_KEYS = ("output.run_dir", "output.tensorboard", "training.log_every")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps, a signal); a checkpoint was written first."""


class RunFolderError(ValueError):
    """The run folder holds another run: training into it would replace or mix that run's results."""


@dataclass
class TrainResult:
    """What a finished run gives back: where it wrote, held-out bits per byte before, at the end, at its best and of
    the teacher, and the steps it skipped."""

    run_dir: Path
    student_dir: Path
    steps: int
    initial_bpb: float
    final_bpb: float
    best_bpb: float
    best_step: int
    teacher_bpb: float | None
    nonfinite_skipped: int
    overflow_skipped: int
    stopped_early: bool


def build_optimizer(config: Config, student: torch.nn.Module, objective: DistillationObjective):
    """AdamW with one parameter group per kind of parameter, each with its learning-rate multiplier."""
    opt = config.optimizer
    groups = [
        ParameterGroup("student", [p for p in student.parameters() if p.requires_grad], opt.student_lr_multiplier),
        *objective.parameter_groups(),
    ]
    param_groups = [{"name": group.name, "params": group.parameters, "lr": opt.lr * group.lr_multiplier}
                    for group in groups if group.parameters]
    # The fused kernel updates all tensors in one vectorised pass: on the reference student (135 M parameters, 2 CPU
    # cores) the default per-tensor loop took ~0.8 s of every step, the fused one a small fraction of it
    # (docs/BENCHMARKS.md). It supports CPU and CUDA tensors and works with the fp16 loss scaler.
    fused = all(p.device.type in ("cpu", "cuda") for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                             fused=fused or None)


def build_scheduler(config: Config, optimizer, total_steps: int):
    """Warm-up then cosine or constant, counted in optimizer steps (the loop steps it once per optimizer step)."""
    warmup = config.optimizer.warmup_steps
    if config.optimizer.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def _trainable_state(student: torch.nn.Module, objective: DistillationObjective) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the models: the student's parameters, the objective's trainable parameters and its
    persistent buffers (statistics fitted before training, such as the projector's feature standardisation)."""
    state = {f"student.{name}": p for name, p in student.named_parameters()}
    frozen = {name for name, p in objective.named_parameters() if not p.requires_grad}
    state.update({f"objective.{name}": tensor for name, tensor in objective.state_dict(keep_vars=True).items()
                  if name not in frozen})
    return state


def _load_trainable_state(student, objective, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in _trainable_state(student, objective).items():
            if name in tensors:  # tied weights are stored once; their twin shares the memory
                parameter.copy_(tensors[name])


class _SignalGuard:
    """Turn SIGTERM into a stop request that the loop honours between steps, so that the emergency checkpoint is
    written at a step boundary: a handler raising mid-step could leave an optimizer update or a checkpoint write
    half done. While the loop only reads data (`reading_data`) nothing is half done, so SIGTERM stops it at once: a
    read that waits long (or forever) must not make the process deaf to it."""

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGTERM)
        self.requested = False
        self.reading = False

        def handler(signum, frame):
            self.requested = True
            if self.reading:
                raise TrainingStopped("received SIGTERM while reading training data")

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False

    @contextlib.contextmanager
    def reading_data(self):
        self.reading = True
        try:
            yield
        finally:
            self.reading = False

    def stop_requested(self, accelerator) -> bool:
        """Whether any process received SIGTERM: all of them must stop at the same step or the others would wait
        forever in the next collective."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


@dataclass
class Run:
    """What one training run holds, shared by the loop and its helpers (evaluation, checkpoints, resume)."""

    config: Config
    accelerator: Accelerator
    precision: MixedPrecision
    teacher: LoadedModel
    student: LoadedModel  # `student.model` stays the plain model; the training forward goes through its wrapper
    corpus: TrainingCorpus
    objective: DistillationObjective
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainingState
    checkpoints_dir: Path
    eval_text: str = ""
    logbook: Logbook | None = None


def train(config: Config, resume: str | None = None, debug: bool = False, overwrite: bool = False,
          preflight: Callable[[Accelerator], None] | None = None) -> TrainResult:
    """`resume`: "latest" or a checkpoint folder; `overwrite`: delete the run folder first when it holds another run
    (without it such a folder is refused); `preflight(accelerator)`: checks run once the processes are known, before
    anything is loaded or written (`crosskd train` passes the doctor's fast checks, which raise to refuse the run).
    With `training.keep_freed_memory` the step's large CPU buffers are reused from step to step
    (crosskd.models.allocator)."""
    with freed_memory_kept(config.training.keep_freed_memory):
        return _train(config, resume, debug, overwrite, preflight)


def _train(config: Config, resume: str | None, debug: bool, overwrite: bool,
           preflight: Callable[[Accelerator], None] | None) -> TrainResult:
    started = time.perf_counter()
    run_dir = Path(config.output.run_dir)
    checkpoints_dir = run_dir / "checkpoints"
    training = config.training

    # --- engine: devices, processes, mixed precision -------------------------------------------------------------
    # Accumulation is done by hand (below) because per-token losses must be normalised by the valid positions of
    # the whole accumulated batch, which accelerate's per-micro-batch 1/N scaling cannot do.
    accelerator = Accelerator(mixed_precision=training.mixed_precision)
    if preflight is not None:
        preflight(accelerator)
    precision = MixedPrecision(accelerator, training.mixed_precision)
    set_seed(training.seed)
    main = accelerator.is_main_process
    # Before anything is written or loaded: a run folder and its checkpoints belong to one run.
    if resume:
        if overwrite:
            raise RunFolderError("--resume continues the run in its folder and --overwrite deletes it: choose one")
        resumed = _checkpoint_to_resume(config, resume, checkpoints_dir)
    elif main:
        _claim_run_folder(run_dir, config, overwrite)

    def phase(text: str) -> None:  # the minutes before the first step should not look like a hang
        if main:
            print(text, flush=True)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
        for removed in remove_stale_temporaries(checkpoints_dir):
            print(f"removed {removed}: the temporary folder of a checkpoint write that was killed", flush=True)

    # --- models ---------------------------------------------------------------------------------------------------
    if config.models.teacher == config.models.student:  # legal (a self-distillation check) but usually a typo
        phase(f"warning: the teacher and the student are the same model ({config.models.teacher}): the student "
              "starts as its teacher, so distillation has nothing to teach; set models.teacher or models.student")
    setup = build_training(config, accelerator, stats_path=run_dir / "teacher_stats.safetensors",
                           resuming=bool(resume), phase=phase)
    teacher, student, corpus, objective = setup.teacher, setup.student, setup.corpus, setup.objective
    optimizer, scheduler, settings = setup.optimizer, setup.scheduler, setup.settings
    student_forward, objective_forward = setup.student_forward, setup.objective_forward
    total_steps, step_windows = setup.total_steps, setup.step_windows

    run = Run(config, accelerator, precision, teacher, student, corpus, objective, optimizer, scheduler,
              TrainingState(), checkpoints_dir)
    if resume:
        run.state = _resume(run, resumed)
    state = run.state

    # --- evaluation before training -------------------------------------------------------------------------------
    run.eval_text = corpus.eval_text()
    phase("measuring held-out bits per byte of teacher and student ("
          + (f"responses of {len(corpus.heldout_conversations())} conversations)" if corpus.chat is not None
             else f"{len(run.eval_text):,} characters)"))
    unwrapped_student = accelerator.unwrap_model(student.model)
    teacher_heldout = _heldout_bpb(run, teacher.model, "teacher")
    teacher_bpb = teacher_heldout.bits_per_byte
    initial = _heldout_bpb(run, unwrapped_student, "student")
    if main:
        print(f"held-out BPB before: student {initial.bits_per_byte:.4f}, teacher {teacher_bpb:.4f}", flush=True)
    if state.best_bpb is None:
        state.best_bpb, state.best_step = initial.bits_per_byte, state.step
        if main:
            _save(run)

    logbook = run.logbook = Logbook(run_dir, total_steps, config.output.tensorboard, enabled=main,
                                    initial_step=state.step,
                                    evaluated_steps={record["step"] for record in state.history} if resume else None)
    logbook.record("start", state.step, {"bpb": initial.bits_per_byte, "teacher_bpb": teacher_bpb,
                                         "perplexity": initial.perplexity,
                                         "teacher_perplexity": teacher_heldout.perplexity,
                                         "command": shlex.join(sys.argv)})
    windows = corpus.train_windows(start=state.windows_consumed, process_index=accelerator.process_index,
                                   num_processes=accelerator.num_processes, batch_size=training.batch_size)
    tokens_since_log, time_since_log = 0, time.perf_counter()
    try:
        with _SignalGuard() as signals:
            if resume and state.step > 0:
                # A checkpoint written after a step but before what the straight run did next at that step (its
                # evaluation, its checkpoint: an emergency checkpoint during the final evaluation) must not skip it:
                # the best student and early stopping depend on it.
                _end_of_step(run, *schedule_at(state.step - 1, total_steps, settings), total_steps,
                             resumed=True)
            while state.step < total_steps and not state.stopped_early:
                if signals.stop_requested(accelerator):
                    raise TrainingStopped("received SIGTERM")
                weights, tau = schedule_at(state.step, total_steps, settings)

                # Read the whole step first: normalisers count the selected positions of every micro-batch on every
                # process.
                with signals.reading_data():
                    micro_batches = [
                        collate_windows(next(windows), teacher.vocab.pad_id).to(accelerator.device)
                        for _ in range(training.gradient_accumulation_steps)
                    ]
                optimizer.zero_grad(set_to_none=True)
                losses = accumulate_gradients(objective, student_forward, objective_forward, precision, accelerator,
                                              micro_batches, weights, tau)
                counts, step_components, step_raw = losses.counts, losses.weighted, losses.raw
                tokens_since_log += losses.tokens
                update = apply_update(precision, accelerator, optimizer, objective.all_trainable(student.model),
                                      config.optimizer.grad_clip, losses.total)
                grad_norm, total_value, loss_finite = update.grad_norm, update.total, update.loss_finite
                nonfinite, overflow = update.nonfinite, update.overflow
                state.overflow_skipped += overflow
                if nonfinite:
                    state.nonfinite_skipped += 1
                    state.consecutive_nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                    logbook.line(f"step {state.step + 1}: non-finite loss ({total_value}) or gradient norm "
                                 f"({float(grad_norm)}); step skipped")
                elif not overflow:
                    state.consecutive_nonfinite = 0
                scheduler.step()
                # The data position advances with the step count, never before: a checkpoint written after an
                # interruption inside the step must point at the step's first window, or a resume would skip it.
                state.step += 1
                state.windows_consumed += step_windows
                logbook.advance()

                if debug:
                    if loss_finite:
                        check_sum(total_value, step_components)
                    if main:
                        print({"raw": step_raw, "weighted": step_components}, flush=True)
                if state.step % training.log_every == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - time_since_log
                    record = {
                        "progress": state.step / total_steps,
                        "total": total_value,
                        "weighted": step_components,
                        "temperature": tau,
                        "lr": scheduler.get_last_lr()[0],
                        **{f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups},
                        **{f"weight/{term}": weight for term, weight in weights.items()},
                        "kd_position_share": (counts["kd"] / counts["lm"].clamp_min(1)).item(),
                        "wall_seconds": time.perf_counter() - started,
                        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                        "grad_norm": float(grad_norm),
                        "tokens_per_second": tokens_since_log * accelerator.num_processes / max(elapsed, 1e-9),
                        "nonfinite_skipped": state.nonfinite_skipped,
                        "overflow_skipped": state.overflow_skipped,
                        **objective.diagnostics(),
                    }
                    logbook.line(format_step_line(state.step, total_steps, record))
                    flat = {k: v for k, v in record.items() if k != "weighted"}
                    logbook.record("train", state.step, {**flat, **{f"loss/{k}": v for k, v in step_components.items()},
                                                         **{f"raw/{k}": v for k, v in step_raw.items()}})
                    tokens_since_log, time_since_log = 0, time.perf_counter()
                if state.consecutive_nonfinite >= training.max_consecutive_nonfinite:
                    raise TrainingStopped(
                        f"{state.consecutive_nonfinite} non-finite steps in a row. Likely causes: a learning rate "
                        "too high for this model, fp16 overflow without a loss scaler (use bf16 or fp32), or a "
                        "temperature near zero. Lower optimizer.lr or change training.mixed_precision, then "
                        "resume from the checkpoint just written."
                    )

                _end_of_step(run, weights, tau, total_steps, resumed=False)
    except (Exception, KeyboardInterrupt) as error:
        if main:
            path = _save(run, emergency=True)
            print(f"\nstopped at step {state.step}: {error}\nemergency checkpoint: {path}\n"
                  f"resume with: crosskd train {run_dir / CONFIG_FILE} --resume", file=sys.stderr, flush=True)
        logbook.close()
        raise
    if main and corpus.chat is not None:
        _log_replies(run)
    logbook.close()

    # --- export the best student, not the last --------------------------------------------------------------------
    student_dir = run_dir / "student"
    accelerator.wait_for_everyone()
    best = checkpoints_dir / checkpoint_name(state.best_step)
    if main:
        export_student(best, student, objective, student_dir)
    final_bpb = state.history[-1]["bpb"] if state.history else initial.bits_per_byte
    # Tear the process group down before the interpreter exits: gloo's threads otherwise abort the process at exit.
    # Every process first waits for the export, so none destroys its side while a peer is still working.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        run_dir=run_dir, student_dir=student_dir, steps=state.step, initial_bpb=initial.bits_per_byte,
        final_bpb=final_bpb, best_bpb=state.best_bpb, best_step=state.best_step, teacher_bpb=teacher_bpb,
        nonfinite_skipped=state.nonfinite_skipped, overflow_skipped=state.overflow_skipped,
        stopped_early=state.stopped_early,
    )


@dataclass
class TrainingSetup:
    """What `train` builds before its first step, and `crosskd doctor` builds the same way: the models, the data,
    the schedule and the run's length, the objective (prepared), the optimizer with its learning-rate schedule, and
    the two forwards through accelerate's wrappers."""

    teacher: LoadedModel
    student: LoadedModel  # `student.model` stays the plain model; the training forward goes through its wrapper
    corpus: TrainingCorpus
    settings: ScheduleSettings
    step_windows: int
    total_steps: int
    objective: DistillationObjective
    preparation_report: str | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    student_forward: torch.nn.Module
    objective_forward: torch.nn.Module


def build_training(config: Config, accelerator: Accelerator, stats_path: Path, resuming: bool,
                   phase: Callable[[str], None] = lambda text: None) -> TrainingSetup:
    """Load the models and the data, check them, build and prepare the objective, the optimizer and its schedule.
    `stats_path`: where the feature terms' teacher statistics are read from or written to; `resuming`: the
    transfer's parameters come from a checkpoint, so it is not prepared; `phase`: prints a line per phase."""
    training = config.training
    main = accelerator.is_main_process
    phase(f"loading teacher {config.models.teacher} and student {config.models.student}")
    teacher = load_model(config.models.teacher, "teacher", dtype=config.models.teacher_dtype)
    student = load_model(config.models.student, "student")
    if training.gradient_checkpointing:  # non-reentrant, the form PyTorch recommends (it warns when none is chosen)
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher.model.to(accelerator.device)

    # --- data -----------------------------------------------------------------------------------------------------
    corpus = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    _check_position_limits(config.data.window_tokens, {"teacher": teacher, "student": student})
    corpus.check_training_window()
    corpus.check_heldout_window()
    step_windows = windows_per_step(training, accelerator.num_processes)
    total_steps = corpus.optimizer_steps(training, step_windows)

    # --- objective and optimizer ---------------------------------------------------------------------------------
    settings = schedule_settings(config)
    phase(f"preparing the {config.objective.strategy} objective ({total_steps} optimizer steps of "
          f"{step_windows} windows of {config.data.window_tokens} tokens)")
    objective = DistillationObjective(config, teacher, student, settings)
    report = None
    if objective.needs_preparation:
        report = objective.prepare(corpus.preparation_batches(training.batch_size, accelerator.device),
                                   accelerator.device, stats_path=stats_path, resuming=resuming)
        if main and report is not None:
            print(report, flush=True)
    optimizer = build_optimizer(config, student.model, objective)
    scheduler = build_scheduler(config, optimizer, total_steps)
    # `student.model` stays the plain model (attributes, checkpoints, export, pre-fit and retention); the training
    # forward goes through the prepared wrapper so data parallelism synchronises gradients. The objective is prepared
    # only when it has parameters of its own (projector, heads): DDP refuses a module with nothing to train.
    objective.to(accelerator.device)  # the transfer's modules and the heads
    student_forward = accelerator.prepare(student.model)
    has_parameters = any(True for _ in objective.parameters())
    objective_forward = accelerator.prepare(objective) if has_parameters else objective
    optimizer = accelerator.prepare(optimizer)
    return TrainingSetup(teacher, student, corpus, settings, step_windows, total_steps, objective, report, optimizer,
                         scheduler, student_forward, objective_forward)


@dataclass
class StepLosses:
    """One optimizer step's loss before the update: this process's total (detached), the components summed over
    micro-batches and processes (`weighted` add up to the total; `raw` before their weights), the step's position
    counts and the student tokens this process read."""

    total: torch.Tensor
    weighted: dict[str, float]
    raw: dict[str, float]
    counts: dict[str, torch.Tensor]
    tokens: int


def accumulate_gradients(objective: DistillationObjective, student_forward, objective_forward,
                         precision: MixedPrecision, accelerator: Accelerator, micro_batches: list,
                         weights: dict[str, float], tau: float) -> StepLosses:
    """Select each micro-batch's positions, count them over the whole step, then for each micro-batch the teacher
    signal, the student forward, the terms, their combination with the step's counts and backward."""
    selections = [objective.select(batch) for batch in micro_batches]
    counts = step_counts(selections, accelerator)

    step_total = torch.zeros((), device=accelerator.device)
    step_components: dict[str, float] = {}
    step_raw: dict[str, float] = {}  # each term before its weight: what a head optimises; KD with its τ² factor
    tokens = 0
    for index, (batch, selection) in enumerate(zip(micro_batches, selections)):
        last = index == len(micro_batches) - 1
        sync = contextlib.ExitStack()
        if not last:  # gradients are all-reduced once per step, on the last micro-batch
            for module in {student_forward, objective_forward}:
                sync.enter_context(accelerator.no_sync(module))
        with sync:
            # The `crosskd.*` ranges name the step's parts in a torch.profiler trace (bench/profile_step.py); they
            # cost nothing when no profiler runs.
            with precision.autocast():
                with record_function("crosskd.teacher_signal"):
                    signal = None if objective.lm_only else objective.teacher_signal(batch, weights)
                with record_function("crosskd.student_forward"):
                    outputs = student_forward(**objective.student_inputs(batch, weights))
                with record_function("crosskd.objective"):
                    terms = objective_forward(batch, selection, outputs.hidden_states, outputs.attentions,
                                              signal, weights, tau)
            loss = objective.combine(terms, counts, weights, len(micro_batches), accelerator.num_processes)
            with record_function("crosskd.backward"):
                precision.backward(loss.total)
        step_total += loss.total.detach()
        for name, value in loss.weighted.items():
            step_components[name] = step_components.get(name, 0.0) + value
        for name, value in loss.raw.items():
            step_raw[name] = step_raw.get(name, 0.0) + value
        tokens += int(batch.student_attention_mask.sum())
    step_components, step_raw = (_sum_over_processes(values, accelerator) for values in (step_components, step_raw))
    return StepLosses(step_total, step_components, step_raw, counts, tokens)


@dataclass(frozen=True)
class UpdateOutcome:
    grad_norm: float  # the true gradient norm (after unscaling), before clipping
    total: float  # the step's loss, averaged over processes
    loss_finite: bool
    nonfinite: bool  # the step was skipped: a non-finite loss or gradient
    overflow: bool  # the fp16 loss scaler skipped the step (its scale was halved)


def apply_update(precision: MixedPrecision, accelerator: Accelerator, optimizer, parameters, grad_clip: float,
                 step_total: torch.Tensor) -> UpdateOutcome:
    """Unscale and clip the accumulated gradients, then step the optimizer unless the loss or the gradients are not
    finite (the caller drops the gradients of a skipped step and counts it)."""
    grad_norm = precision.unscale_and_clip(optimizer, parameters, grad_clip)
    total_value = accelerator.reduce(step_total, reduction="mean").item()
    loss_finite = math.isfinite(total_value)
    if precision.scaler is not None or (loss_finite and math.isfinite(float(grad_norm))):
        # A loss scaler judges the gradients itself: on inf/NaN it skips the step and halves its scale.
        with record_function("crosskd.optimizer_step"):
            outcome = precision.step(optimizer)
        nonfinite = not loss_finite  # a non-finite loss is no overflow: no loss scale can fix it
        overflow = outcome.overflow and loss_finite
    else:
        nonfinite, overflow = True, False
    return UpdateOutcome(float(grad_norm), total_value, loss_finite, nonfinite, overflow)


def _check_position_limits(window_tokens: int, models: dict[str, LoadedModel]) -> None:
    """A window longer than a model's positions fails only at its first forward, or reads positions it never
    learned; refuse it before the first step. (The teacher's tokens of a window are about as many as the student's.)"""
    for role, loaded in models.items():
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        if limit is not None and window_tokens > limit:
            raise ValueError(
                f"data.window_tokens={window_tokens} exceeds the {role} {loaded.spec}'s position limit of "
                f"{limit} tokens (max_position_embeddings); set data.window_tokens to at most {limit}"
            )


def _sum_over_processes(values: dict[str, float], accelerator) -> dict[str, float]:
    """Each process holds its share of every logged component; the shares add up to the global value."""
    if accelerator.num_processes == 1:
        return values
    names = sorted(values)
    shares = torch.tensor([values[name] for name in names], device=accelerator.device)
    return dict(zip(names, accelerator.reduce(shares, reduction="sum").tolist()))


SAMPLE_CONVERSATIONS = 3  # held-out conversations whose first reply the trained student writes into the log
SAMPLE_TOKENS = 64


def _log_replies(run: Run) -> None:
    """The final student's greedy reply to the first request of a few held-out conversations, beside the answer
    (log.jsonl kind `sample`, and the console): a look at what responses-only BPB measures."""
    model = run.accelerator.unwrap_model(run.student.model)
    renderer = run.corpus.chat.student
    for conversation in run.corpus.heldout_documents[:SAMPLE_CONVERSATIONS]:
        first_reply = conversation.responses[0]
        request = conversation.messages[:first_reply]
        reply = chat_reply(model, renderer, request, SAMPLE_TOKENS)
        run.logbook.record("sample", run.state.step, {"conversation": conversation.name, "request": request[-1].content,
                                                      "reply": reply,
                                                      "answer": conversation.messages[first_reply].content})
        run.logbook.line(f"sample {conversation.name}: {reply[:200]!r}")


def _heldout_bpb(run: Run, model, side: str) -> BPBResult:
    """Held-out BPB of the `side` ("student" or "teacher") model: on the held-out text, or on the responses of the
    held-out conversations, each model reading its own rendering."""
    if run.corpus.chat is not None:
        return responses_bits_per_byte(model, run.corpus.heldout_sequences(side), accelerator=run.accelerator)
    tokenizer = getattr(run, side).tokenizer
    return bits_per_byte(model, tokenizer, run.eval_text, accelerator=run.accelerator)


def _evaluate(run: Run, weights: dict[str, float], tau: float) -> bool:
    """Held-out BPB from the LM loss alone, plus knowledge retention; returns True when early stopping triggers."""
    config, state, accelerator = run.config, run.state, run.accelerator
    unwrapped = accelerator.unwrap_model(run.student.model)
    result = _heldout_bpb(run, unwrapped, "student")
    retention = run.objective.evaluate_retention(
        run.corpus.eval_batches(config.training.batch_size, accelerator.device), weights, tau)
    record = {"bpb": result.bits_per_byte, "perplexity": result.perplexity, **retention}
    run.logbook.record("eval", state.step, record)
    run.logbook.line(f"eval step {state.step}: held-out BPB {result.bits_per_byte:.4f} (ppl {result.perplexity:.3f}); "
                     + ", ".join(f"{k} {v:.4f}" for k, v in retention.items()))
    # The state changes last and together: an interruption above leaves the evaluation undone, to be redone on resume.
    state.history.append({"step": state.step, **record})
    stopping = config.training.early_stopping
    if result.bits_per_byte < state.best_bpb - stopping.min_delta or (
        result.bits_per_byte < state.best_bpb and not stopping.enabled
    ):
        state.best_bpb, state.best_step = result.bits_per_byte, state.step
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    return (
        stopping.enabled
        and state.step >= stopping.warmup_steps
        and state.evals_without_improvement >= stopping.patience
    )


def schedule_at(step: int, total_steps: int, settings) -> tuple[dict[str, float], float]:
    """The term weights and the temperature of optimizer step `step` (counted from 0)."""
    progress = step / total_steps
    return loss_weights(progress, settings), temperature(progress, settings)


def _end_of_step(run: Run, weights: dict[str, float], tau: float, total_steps: int, resumed: bool) -> None:
    """What follows optimizer step `run.state.step`: its evaluation when due, its checkpoint when due, early stopping.
    `resumed`: redo only what a checkpoint written at this step lacks (the evaluation is in the history, a valid
    checkpoint of the step exists), so a resumed run does exactly what the straight run did."""
    state, training = run.state, run.config.training
    final = state.step == total_steps
    periodic_checkpoint = bool(training.checkpoint_every) and state.step % training.checkpoint_every == 0
    due_eval = final or (bool(training.eval_every) and state.step % training.eval_every == 0)
    evaluated = bool(state.history) and state.history[-1]["step"] == state.step
    if due_eval and not evaluated:
        state.stopped_early = _evaluate(run, weights, tau)
        if state.stopped_early:
            run.logbook.line(f"early stopping at step {state.step}: no improvement of "
                             f"{training.early_stopping.min_delta} BPB in "
                             f"{training.early_stopping.patience} evaluations")
    improved = due_eval and state.best_step == state.step
    due_checkpoint = periodic_checkpoint or improved or final or state.stopped_early
    written = resumed and checkpoint_problem(run.checkpoints_dir / checkpoint_name(state.step)) is None
    if run.accelerator.is_main_process and due_checkpoint and not written:
        _save(run)


def _save(run: Run, emergency: bool = False) -> Path:
    state, accelerator = run.state, run.accelerator
    unwrapped_student = accelerator.unwrap_model(run.student.model)
    unwrapped_objective = accelerator.unwrap_model(run.objective)
    folder = run.checkpoints_dir / (checkpoint_name(state.step) + ("-emergency" if emergency else ""))
    save_checkpoint(folder, state, _trainable_state(unwrapped_student, unwrapped_objective),
                    run.optimizer.state_dict(), run.scheduler.state_dict(), run.precision.scaler_state(),
                    run.config.to_dict())
    if not emergency:
        best = run.checkpoints_dir / checkpoint_name(state.best_step) if state.best_step is not None else None
        prune_checkpoints(run.checkpoints_dir, run.config.training.keep_checkpoints, protect=best)
    return folder


def _claim_run_folder(run_dir: Path, config: Config, overwrite: bool) -> None:
    """Refuse a run folder that holds another run (a checkpoint, a log, an exported student, or another config) unless
    `overwrite`, which deletes it; a folder with only this run's own config.yaml (a start that died while loading) is
    this run's."""
    if not run_dir.is_dir():
        return
    config_file = run_dir / CONFIG_FILE
    held = [name for name in ("checkpoints", LOG_FILE, "student") if (run_dir / name).exists()]
    if config_file.is_file() and config_file.read_text() != config.to_yaml():
        held.append(CONFIG_FILE)
    if not held:
        return
    if overwrite:
        print(f"--overwrite: deleting the earlier run in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
        return
    raise RunFolderError(
        f"{run_dir} already holds a run ({', '.join(held)}). Resume it with `crosskd train {config_file} --resume`, "
        f"put this run elsewhere with output.run_dir=NEW_FOLDER, or pass --overwrite to delete the earlier run"
    )


def _checkpoint_to_resume(config: Config, resume: str, checkpoints_dir: Path) -> LoadedCheckpoint:
    """The verified checkpoint to resume: "latest" is the newest one that verifies (each newer one that does not is
    reported with the reason); its config must be this run's, but for `RESUME_FREE_KEYS`."""
    if resume == "latest":
        folder = _newest_valid_or_explain(checkpoints_dir)
    else:
        folder = Path(resume)
    loaded = load_checkpoint(folder)
    differences = config_differences(loaded.config, config, ignore=RESUME_FREE_KEYS)
    if differences:
        raise CheckpointError(
            f"{folder} belongs to a run configured differently: {'; '.join(differences)}. Resume it with the config "
            f"it was written with ({folder.parent.parent / CONFIG_FILE}), or start this run in a new output.run_dir"
        )
    return loaded


def _newest_valid_or_explain(checkpoints_dir: Path) -> Path:
    folder, skipped = newest_valid_checkpoint(checkpoints_dir)
    for reason in skipped:
        print(f"--resume: skipped a checkpoint: {reason}", file=sys.stderr, flush=True)
    if folder is None:
        found = f"none verifies ({'; '.join(skipped)})" if skipped else "there is none"
        raise CheckpointError(f"--resume: no checkpoint to resume under {checkpoints_dir}: {found}; "
                              "start without --resume")
    return folder


def _resume(run: Run, loaded: LoadedCheckpoint) -> TrainingState:
    _load_trainable_state(run.student.model, run.objective, loaded.trainable)
    run.optimizer.load_state_dict(loaded.optimizer)
    run.scheduler.load_state_dict(loaded.scheduler)
    run.precision.load_scaler_state(loaded.scaler)
    restore_rng(loaded.rng)
    print(f"resumed from {loaded.folder} at step {loaded.state.step}", flush=True)
    return loaded.state


def export_student(checkpoint: Path, student, objective, out_dir: Path) -> None:
    """Write the student of `checkpoint` as a plain Hugging Face folder (model + tokenizer), atomically."""
    loaded = load_checkpoint(checkpoint)
    model = student.model
    _load_trainable_state(model, objective, loaded.trainable)
    temporary = out_dir.parent / f".tmp-{out_dir.name}"
    if temporary.exists():
        shutil.rmtree(temporary)
    model.save_pretrained(temporary)
    student.tokenizer.save_pretrained(temporary)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    temporary.rename(out_dir)
