"""`crosskd doctor`: check a run before it starts, on the real models of its config, with the trainer's own builders.

Each check is a small function returning a `CheckResult` (name, pass / warn / fail, the measured value, the fix), so
tests call them one by one. `run_doctor` runs them all:

- set-up: the models load, the data gives windows (the trainer's `build_training`, with the feature statistics in a
  scratch folder); the tokenizers are fast; padded vocabulary ids are masked (and never in the teacher's top-k);
  the document separator and special tokens;
- data: the alignment rate, the share of student positions with a KD pair, run-past (mismatch) pairs;
- schedule: the weights at p = 0, 0.1, ..., 1 (`schedule_table`), the KD and learning-rate warm-ups and the run's
  length in optimizer steps, curriculum terms whose weight stays 0, the temperature against the τ² factor;
- one real optimizer step of the first training micro-batches (`accumulate_gradients`, `apply_update`): every
  enabled term's raw value at τ_start against the LM loss, KD against the bound log V, a finite loss whose
  components add up to it, finite gradients, a non-zero learning rate after the step, the dtypes of teacher,
  student, projector, heads and terms in training and in one evaluation batch;
- the memory plan for the chosen device (`crosskd plan`), and that the run folder was not touched.

`fast_checks` is the cheap subset `crosskd train` runs first (tokenizers, vocabulary, separators, alignment on
sample windows, schedule, temperature; no model forward). docs/DOCTOR.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosskd.config import Config, ConfigError, load_config
from crosskd.data.collate import IGNORE_INDEX, DualBatch, collate_windows
from crosskd.data.corpus import TrainingCorpus, windows_per_step
from crosskd.data.windows import END_OF_TEXT, separator_id
from crosskd.models.loading import ModelNotFoundError, load_pretrained, load_tokenizer, resolve_spec
from crosskd.models.memory import ArchitectureError
from crosskd.models.precision import AUTOCAST_DTYPES, MixedPrecision
from crosskd.models.vocab import VocabFacts, detect_vocab_facts
from crosskd.plan import format_bytes, parse_memory, plan_memory
from crosskd.schedules import (
    CURRICULUM_TERMS,
    ScheduleSettings,
    loss_weights,
    schedule_settings,
    temperature,
    term_is_computed,
)
from crosskd.train.logbook import check_sum
from crosskd.train.objective import TermSwitches
from crosskd.train.recipe import accumulate_gradients, apply_update, build_scheduler, build_training, schedule_at
from crosskd.vocab.transfer import DivergenceTransfer, transfer_class

PASS, WARN, FAIL = "pass", "warn", "fail"
# A term whose raw value at step 0 is more than this many times the LM loss dominates the first steps.
TERM_TO_LM_WARNING = 10.0
# Below this share of student positions with a teacher partner, KD trains on few positions.
LOW_ALIGNMENT_RATE = 0.5
# With the τ² factor, τ above 2 (a factor above 4) can make the KD gradient several times its τ = 1 size.
HIGH_T2_FACTOR = 4.0
SCHEDULE_PROGRESS = tuple(step / 10 for step in range(11))
SAMPLE_WINDOWS = 16  # training windows the fast alignment check tokenises


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # PASS, WARN or FAIL
    value: str  # what was measured
    fix: str = ""  # what to change (empty when it passes)


def passed(name: str, value: str) -> CheckResult:
    return CheckResult(name, PASS, value)


def warned(name: str, value: str, fix: str) -> CheckResult:
    return CheckResult(name, WARN, value, fix)


def failed(name: str, value: str, fix: str) -> CheckResult:
    return CheckResult(name, FAIL, value, fix)


@dataclass
class DoctorReport:
    checks: list[CheckResult] = field(default_factory=list)
    schedule: list[dict[str, float]] = field(default_factory=list)  # `schedule_table`
    not_computed: list[str] = field(default_factory=list)  # schedule terms at weight 0 all run: never computed
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # where the time went, by phase

    @contextlib.contextmanager
    def timed(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - started

    @property
    def failures(self) -> list[CheckResult]:
        return [check for check in self.checks if check.status == FAIL]

    @property
    def warnings(self) -> list[CheckResult]:
        return [check for check in self.checks if check.status == WARN]

    def to_dict(self) -> dict:
        return {"checks": [dataclasses.asdict(check) for check in self.checks], "schedule": self.schedule,
                "not_computed": self.not_computed, "failed": bool(self.failures), "seconds": self.seconds,
                "phase_seconds": self.phase_seconds}

    def describe(self) -> str:
        name_width = max(len(check.name) for check in self.checks)
        value_width = min(90, max(len(check.value) for check in self.checks))
        lines = [f"{'':4}  {'check':{name_width}}  {'measured':{value_width}}  fix"]
        lines += [f"{check.status:4}  {check.name:{name_width}}  {check.value:{value_width}}  {check.fix}".rstrip()
                  for check in self.checks]
        if self.schedule:
            lines += ["", "schedule (weights at progress p; lr: optimizer.lr × the schedule's factor):",
                      *_schedule_lines(self.schedule)]
            if self.not_computed:
                lines.append(f"not computed (weight 0 all run): {', '.join(self.not_computed)}")
        lines.append(f"\n{len(self.failures)} fail, {len(self.warnings)} warn, "
                     f"{len(self.checks) - len(self.failures) - len(self.warnings)} pass in {self.seconds:.0f} s")
        if self.phase_seconds:
            phases = ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in self.phase_seconds.items())
            lines[-1] += f" ({phases})"
        return "\n".join(lines)


def _schedule_lines(rows: list[dict[str, float]]) -> list[str]:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.2f}" if c in ("p", "step") else f"{row[c]:.3g}" if c == "lr" else f"{row[c]:.3f}"
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- tokenizers and vocabularies -----------------------------------------------------------------------------------
def check_fast_tokenizers(tokenizers: dict[str, object]) -> CheckResult:
    """Alignment reads character offsets, which only fast (Rust) tokenizers give."""
    slow = [role for role, tokenizer in tokenizers.items() if not getattr(tokenizer, "is_fast", False)]
    value = ", ".join(f"{role} {type(tokenizer).__name__}" for role, tokenizer in tokenizers.items())
    if slow:
        return failed("tokenizers are fast", value, f"load the {' and '.join(slow)} tokenizer with use_fast=True or "
                      "convert it to a tokenizer.json")
    return passed("tokenizers are fast", value)


def check_padded_ids(role: str, vocab: VocabFacts, tokenizer) -> CheckResult:
    """Every output id the tokenizer does not know must be masked (a softmax would otherwise give it mass)."""
    unknown = set(range(len(tokenizer), vocab.logit_size)) - set(vocab.padded_ids.tolist())
    found = ", ".join(f"{source}: {count}" for source, count in vocab.evidence.items() if count) or "none found"
    value = f"{vocab.logit_size:,} logits, {vocab.padded_ids.numel():,} padded ids masked ({found})"
    if unknown:
        return failed(f"{role} padded ids masked", f"{value}; {len(unknown):,} ids beyond the tokenizer unmasked",
                      "report this: VocabFacts must mask every id the tokenizer does not know")
    return passed(f"{role} padded ids masked", value)


def check_topk_avoids_padded_ids(topk_ids: torch.Tensor, vocab: VocabFacts) -> CheckResult:
    """The teacher's top-k at the first micro-batch's pairs never holds a padded id."""
    chosen = torch.isin(topk_ids.reshape(-1).cpu(), vocab.padded_ids)
    value = f"{int(chosen.sum()):,} of {chosen.numel():,} teacher top-k ids are padded ids"
    if chosen.any():
        return failed("teacher top-k avoids padded ids", value, "the teacher's valid mask misses padded ids: "
                      "check its crosskd_vocab.json (crosskd setup-models writes it) or its [PAD…] tokens")
    return passed("teacher top-k avoids padded ids", value)


def check_separators(tokenizers: dict[str, object], vocabs: dict[str, VocabFacts]) -> CheckResult:
    """The token that joins packed documents on each side (`data.windows.separator_id`, what the windows use), and
    the special ids: an end-of-turn eos as separator, or a separator that is a padded id, are wrong."""
    parts, problems = [], []
    for role, tokenizer in tokenizers.items():
        try:
            separator = separator_id(tokenizer)
        except ValueError as error:
            return failed("separator and special tokens", str(error),
                          f"give the {role} tokenizer an {END_OF_TEXT} or eos token")
        name = tokenizer.convert_ids_to_tokens(separator)
        vocab = vocabs[role]
        parts.append(f"{role} {name!r} ({separator}), {len(vocab.special_ids)} special ids, pad {vocab.pad_id}")
        if bool(torch.isin(torch.tensor([separator]), vocab.padded_ids)):
            problems.append((FAIL, f"the {role} separator {separator} is a padded (masked) id"))
        elif name != END_OF_TEXT:
            problems.append((WARN, f"the {role} tokenizer has no {END_OF_TEXT}: documents are joined by its eos "
                                   f"{name!r}, an instruct model's end-of-turn token"))
    value = "; ".join(parts)
    if not problems:
        return passed("separator and special tokens", value)
    status = FAIL if any(level == FAIL for level, _ in problems) else WARN
    return CheckResult("separator and special tokens", status, value,
                       "; ".join(text for _, text in problems) + f": use tokenizers with an {END_OF_TEXT} token")


# --- data ----------------------------------------------------------------------------------------------------------
def check_alignment(batches: list[DualBatch]) -> CheckResult:
    """Share of student positions with a next-token target that have a teacher partner (an aligned pair)."""
    positions = sum(int((batch.student_targets != IGNORE_INDEX).sum()) for batch in batches)
    pairs = sum(int(batch.pair_batch.numel()) for batch in batches)
    rate = pairs / max(positions, 1)
    value = f"{rate:.1%} of {positions:,} student positions aligned ({pairs:,} pairs, {len(batches)} batches)"
    if pairs == 0:
        return failed("alignment rate", value, "the tokenizers share no byte boundary on this text: check that the "
                      "models and data.source are what you meant")
    if rate < LOW_ALIGNMENT_RATE:
        return warned("alignment rate", value, "few positions can be compared: check `crosskd align-report` on "
                      "your text; a teacher with a closer tokenizer distils more positions")
    return passed("alignment rate", value)


def check_run_past_pairs(batches: list[DualBatch], config: Config) -> CheckResult:
    """Pairs where the student's next token runs past the teacher's: the first-token target gives the true token
    almost no probability there unless `mismatch_policy` pools (merge) or drops (exclude) them."""
    next_student = torch.cat([batch.pair_student_next_bytes for batch in batches])
    next_teacher = torch.cat([batch.pair_teacher_next_bytes for batch in batches])
    share = float((next_student > next_teacher).double().mean()) if next_student.numel() else 0.0
    objective = config.objective
    if objective.strategy != "first-token":
        return passed("run-past pairs", f"{share:.1%} of pairs; the {objective.strategy} target has no mapping "
                                        "to run past")
    value = f"{share:.1%} of pairs run past the teacher's token; mismatch_policy {objective.mismatch_policy}"
    if objective.mismatch_policy == "keep" and share > 0:
        return warned("run-past pairs", value + ": their mapped target gives the true token ~17 nats",
                      "objective.mismatch_policy=merge (the default) pools them; `keep` is for ablations")
    return passed("run-past pairs", value)


def check_kd_share(counts: dict[str, torch.Tensor], switches: TermSwitches) -> CheckResult:
    """Share of LM positions that the KD term trains on, in the first optimizer step (the objective's selection)."""
    share = float(counts["kd"] / counts["lm"].clamp_min(1))
    value = f"{share:.1%} of {int(counts['lm']):,} LM positions have a KD pair"
    if switches.lm_only:
        return passed("KD pair share", value + " (LM only: no KD)")
    if int(counts["kd"]) == 0:
        return failed("KD pair share", value, "KD trains on nothing: with mismatch_policy=exclude every pair may "
                      "run past; use objective.mismatch_policy=merge, or check the alignment above")
    return passed("KD pair share", value)


# --- schedule ------------------------------------------------------------------------------------------------------
def learning_rate_factors(config: Config, total_steps: int) -> list[float]:
    """The learning-rate factor of each optimizer step 0..total (the trainer's own scheduler, on a dummy tensor)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(config, optimizer, total_steps)
    return [scheduler.lr_lambdas[0](step) for step in range(total_steps + 1)]


def computed_terms(config: Config, settings: ScheduleSettings) -> list[str]:
    """The weighted terms the run computes at some step (KD unless LM only, curriculum terms with alpha > 0)."""
    terms = [] if TermSwitches.of(config, settings).lm_only else ["kd"]
    return terms + [term for term in CURRICULUM_TERMS
                    if any(term_is_computed(term, p, settings) for p in SCHEDULE_PROGRESS)]


def schedule_table(config: Config, settings: ScheduleSettings, total_steps: int) -> list[dict[str, float]]:
    """The weights of the computed terms, the temperature and the learning rate at p = 0, 0.1, ..., 1, with the
    optimizer step each p falls on."""
    factors = learning_rate_factors(config, total_steps)
    terms = computed_terms(config, settings)
    rows = []
    for p in SCHEDULE_PROGRESS:
        weights = loss_weights(p, settings)
        step = p * total_steps
        rows.append({"p": p, "step": step, **{term: weights[term] for term in terms},
                     "temperature": temperature(p, settings), "lr": config.optimizer.lr * factors[int(step)]})
    return rows


def not_computed_terms(config: Config, settings: ScheduleSettings) -> list[str]:
    return [term for term in ("kd", *CURRICULUM_TERMS) if term not in computed_terms(config, settings)]


def first_step_at(progress: float, total_steps: int) -> int:
    """The first optimizer step (from 0) whose progress step / total reaches `progress`."""
    return math.ceil(progress * total_steps - 1e-9)


def check_kd_warmup(settings: ScheduleSettings, total_steps: int) -> CheckResult:
    """The KD warm-up in optimizer steps: it must end at a step the run has."""
    name = "KD warm-up"
    if settings.kd_alpha == 0:
        return passed(name, "no KD (objective.kd_alpha 0)")
    if settings.kd_warmup_start >= 1 or settings.kd_warmup_end_progress == 0:
        return passed(name, f"none: KD at kd_alpha {settings.kd_alpha:g} from step 0")
    full = first_step_at(settings.kd_warmup_end_progress, total_steps)
    last = total_steps - 1
    value = (f"{settings.kd_warmup_start:g} → 1 × kd_alpha over p 0–{settings.kd_warmup_end_progress:g}: "
             f"full weight from optimizer step {full} of 0–{last}")
    if full > last:
        longest = last / total_steps
        return failed(name, value + ": longer than the run, KD never trains at full weight",
                      f"schedule.kd_warmup_end_progress at most {longest:.3g} (0: no warm-up), or a longer run "
                      "(training.max_steps)")
    return passed(name, value)


def check_lr_warmup(config: Config, total_steps: int) -> CheckResult:
    """The learning-rate warm-up in optimizer steps (the scheduler counts optimizer steps, not micro-batches)."""
    name, warmup = "learning-rate warm-up", config.optimizer.warmup_steps
    if warmup == 0:
        return passed(name, f"none: lr {config.optimizer.lr:g} from the first step")
    value = f"{warmup} optimizer steps of the run's {total_steps} (the first step at lr 0)"
    if warmup >= total_steps:
        # A warning, not a failure: the run trains, only below the configured rate (short smoke runs and the
        # behaviour check's 6 protocol steps with their 6 warm-up steps do this on purpose).
        reached = learning_rate_factors(config, total_steps)[total_steps - 1]
        return warned(name, value + f": longer than the run, the last step trains at {reached:.0%} of optimizer.lr",
                      f"optimizer.warmup_steps well below {total_steps} (e.g. {max(1, total_steps // 10)}), or a "
                      "longer run")
    return passed(name, value)


def check_run_length(config: Config, total_steps: int, processes: int) -> CheckResult:
    training = config.training
    windows = windows_per_step(training, processes)
    how = "training.max_steps" if training.max_steps else f"training.epochs={training.epochs} over the windows"
    processes_text = f"{processes} process" + ("es" if processes != 1 else "")
    return passed("optimizer steps", f"{total_steps} ({how}) × {windows} windows (batch {training.batch_size} × "
                                     f"accumulation {training.gradient_accumulation_steps} × {processes_text}) "
                                     f"× {config.data.window_tokens} tokens")


def check_curriculum(settings: ScheduleSettings, total_steps: int) -> CheckResult:
    """A curriculum term switched on (alpha > 0) whose weight is 0 at every step of the run trains its head but
    never the student."""
    progress = [step / total_steps for step in range(total_steps)]
    silent = [term for term in CURRICULUM_TERMS if settings.alpha(term) > 0
              and not any(loss_weights(p, settings)[term] > 0 for p in progress)]
    on = [term for term in CURRICULUM_TERMS if settings.alpha(term) > 0]
    if silent:
        ranges = ", ".join(f"{term} from p {settings.ramp_range(term)[0]:g}" for term in silent)
        return warned("curriculum", f"{', '.join(silent)} at weight 0 in every step ({ranges}; the last step is at "
                                    f"p {progress[-1]:.3g}): the student never gets their gradient",
                      "schedule.use_curriculum=false, or a longer run")
    return passed("curriculum", f"{', '.join(on)} reach the student" if on else "no curriculum terms")


def check_temperature(config: Config, settings: ScheduleSettings) -> CheckResult:
    """τ² multiplies the KD term (`objective.scale_by_t2`). The tempered KL's gradient shrinks between 1/τ² (the
    high-temperature limit τ² offsets) and 1/τ, so above τ = 2 the factor can make the KD gradient several times its
    τ = 1 size; and KD at τ is not what BPB at τ = 1 measures (docs/DOCTOR.md)."""
    hottest = max(settings.temperature_start, settings.temperature_end)
    scaled = issubclass(transfer_class(config.objective), DivergenceTransfer) and config.objective.scale_by_t2
    factor = hottest ** 2 if scaled else 1.0
    value = (f"τ {settings.temperature_start:g} → {settings.temperature_end:g}, KD × {factor:g}"
             + (" (scale_by_t2)" if scaled else " (no τ² factor)"))
    if factor > HIGH_T2_FACTOR:
        return warned("temperature", value, "schedule.temperature_start=1 and temperature_end=1 (τ = 1 beat the "
                      "anneal, docs/BENCHMARKS.md), or objective.scale_by_t2=false")
    return passed("temperature", value)


def schedule_checks(config: Config, settings: ScheduleSettings, total_steps: int, processes: int) -> list[CheckResult]:
    return [check_run_length(config, total_steps, processes), check_kd_warmup(settings, total_steps),
            check_lr_warmup(config, total_steps), check_curriculum(settings, total_steps),
            check_temperature(config, settings)]


# --- the step ------------------------------------------------------------------------------------------------------
def kd_bound(student_vocabulary: int) -> float:
    """log V: the forward KL of any target against the uniform student over V ids (the KD of a student that knows
    nothing). A random projector's confident random target costs log V + KL(uniform ‖ student) in expectation
    (~17 nats on the reference pair, log 49,152 = 10.8), so a step-0 KD above log V says the target is that wrong."""
    return math.log(student_vocabulary)


def check_step0_terms(raw: dict[str, float], kd_factor: float, student_vocabulary: int) -> list[CheckResult]:
    """Every term's raw value at step 0 (before its weight, KD with its τ² factor `kd_factor`) against the LM loss,
    and KD's divergence against `kd_bound`."""
    lm = raw["lm"]
    results = [passed("step 0: lm", f"{lm:.4g} nats (uniform student: {kd_bound(student_vocabulary):.4g})")
               if math.isfinite(lm) else failed("step 0: lm", f"{lm}", "the student's LM loss is not finite: check "
                                                "the student's weights and training.mixed_precision")]
    for name, value in raw.items():
        if name == "lm":
            continue
        ratio = value / lm if lm else math.inf
        text = f"{value:.4g} ({ratio:.3g}× LM)"
        if not math.isfinite(value):
            results.append(failed(f"step 0: {name}", text, f"the {name} term is not finite at step 0"))
        elif ratio > TERM_TO_LM_WARNING:
            results.append(warned(f"step 0: {name}", text, f"more than {TERM_TO_LM_WARNING:g}× the LM loss: it "
                                  "dominates the first steps; lower its alpha or check its normalisation"))
        else:
            results.append(passed(f"step 0: {name}", text))
    if "kd" in raw:
        divergence, bound = raw["kd"] / kd_factor, kd_bound(student_vocabulary)
        value = f"{divergence:.4g} nats at τ_start against log V = {bound:.4g}"
        results.append(
            failed("step 0: KD bound", value + ": worse than a uniform student, as a random projector is",
                   "pre-fit the projector (objective.projector_prefit_steps, objective.projector_residual=true), or "
                   "check that the vocabulary transfer maps onto the right student ids")
            if divergence > bound else passed("step 0: KD bound", value))
    return results


def check_finite_loss(total: float) -> CheckResult:
    if not math.isfinite(total):
        return failed("step: finite loss", f"{total}", "look at the step-0 terms above; lower optimizer.lr or use "
                      "training.mixed_precision=bf16/no")
    return passed("step: finite loss", f"total {total:.4g}")


def check_components_sum(total: float, weighted: dict[str, float]) -> CheckResult:
    value = " + ".join(f"{name} {part:.4g}" for name, part in weighted.items()) + f" = {total:.4g}"
    try:
        check_sum(total, weighted)
    except AssertionError as error:
        return failed("step: components sum to total", value, f"report this: {error}")
    return passed("step: components sum to total", value)


def check_gradients(grad_norm: float, grad_clip: float) -> CheckResult:
    clipped = grad_clip > 0 and grad_norm > grad_clip
    value = f"norm {grad_norm:.4g}" + (f" (clipped to {grad_clip:g})" if clipped else "")
    if not math.isfinite(grad_norm):
        return failed("step: finite gradients", value, "a term's gradient overflows: look at the step-0 terms; with "
                      "fp16 use bf16 or no mixed precision")
    if grad_norm == 0:
        return failed("step: finite gradients", value, "no gradient reaches the trainable parameters: check the "
                      "alphas (objective.lm_alpha, objective.kd_alpha)")
    return passed("step: finite gradients", value)


def check_learning_rates(param_groups: list[dict]) -> CheckResult:
    """Every parameter group's learning rate after the first optimizer step (a warm-up starts at 0)."""
    value = ", ".join(f"{group['name']} {group['lr']:.3g}" for group in param_groups)
    stuck = [group["name"] for group in param_groups if not group["lr"] > 0]
    if stuck:
        return failed("step: learning rate after step 1", value, f"{', '.join(stuck)} at lr 0: check optimizer.lr, "
                      "its multipliers and optimizer.warmup_steps")
    return passed("step: learning rate after step 1", value)


@dataclass
class DtypeProbe:
    """The dtypes a forward produced, by what produced them (forward hooks on the models and the objective): each
    model's compute dtype (its first linear layer's output: what autocast makes of it), its final hidden states, the
    terms' values."""

    seen: dict[str, set[str]] = field(default_factory=dict)

    def note(self, what: str, dtype: torch.dtype) -> None:
        self.seen.setdefault(what, set()).add(dtype_name(dtype))

    @contextlib.contextmanager
    def watching(self, teacher_model, student_model, objective):
        # A forward hook that returns something replaces the module's output: these return None.
        def noting(what: str, read):
            def hook(module, args, output) -> None:
                tensor = read(output)
                if tensor is not None:
                    self.note(what, tensor.dtype)
            return hook

        def noting_terms(module, args, output) -> None:
            for term in output.values():
                self.note("terms", term.value.dtype)

        hooks = [(_first_linear(teacher_model), "teacher compute", lambda output: output),
                 (teacher_model.base_model, "teacher states", lambda output: output.last_hidden_state),
                 (_first_linear(student_model), "student compute", lambda output: output),
                 (student_model, "student states",
                  lambda output: None if output.hidden_states is None else output.hidden_states[-1])]
        handles = [module.register_forward_hook(noting(what, read)) for module, what, read in hooks]
        handles.append(objective.register_forward_hook(noting_terms))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def describe(self) -> str:
        return ", ".join(f"{what} {'/'.join(sorted(dtypes))}" for what, dtypes in self.seen.items())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_linear(model: torch.nn.Module) -> torch.nn.Module:
    return next(module for module in model.modules() if isinstance(module, torch.nn.Linear))


def check_dtypes(training: DtypeProbe, evaluation: DtypeProbe, trainable: dict[str, set[str]],
                 student_compute: str) -> CheckResult:
    """Fails when the student does not compute in `student_compute` in training (the autocast dtype of
    training.mixed_precision, else float32: mixed precision that is not applied), a loss term is not float32 (losses
    upcast their chunks) or a trainable parameter is not (master weights); warns when a model computes in another
    dtype in evaluation than in training (the evaluation then measures other numerics than the ones trained)."""
    parameters = ", ".join(f"{name} {'/'.join(sorted(dtypes))}" for name, dtypes in trainable.items())
    value = f"train: {training.describe()}; eval: {evaluation.describe()}; parameters: {parameters}"
    problems = [f"{phase} terms are {'/'.join(sorted(probe.seen.get('terms', set()) - {'float32'}))}"
                for phase, probe in (("training", training), ("evaluation", evaluation))
                if probe.seen.get("terms", {"float32"}) != {"float32"}]
    if training.seen.get("student compute", {student_compute}) != {student_compute}:
        problems.append(f"the student computes in {'/'.join(sorted(training.seen['student compute']))} in training, "
                        f"not {student_compute}")
    problems += [f"{name} parameters are not float32" for name, dtypes in trainable.items() if dtypes != {"float32"}]
    if problems:
        return failed("dtypes", value, "; ".join(problems) + ": autocast must cover the training forward, losses "
                      "upcast to float32 and trainable parameters keep float32 master weights")
    differing = [f"the {model} computes in {'/'.join(sorted(training.seen[key]))} in training, "
                 f"{'/'.join(sorted(evaluation.seen[key]))} in evaluation"
                 for model in ("teacher", "student") for key in [f"{model} compute"]
                 if key in training.seen and key in evaluation.seen and training.seen[key] != evaluation.seen[key]]
    if differing:
        return warned("dtypes", value, "; ".join(differing) + ": the teacher runs under the step's autocast but "
                      "not in evaluation; models.teacher_dtype in the autocast dtype makes both the same")
    return passed("dtypes", value)


def check_memory(config: Config, device: str, memory_bytes: int | None, processes: int) -> CheckResult:
    """`crosskd plan`'s estimate of the step's peak on one process of `device` against its memory."""
    name = f"memory plan ({device})"
    try:
        plan = plan_memory(config, device, memory_bytes, processes)
    except (ArchitectureError, ModelNotFoundError) as error:
        return warned(name, f"not planned: {error}", "see docs/MEMORY.md for the models the planner knows")
    value = f"peak {format_bytes(plan.total_bytes)} ({plan.peak_phase})"
    if plan.fits is None:
        return passed(name, value + "; no memory size known")
    value += f" of {format_bytes(plan.memory_bytes)}"
    if not plan.fits:
        fix = (f"crosskd train ... {' '.join(plan.suggestions[0].overrides)}" if plan.suggestions
               else "a device with more memory, a smaller student, window or objective.chunk_size")
        return failed(name, value + " does not fit", fix)
    return passed(name, value)


def folder_state(folder: Path) -> list[tuple[str, int, int]] | None:
    """What a folder holds (relative path, size, modification time of every entry); None when it does not exist."""
    if not folder.exists():
        return None
    return sorted((str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
                  for path in folder.rglob("*"))


def check_run_folder(run_dir: Path, before, after) -> CheckResult:
    if before != after:
        return failed("run folder untouched", f"{run_dir} changed while the doctor ran",
                      "report this: the doctor must write nothing into output.run_dir")
    return passed("run folder untouched", f"{run_dir} " + ("absent" if before is None else
                                                          f"unchanged ({len(before)} entries)"))


# --- the runs of checks ---------------------------------------------------------------------------------------------
def _vocab_facts(spec: str, tokenizer) -> VocabFacts:
    """The vocabulary facts `load_model` finds, from the model's config instead of its weights (its output layer has
    `vocab_size` rows)."""
    from transformers import AutoConfig

    source = resolve_spec(spec)
    model_config = load_pretrained(AutoConfig, source)
    model_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return detect_vocab_facts(tokenizer, model_config.vocab_size, source.vocab_record())


def _tokenizer_and_data_checks(config: Config, tokenizers: dict, vocabs: dict, batches: list[DualBatch]):
    return [check_fast_tokenizers(tokenizers), *(check_padded_ids(role, vocabs[role], tokenizers[role])
                                                 for role in ("teacher", "student")),
            check_separators(tokenizers, vocabs), check_alignment(batches), check_run_past_pairs(batches, config)]


def _sample_batches(corpus: TrainingCorpus, config: Config) -> list[DualBatch]:
    """The first training windows of the run's stream, as the loop reads them, in micro-batches."""
    stream = corpus.train_windows(start=0, process_index=0, num_processes=1, batch_size=config.training.batch_size)
    count = max(1, SAMPLE_WINDOWS // config.training.batch_size)
    return [collate_windows(next(stream), corpus.teacher_pad_id) for _ in range(count)]


def fast_checks(config: Config, processes: int = 1) -> DoctorReport:
    """The cheap subset `crosskd train` runs first: tokenizers, vocabularies, separators, alignment on the first
    training windows, the schedule and the temperature. No model is loaded, no forward runs."""
    started = time.perf_counter()
    report = DoctorReport()
    tokenizers, vocabs = {}, {}
    for role in ("teacher", "student"):
        spec = getattr(config.models, role)
        try:
            tokenizers[role] = load_tokenizer(spec, role)
        except ValueError as error:  # a slow tokenizer
            report.checks.append(failed("tokenizers are fast", str(error), "use a fast tokenizer (tokenizer.json)"))
            report.seconds = time.perf_counter() - started
            return report
        vocabs[role] = _vocab_facts(spec, tokenizers[role])
    corpus = TrainingCorpus(config.data, tokenizers["student"], tokenizers["teacher"], vocabs["teacher"].pad_id)
    report.checks += _tokenizer_and_data_checks(config, tokenizers, vocabs, _sample_batches(corpus, config))
    _add_schedule(report, config, corpus.optimizer_steps(config.training, windows_per_step(config.training,
                                                                                             processes)), processes)
    report.seconds = time.perf_counter() - started
    return report


def _add_schedule(report: DoctorReport, config: Config, total_steps: int, processes: int) -> None:
    settings = schedule_settings(config)
    report.checks += schedule_checks(config, settings, total_steps, processes)
    report.schedule = schedule_table(config, settings, total_steps)
    report.not_computed = not_computed_terms(config, settings)


def run_doctor(config: Config, device: str | None = None, memory_bytes: int | None = None,
               processes: int | None = None) -> DoctorReport:
    """Every check on the real models of `config`: the trainer's set-up, one real optimizer step of its first
    micro-batches (on the doctor's own copy of the student: nothing is saved) and one evaluation batch; `device`
    and `memory_bytes` are the memory plan's (default: this machine's device and its memory), `processes` the
    run's data-parallel processes for its length and its memory plan (default: this command's)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.perf_counter()
    run_dir = Path(config.output.run_dir)
    before = folder_state(run_dir)
    report = DoctorReport()
    accelerator = Accelerator(mixed_precision=config.training.mixed_precision)
    precision = MixedPrecision(accelerator, config.training.mixed_precision)
    set_seed(config.training.seed)
    with tempfile.TemporaryDirectory(prefix="crosskd-doctor-") as scratch:
        try:
            with report.timed("set-up"):
                setup = build_training(config, accelerator, stats_path=Path(scratch) / "teacher_stats.safetensors",
                                       resuming=False)
        except Exception as error:  # any set-up error is this check's result: crosskd's messages name the fix
            report.checks.append(failed("models and data load", f"{type(error).__name__}: {error}",
                                        "the message names the fix"))
        else:
            loaded = f"in {time.perf_counter() - started:.0f} s" + (
                f"; {setup.preparation_report}" if setup.preparation_report else "")
            report.checks.append(passed("models and data load", f"teacher {config.models.teacher} "
                                        f"({config.models.teacher_dtype}), student {config.models.student} {loaded}"))
            _step_checks(report, config, setup, accelerator, precision, processes or accelerator.num_processes)
    memory_device = device or accelerator.device.type
    with report.timed("memory plan"):
        report.checks.append(check_memory(config, memory_device, memory_bytes or device_memory(memory_device),
                                          processes or accelerator.num_processes))
    report.checks.append(check_run_folder(run_dir, before, folder_state(run_dir)))
    report.seconds = time.perf_counter() - started
    return report


def _step_checks(report: DoctorReport, config: Config, setup, accelerator, precision, processes: int) -> None:
    teacher, student, objective = setup.teacher, setup.student, setup.objective
    tokenizers = {"teacher": teacher.tokenizer, "student": student.tokenizer}
    vocabs = {"teacher": teacher.vocab, "student": student.vocab}
    with report.timed("windows"):
        report.checks += _tokenizer_and_data_checks(config, tokenizers, vocabs,
                                                    _sample_batches(setup.corpus, config))
    total_steps = (setup.total_steps if processes == accelerator.num_processes else
                   setup.corpus.optimizer_steps(config.training, windows_per_step(config.training, processes)))
    _add_schedule(report, config, total_steps, processes)

    # The first optimizer step as the loop runs it: the first windows of the stream, the schedule at step 0.
    weights, tau = schedule_at(0, setup.total_steps, setup.settings)
    windows = setup.corpus.train_windows(start=0, process_index=accelerator.process_index,
                                         num_processes=accelerator.num_processes, batch_size=config.training.batch_size)
    micro_batches = [collate_windows(next(windows), teacher.vocab.pad_id).to(accelerator.device)
                     for _ in range(config.training.gradient_accumulation_steps)]
    if not objective.lm_only and objective.transfer.teacher_needs(config.objective).topk:
        with torch.no_grad(), report.timed("teacher top-k"):
            signal = objective.teacher_signal(micro_batches[0], weights)
        report.checks.append(check_topk_avoids_padded_ids(signal.topk.ids, teacher.vocab))
    training_dtypes = DtypeProbe()
    with training_dtypes.watching(teacher.model, student.model, objective), report.timed("step"):
        setup.optimizer.zero_grad(set_to_none=True)
        losses = accumulate_gradients(objective, setup.student_forward, setup.objective_forward, precision,
                                      accelerator, micro_batches, weights, tau)
        update = apply_update(precision, accelerator, setup.optimizer, objective.all_trainable(student.model),
                              config.optimizer.grad_clip, losses.total)
    setup.scheduler.step()
    report.checks.append(check_kd_share(losses.counts, objective.switches))
    kd_factor = float(objective.transfer.scaled_kd_sum(torch.ones(()), tau)) if not objective.lm_only else 1.0
    report.checks += check_step0_terms(losses.raw, kd_factor, student.vocab.real_token_count)
    report.checks += [check_finite_loss(update.total), check_components_sum(update.total, losses.weighted),
                      check_gradients(update.grad_norm, config.optimizer.grad_clip),
                      check_learning_rates(setup.optimizer.param_groups)]

    # One evaluation batch, as the trainer's evaluation runs it (no autocast).
    evaluation_dtypes = DtypeProbe()
    eval_batches = setup.corpus.eval_batches(config.training.batch_size, accelerator.device)[:1]
    with evaluation_dtypes.watching(teacher.model, student.model, objective), report.timed("evaluation batch"):
        objective.evaluate_retention(eval_batches, weights, tau)
    trainable = {"student": {dtype_name(p.dtype) for p in student.model.parameters()}}
    for group in objective.parameter_groups():
        if group.parameters:
            trainable[group.name] = {dtype_name(p.dtype) for p in group.parameters}
    autocast = AUTOCAST_DTYPES.get(config.training.mixed_precision, torch.float32)
    report.checks.append(check_dtypes(training_dtypes, evaluation_dtypes, trainable, dtype_name(autocast)))


def device_memory(device: str) -> int | None:
    """The memory of one `device` of this machine (None when there is none to ask)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    import psutil

    return psutil.virtual_memory().total


class DoctorFailed(ConfigError):
    """A check of the run failed before it started; the message lists each with its fix."""


def require_fast_checks(config: Config, processes: int = 1, echo=print) -> DoctorReport:
    """`crosskd train`'s first phase: the fast checks; warnings are echoed, a failure raises DoctorFailed."""
    report = fast_checks(config, processes)
    echo(f"doctor: {len(report.checks)} fast checks, {len(report.failures)} fail, {len(report.warnings)} warn "
         f"({report.seconds:.0f} s; `crosskd doctor CONFIG` runs every check, --no-doctor skips these)")
    for check in report.warnings:
        echo(f"doctor: warn: {check.name}: {check.value}; fix: {check.fix}")
    if report.failures:
        listed = "; ".join(f"{check.name}: {check.value} (fix: {check.fix})" for check in report.failures)
        raise DoctorFailed(f"the run's fast checks failed: {listed}. Fix the config, or pass --no-doctor "
                           "(crosskd.distill(..., doctor=False)) to train anyway; `crosskd doctor CONFIG` runs every "
                           "check")
    return report


def cli_doctor(args) -> int:
    try:
        config = load_config(args.config, args.overrides)
        memory = parse_memory(args.memory) if args.memory is not None else None
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.processes is not None and args.processes < 1:
        print(f"error: --processes must be at least 1, got {args.processes}", file=sys.stderr)
        return 2
    report = fast_checks(config, args.processes or 1) if args.fast else run_doctor(config, args.device, memory,
                                                                                  args.processes)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.describe())
    return 1 if report.failures else 0
