"""`crosskd plan`: the peak memory of a run's training step, from its config and the two model configs, and the
switches that make it fit.

A step's memory is split into components, each held for a phase:
- static, held all through the step: the frozen teacher in its dtype (loaded in cache mode too: the trainer still
  measures its BPB, docs/CACHE.md), the student's float32 master weights, AdamW's two float32 states per trainable
  parameter, the objective's own modules (projector, heads) with their gradients and states; the gradients too when
  micro-batches accumulate into them; data-parallel gradient buckets; on CPU the host runtime (measured);
- the teacher's forward (online teacher, not LM-only): one layer's working set for the micro-batch, the hidden states
  the terms keep, and the top-k over whole-vocabulary logit chunks;
- the student's forward and backward, at the start of backward where it peaks: every layer's saved activations
  (with gradient checkpointing: only each layer's input, plus one layer recomputed), the 16-bit weight copies
  autocast keeps, the teacher signal the terms read, the chunked LM + KD loss's [chunk, V] float32 buffers and the
  first gradient it writes (the output embedding's);
- the optimizer step: every gradient (float32, like the master weights).
The peak is the static part plus the largest phase. Shapes are taken at their largest: teacher windows as long as the
student's, every student position an aligned pair.

The GPU figure estimates `torch.cuda.max_memory_allocated` (tensors only). The CPU figure is a process's peak RSS, so
it adds a host baseline measured in a fresh process: the Python/torch runtime with everything a run imports, both
tokenizers and the corpus documents. Validation: docs/MEMORY.md, bench/memory_plan.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

from accelerate import init_empty_weights

from crosskd.config import Config, ConfigError, load_config, require_cacheable_terms, validate
from crosskd.losses.heads import build_feature_heads
from crosskd.losses.lm import kept_chunks
from crosskd.models.loading import ModelNotFoundError
from crosskd.models.memory import DTYPE_BYTES, FLOAT32_BYTES, ArchitectureError, ArchitectureFacts, architecture_facts
from crosskd.schedules import schedule_settings
from crosskd.train.objective import TermSwitches
from crosskd.vocab.transfer import transfer_class

DEVICES = ("cuda", "cpu")
STATIC, TEACHER_FORWARD, STUDENT_STEP, OPTIMIZER_STEP = "static", "teacher forward", "student step", "optimizer step"
PHASES = (TEACHER_FORWARD, STUDENT_STEP, OPTIMIZER_STEP)
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, float32, one of each per trainable parameter
# A plan fits when its estimate is at most this share of the memory: the CUDA context (hundreds of MiB, outside
# max_memory_allocated), the caching allocator's fragmentation and the estimate's own error need the rest.
USABLE_FRACTION = 0.9
# The cards planned for when no --memory is given: (memory, whether they compute in bfloat16). The 16 GB ones
# (P100, T4, V100) have no bfloat16, so their suggestions use float16.
CARDS = {"16GiB (P100, T4, V100-16)": (16 * 2**30, False), "24GiB (A10, L4, RTX 4090)": (24 * 2**30, True),
         "40GiB (A100-40)": (40 * 2**30, True), "80GiB (A100-80, H100)": (80 * 2**30, True)}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    phase: str  # STATIC or one of PHASES
    detail: str  # how the figure was made, in the config's and the models' terms


@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]  # dotted overrides for `crosskd train CONFIG ...`
    total_bytes: int
    note: str


@dataclass
class MemoryPlan:
    device: str
    components: list[Component]
    memory_bytes: int | None = None
    suggestions: list[Suggestion] = field(default_factory=list)

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def total_bytes(self) -> int:
        return self.phase_bytes(STATIC) + self.phase_bytes(self.peak_phase)

    @property
    def fits(self) -> bool | None:
        return None if self.memory_bytes is None else self.total_bytes <= USABLE_FRACTION * self.memory_bytes

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "components": [dataclasses.asdict(c) for c in self.components],
            "phases": {phase: self.phase_bytes(phase) for phase in (STATIC, *PHASES)},
            "peak_phase": self.peak_phase,
            "total_bytes": self.total_bytes,
            "memory_bytes": self.memory_bytes,
            "usable_fraction": USABLE_FRACTION,
            "fits": self.fits,
            "suggestions": [dataclasses.asdict(s) for s in self.suggestions],
        }

    def describe(self) -> str:
        width = max(len(c.name) for c in self.components)
        lines = [f"{'component':{width}}  {'phase':15} {'MiB':>9}  how"]
        for c in self.components:
            peak = " " if c.phase in (STATIC, self.peak_phase) else "~"
            lines.append(f"{c.name:{width}}  {c.phase:15} {c.bytes / 2**20:9.1f}{peak} {c.detail}")
        lines.append(f"peak ({STATIC} + {self.peak_phase}; ~ marks phases that are not the peak): "
                     f"{format_bytes(self.total_bytes)} on {self.device}")
        if self.memory_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{verdict} in {format_bytes(self.memory_bytes)} (a plan fits when it needs at most "
                         f"{USABLE_FRACTION:.0%} of it)")
        for suggestion in self.suggestions:
            lines.append(f"  fits with {format_bytes(suggestion.total_bytes)}: {' '.join(suggestion.overrides)}"
                         f"{'  (' + suggestion.note + ')' if suggestion.note else ''}")
        if self.fits is False and not self.suggestions:
            lines.append("  no combination of micro-batch, accumulation and switches fits: use a card with more "
                         "memory or a smaller student, window or vocabulary chunk")
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def parse_memory(text: str) -> int:
    """'16GiB', '24 GB', '40G', '81920MiB' -> bytes (GiB/MiB/G binary, GB/MB decimal)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--memory {text!r} is not a memory size; write a positive number with a unit, e.g. "
                          "16GiB, 24GB or 81920MiB")
    return int(float(match.group(1)) * _UNITS[unit])


# --- the estimate ---------------------------------------------------------------------------------------------------
def _objective_parameters(config: Config, teacher: ArchitectureFacts, student: ArchitectureFacts) -> int:
    """Trainable parameters of the objective's own modules (the transfer's and the feature heads), built by the
    constructions a run uses with their parameters on the meta device (accelerate's `init_empty_weights`)."""
    with init_empty_weights():
        modules = list(transfer_class(config.objective).build_modules(config.objective, teacher.hidden_size,
                                                                      student.hidden_size).values())
        modules += build_feature_heads(config.router, schedule_settings(config), teacher.hidden_size, teacher.layers,
                                       student.hidden_size, student.layers).all()
    return sum(p.numel() for module in modules for p in module.parameters() if p.requires_grad)


def _count_detail(count: int, what: str, each: int, unit: str = "bytes") -> str:
    return f"{count:,} {what} x {each} {unit}"


def estimate_components(config: Config, teacher: ArchitectureFacts, student: ArchitectureFacts, device: str,
                        processes: int = 1) -> list[Component]:
    """The components of one training step's memory on one process (see the module docstring)."""
    training, objective = config.training, config.objective
    terms = TermSwitches.of(config)
    online = config.teacher.source == "online" and not terms.lm_only
    batch, window = training.batch_size, config.data.window_tokens
    tokens = batch * window  # student positions; also the teacher's (its windows taken as long) and the pairs
    activation = FLOAT32_BYTES if training.mixed_precision == "no" else 2
    teacher_bytes = DTYPE_BYTES[config.models.teacher_dtype]
    student_parameters = student.parameters
    heads = _objective_parameters(config, teacher, student)
    trainable = student_parameters + heads
    chunk = objective.chunk_size

    components = [
        Component("teacher weights", teacher.parameters * teacher_bytes, STATIC,
                  _count_detail(teacher.parameters, "parameters", teacher_bytes,
                                f"bytes ({config.models.teacher_dtype})")),
        Component("student weights", student_parameters * FLOAT32_BYTES, STATIC,
                  _count_detail(student_parameters, "parameters", FLOAT32_BYTES, "bytes (float32 master weights)")),
        Component("AdamW states", ADAMW_STATES * trainable * FLOAT32_BYTES, STATIC,
                  _count_detail(trainable, "trainable parameters", ADAMW_STATES * FLOAT32_BYTES,
                              "bytes (exp_avg, exp_avg_sq)")),
    ]
    if heads:
        components.append(Component("objective modules", 2 * heads * FLOAT32_BYTES, STATIC,
                                    _count_detail(heads, "projector/head parameters", 2 * FLOAT32_BYTES,
                                                "bytes (weights + gradients)")))
    gradients_phase = STATIC if training.gradient_accumulation_steps > 1 else OPTIMIZER_STEP
    components.append(Component(
        "student gradients", student_parameters * FLOAT32_BYTES, gradients_phase,
        _count_detail(student_parameters, "parameters", FLOAT32_BYTES, "bytes")
        + (" (kept across the accumulated micro-batches)" if gradients_phase == STATIC else " (all, at the update)")))
    if processes > 1:
        components.append(Component("data-parallel buckets", trainable * FLOAT32_BYTES, STATIC,
                                    f"DDP's flat copy of every gradient, {processes} processes"))

    if online:
        working = tokens * teacher.forward_working_bytes_per_token(teacher_bytes)
        components.append(Component("teacher forward", working, TEACHER_FORWARD,
                                    f"{tokens:,} positions x one layer's working set (no gradients)"))
        topk_rows = min(tokens, chunk)
        float_copy = 0 if teacher_bytes == FLOAT32_BYTES else FLOAT32_BYTES
        # The head's logits of a chunk, their float32 copy, then per 128-row sub-chunk a masked copy, its top-k
        # complement and the log-sum-exp temporary (losses/target.py).
        topk = topk_rows * teacher.logit_size * (teacher_bytes + float_copy) \
            + 3 * min(topk_rows, 128) * teacher.logit_size * FLOAT32_BYTES
        components.append(Component("teacher top-k logits", topk, TEACHER_FORWARD,
                                    f"[{topk_rows}, {teacher.logit_size:,}] logit chunks reduced to the top-k"))
    kept_states = (teacher.layers + 1 if terms.hidden_states else 1) * tokens * teacher.hidden_size * teacher_bytes
    if online:
        components.append(Component(
            "teacher hidden states", kept_states, TEACHER_FORWARD,
            f"{'every layer' if terms.hidden_states else 'the last layer'}: "
            f"[{batch}, {window}, {teacher.hidden_size}]"))

    if not terms.lm_only:
        # The signal the student's terms read: top-k ids (int64) and log-probabilities, the target mapped onto the
        # student's vocabulary (ids, log-probabilities, mask), the final hidden state at the pairs.
        top_k = objective.kd_top_k
        signal = tokens * (top_k * (8 + 4) + top_k * (8 + 4 + 1) + teacher.hidden_size * teacher_bytes)
        if terms.hidden_states:
            signal += kept_states
        if terms.attentions:
            signal += teacher.layers * batch * teacher.attention_heads * window * window * teacher_bytes
        components.append(Component("teacher signal", signal, STUDENT_STEP,
                                    f"top-{top_k} at {tokens:,} pairs, final hidden states"
                                    + (", every layer's hidden states" if terms.hidden_states else "")
                                    + (", attention maps" if terms.attentions else "")))
    per_layer = student.layer_saved_bytes_per_token(activation)
    if terms.attentions:  # eager attention keeps its float32 softmax and its cast copy for every head
        per_layer += student.attention_heads * window * (FLOAT32_BYTES + activation)
    final_norm = student.final_norm_saved_bytes_per_token()
    # The backward of a layer creates the gradients of its intermediates before it frees what the layer saved:
    # about one more layer's worth (measured on the tiny student, whose 4 layers make it visible).
    backward_working_set = per_layer
    if training.gradient_checkpointing:
        layer_inputs = student.layers * student.hidden_size * FLOAT32_BYTES
        activations = tokens * (layer_inputs + per_layer + backward_working_set + final_norm)
        how = (f"{tokens:,} positions x ({student.layers} layer inputs + one layer recomputed and its backward, "
               f"{per_layer:,} bytes each)")
    else:
        activations = tokens * (student.layers * per_layer + backward_working_set + final_norm)
        how = (f"{tokens:,} positions x ({student.layers} layers + one layer's backward) x {per_layer:,} bytes "
               "saved for backward")
    components.append(Component("student activations", activations, STUDENT_STEP, how))
    if activation != FLOAT32_BYTES:
        components.append(Component("autocast weight copies", student_parameters * activation, STUDENT_STEP,
                                    f"16-bit copies of the student's weights ({training.mixed_precision})"))
    loss_rows = min(tokens, chunk)
    vocab = student.logit_size
    # Backward of one chunk: logits, log-probabilities, their gradient and the logits' gradient, plus the forward's
    # two; each chunk's checkpoint keeps its gathered hidden rows, and the first chunks keep their log-probabilities
    # within objective.kept_logits_mib (the float32 master head needs no copy).
    kept_rows = loss_rows * kept_chunks([loss_rows] * -(-tokens // loss_rows), vocab,
                                        objective.kept_logits_mib * 2**20)
    loss = (6 * loss_rows + kept_rows) * vocab * FLOAT32_BYTES + tokens * student.hidden_size * activation
    components.append(Component("LM/KD loss chunks", loss, STUDENT_STEP,
                                f"6 x [{loss_rows}, {vocab:,}] float32 + [{kept_rows}, {vocab:,}] float32 kept "
                                "log-probabilities + the gathered rows of every chunk"))
    head = student.output_embedding_parameters * FLOAT32_BYTES
    components.append(Component("output embedding gradient", 2 * head, STUDENT_STEP,
                                f"[{vocab:,}, {student.hidden_size}] float32: the gradient and one chunk's "
                                "contribution, the first the backward writes"))
    if device == "cpu":
        runtime = host_baseline_bytes(config.models.teacher, config.models.student,
                                      json.dumps(dataclasses.asdict(config.data)))
        components.append(Component("host runtime (measured)", runtime, STATIC,
                                    "RSS of a fresh process with the trainer's imports, both tokenizers and the "
                                    "corpus documents"))
    return components


_HOST_BASELINE = """
import json, sys, psutil
import crosskd.train.recipe  # every module a training run imports
from crosskd.config import config_from_dict
from crosskd.data.corpus import load_corpus_documents
from crosskd.models.loading import load_tokenizer
teacher, student, data = sys.argv[1:4]
kept = (load_tokenizer(teacher, "teacher"), load_tokenizer(student, "student"),
        load_corpus_documents(config_from_dict({"data": json.loads(data)}).data))
print(psutil.Process().memory_info().rss)
"""


@functools.cache
def host_baseline_bytes(teacher: str, student: str, data: str) -> int:
    """The resident memory a CPU run holds before any weight: measured in a fresh interpreter, because this one's
    RSS holds whatever its caller has loaded. `data`: the config's data section as JSON (the corpus it reads)."""
    out = subprocess.run([sys.executable, "-c", _HOST_BASELINE, teacher, student, data],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring the host baseline failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


# --- switches and suggestions ---------------------------------------------------------------------------------------
def _switches(config: Config, bf16: bool) -> list[tuple[str, ...]]:
    """Each switch that lowers memory and is not on yet, as dotted overrides, cheapest in speed and quality first."""
    half = "bfloat16" if bf16 else "float16"
    switches = []
    if config.models.teacher_dtype == "float32":
        switches.append((f"models.teacher_dtype={half}",))
    if config.training.mixed_precision == "no":
        switches.append((f"training.mixed_precision={'bf16' if bf16 else 'fp16'}",))
    if not config.training.gradient_checkpointing:
        switches.append(("training.gradient_checkpointing=true",))
    if config.teacher.source == "online":
        try:
            require_cacheable_terms(config)
            switches.append(("teacher.source=cache",))
        except ConfigError:
            pass  # a term this run has needs the online teacher
    return switches


def with_overrides(config: Config, overrides: tuple[str, ...]) -> Config:
    """A validated copy of `config` with dotted `section.key=value` overrides applied."""
    import yaml

    changed = copy.deepcopy(config)
    for override in overrides:
        key, _, value = override.partition("=")
        *sections, leaf = key.split(".")
        node = changed
        for section in sections:
            node = getattr(node, section)
        setattr(node, leaf, yaml.safe_load(value))
    validate(changed)
    return changed


def _micro_batch_overrides(config: Config, micro_batch: int) -> tuple[str, ...]:
    windows = config.training.batch_size * config.training.gradient_accumulation_steps
    return (f"training.batch_size={micro_batch}", f"training.gradient_accumulation_steps={windows // micro_batch}")


def suggest(config: Config, teacher: ArchitectureFacts, student: ArchitectureFacts, device: str, memory: int,
            processes: int = 1, bf16: bool = True, limit: int = 4) -> list[Suggestion]:
    """Configurations that fit in `memory` and train on the same windows per step: for each set of switches (fewest
    first), the largest micro-batch that divides the step's windows, with the accumulation that restores them.
    A suggestion is dropped when an earlier one uses a subset of its switches with at least its micro-batch."""
    windows = config.training.batch_size * config.training.gradient_accumulation_steps
    micro_batches = [b for b in range(config.training.batch_size, 0, -1) if windows % b == 0]
    switches = _switches(config, bf16)
    found: list[tuple[frozenset, int, Suggestion]] = []
    for count in range(len(switches) + 1):
        for chosen in itertools.combinations(switches, count):
            chosen_set = frozenset(chosen)
            for micro_batch in micro_batches:
                if any(kept <= chosen_set and kept_batch >= micro_batch for kept, kept_batch, _ in found):
                    break  # dominated: an earlier suggestion needs fewer switches for as large a micro-batch
                overrides = tuple(o for switch in chosen for o in switch)
                if micro_batch != config.training.batch_size:
                    overrides += _micro_batch_overrides(config, micro_batch)
                changed = with_overrides(config, overrides)
                plan = MemoryPlan(device, estimate_components(changed, teacher, student, device, processes), memory)
                if plan.fits:
                    note = "run `crosskd cache-teacher` with the same config first" if "teacher.source=cache" in \
                        overrides else ""
                    found.append((chosen_set, micro_batch, Suggestion(overrides, plan.total_bytes, note)))
                    break
    found.sort(key=lambda item: (len(item[0]), -item[1]))
    return [suggestion for _, _, suggestion in found[:limit]]


def plan_memory(config: Config, device: str = "cuda", memory_bytes: int | None = None, processes: int = 1,
                bf16: bool = True) -> MemoryPlan:
    """The memory plan of `config`'s training step on one process of `device`; with `memory_bytes`, whether it fits
    and, when it does not, the suggestions. The function `crosskd doctor` calls as one check."""
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {processes}")
    teacher, student = architecture_facts(config.models.teacher), architecture_facts(config.models.student)
    plan = MemoryPlan(device, estimate_components(config, teacher, student, device, processes), memory_bytes)
    if plan.fits is False:
        plan.suggestions = suggest(config, teacher, student, device, memory_bytes, processes, bf16)
    return plan


def cli_plan(args) -> int:
    try:
        config = load_config(args.config, args.overrides)
        if args.memory is not None:
            plans = {args.memory: plan_memory(config, args.device, parse_memory(args.memory), args.processes,
                                              bf16=not args.no_bf16)}
        else:
            plans = {card: plan_memory(config, args.device, memory, args.processes, bf16=bf16 and not args.no_bf16)
                     for card, (memory, bf16) in CARDS.items()}
    except (ConfigError, ArchitectureError, ModelNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({card: plan.to_dict() for card, plan in plans.items()}, indent=1))
        return 0
    first, *others = plans.values()
    print(first.describe())
    for card, plan in zip(list(plans)[1:], others):
        best = plan.suggestions[0] if plan.suggestions else None
        verdict = "fits" if plan.fits else (f"fits with {' '.join(best.overrides)}" if best else "does not fit")
        print(f"{card}: {verdict}")
    return 0
