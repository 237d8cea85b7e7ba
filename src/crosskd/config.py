"""The run configuration: dataclasses, YAML/JSON loading, dotted overrides, validation with suggestions.

One file describes a run. Every value travels down from here into the modules; nothing reads the file again.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml



# The benchmark protocol's held-out split of the reference corpus (the Python standard library, data/stdlib.py): these
# files, cut to this many characters, are the held-out text of every default run and of the benchmarks.
HELDOUT_FILES = ("fractions.py", "textwrap.py", "json/decoder.py", "shlex.py")
HELDOUT_CHARS = 24_000


class ConfigError(ValueError):
    """A config that cannot run: the message names the key, the problem and the fix."""


@dataclass
class ModelsConfig:
    # Hub id, local folder, .gguf file, `reference:teacher|student` (crosskd setup-models) or `tiny:teacher|student`.
    teacher: str = "reference:teacher"
    student: str = "reference:student"
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen teacher's weights and forward


@dataclass
class TeacherConfig:
    # online: the teacher runs in every step; cache: its signal is read from `crosskd cache-teacher`'s output.
    source: str = "online"
    cache_dir: str | None = None  # default: <output.run_dir>/teacher-cache


DATA_FORMATS = ("text", "messages", "prompt-completion")
# The built-in instruction set (data/stdlib_chat.py); `python-stdlib-chat:<pattern>` keeps the files matching it.
STDLIB_CHAT_SOURCE = "python-stdlib-chat"


def is_stdlib_chat_source(source: str) -> bool:
    return source.partition(":")[0] == STDLIB_CHAT_SOURCE


@dataclass
class ChatConfig:
    """How conversational rows are read and rendered (data.format `messages` or `prompt-completion`; docs/CHAT.md)."""

    messages_field: str = "messages"  # messages rows: a list of {role, content} turns
    prompt_field: str = "prompt"  # prompt-completion rows: each a string or a list of turns
    completion_field: str = "completion"
    role_field: str = "role"
    content_field: str = "content"
    # The system turn of a conversation that has none. null: none is added, and each chat template does what it does
    # then (Qwen2.5's and SmolLM2's insert their own default system prompts, which differ); a string (even "") is added
    # as the system turn, so both models see the same one.
    system_prompt: str | None = None
    # false: the loss is on the assistant turns only (and each model's end-of-turn token); true: every position.
    train_on_prompts: bool = False
    # true: KD leaves out the pair at each trained turn's first byte (the LM term still trains it): where the teacher's
    # own answers start otherwise than the data's (docs/CHAT.md, "Where KD loses").
    kd_skip_turn_starts: bool = False
    # A chat template (Jinja text, or the path of a .jinja file) for a tokenizer that has none or to replace its own;
    # null: the tokenizer's `chat_template`.
    student_template: str | None = None
    teacher_template: str | None = None


@dataclass
class TeacherTextConfig:
    """Text the teacher writes, added to the training windows (sequence-level distillation; docs/TEACHER_TEXT.md).

    `crosskd write-teacher-text` prompts the teacher with the start of each of the first training windows and samples
    its continuations into `dir`; a run whose `dir` is set trains on those continuations beside its own windows."""

    dir: str | None = None  # null: no teacher text
    # The windows whose starts prompt the teacher: the first this many of the training stream (null:
    # data.max_train_windows, the windows of a small corpus).
    prompt_windows: int | None = None
    prompt_tokens: int = 32  # student tokens of a window's start that make its prompt
    samples_per_window: int = 3
    new_tokens: int = 256  # teacher tokens per continuation, at most (its end-of-text token ends one sooner)
    # Sampling: temperature 1 with top_p 1 draws from the teacher's own distribution, so training on the text is
    # sequence-level forward KL; lower values give likelier, less varied text.
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16  # prompts per generate call


@dataclass
class DataConfig:
    # `python-stdlib`, `python-stdlib-chat` (format messages), a text file / folder / glob, a .jsonl or .parquet
    # file, a datasets folder, builder:files or hub:<dataset id>.
    source: str = "python-stdlib"
    # text: one text field per row (plain text); messages / prompt-completion: conversations (data.chat).
    format: str = "text"
    text_field: str = "text"
    chat: ChatConfig = field(default_factory=ChatConfig)
    window_tokens: int = 256
    # Documents named here form the held-out split (a conversation also by its file or module: all its rows); with
    # none, `eval_fraction` of the documents (seeded) does.
    heldout_documents: list[str] = field(default_factory=lambda: list(HELDOUT_FILES))
    eval_fraction: float = 0.0
    # The held-out text is the concatenation of the held-out documents cut to this many characters (null: all);
    # held-out conversations are taken in order while their turns total at most this many characters.
    eval_max_chars: int | None = HELDOUT_CHARS
    seed: int = 0
    # Train on only the first this many windows of the training stream (null: all of it), repeated every epoch in a
    # new seeded order (the first epoch keeps the stream's): a small corpus, as a user with little text has one.
    max_train_windows: int | None = None
    teacher_text: TeacherTextConfig = field(default_factory=TeacherTextConfig)


KD_BALANCES = ("fixed", "gradient-norm")


@dataclass
class ObjectiveConfig:
    # A registered vocabulary transfer (crosskd.vocab.transfer.TRANSFERS): first-token, chunk-likelihood, projector,
    # uld, student-projection.
    strategy: str = "first-token"
    # A divergence of crosskd.losses.divergences.DIVERGENCES (null: forward_kl); uld is a distance and takes none.
    divergence: str | None = None
    divergence_params: dict[str, float] = field(default_factory=dict)
    kd_top_k: int = 256
    lm_alpha: float = 1.0
    kd_alpha: float = 1.0
    # first-token: where the student's next token runs past the teacher's, the mapped target gives the true token
    # almost no probability (~17 nats, docs/VOCAB.md): `exclude` leaves those pairs out of KD, `merge` pools such
    # student tokens with the token the teacher's maps to (one atom per event both tokenisers can express, every
    # pair kept; the default, docs/VOCAB.md has the comparison), `chain-rule` is merge plus the teacher's split of
    # the group between the observed token and the rest by its chain probability of the observed text (forward KL
    # only; reads the teacher's observed-token log-probabilities), `keep` (ablations only) keeps them as they are. The
    # other strategies have no such pairs and accept only the default.
    mismatch_policy: str = "merge"
    scale_by_t2: bool = True
    # chunk-likelihood (docs/VOCAB.md): the term on the log-likelihoods of the text chunks between shared token
    # boundaries, `bce` (tokenkit's binary cross-entropy of the likelihoods at 1/τ, as a KL: 0 where they agree) or
    # `squared` (their squared difference); τ = 100 is tokenkit's `bce_temp`; the term's constant weight (no warm-up).
    chunk_likelihood_loss: str = "bce"
    chunk_likelihood_temperature: float = 100.0
    chunk_likelihood_weight: float = 1.0
    chunk_size: int = 256  # positions per float32 logit chunk
    # MiB of a micro-batch's float32 log-probability chunks the fused LM + KD loss keeps from the forward for the
    # backward; the chunks past it are freed and recomputed in the backward (one more head matmul and log-softmax
    # each). 0 recomputes every chunk: the least memory. docs/OBJECTIVE.md §7.
    kept_logits_mib: int = 512
    projector_prefit_steps: int = 200
    # The projector adds a teacher-driven correction to the student's own (detached) final state, starting at zero,
    # instead of rebuilding the student's prediction from the teacher's state alone (docs/VOCAB.md).
    projector_residual: bool = True
    # What the projector reads of the teacher: `final_hidden` (its last hidden state, the cheaper input) or
    # `topk_embeddings` (the teacher's output-embedding rows weighted by its renormalised top-k probabilities: a
    # summary of its prediction rather than of its state; a cache stores only the top-k for it).
    projector_features: str = "final_hidden"
    projector_anchor_alpha: float = 1.0
    # How the KD term is weighted against the LM term: `fixed` (kd_alpha and the KD warm-up alone) or
    # `gradient-norm` (each micro-batch, KD is also scaled by the detached ratio of the LM and KD gradient norms at
    # the student's final hidden states, so both terms pull with the same strength there; docs/OBJECTIVE.md).
    kd_balance: str = "fixed"


@dataclass
class RouterConfig:
    enabled: bool = False
    dense: bool = False  # match every teacher layer group instead of routing top-k (same parameter count)
    num_experts: int = 4
    top_k: int = 2
    student_layer: int | None = None  # default: the student's middle layer
    feature_alpha: float = 0.1
    load_balance_alpha: float = 0.01
    importance_alpha: float = 0.01
    layerwise_alpha: float = 0.0
    contrastive_alpha: float = 0.0
    contrastive_temperature: float = 0.1
    attention_alpha: float = 0.0
    attention_layers: list[int] = field(default_factory=list)
    calibration_windows: int = 8


@dataclass
class ScheduleConfig:
    use_curriculum: bool = True
    # τ = 1 throughout: on the benchmark protocol it beat the 2.0 -> 1.5 anneal (docs/BENCHMARKS.md); held-out BPB
    # is measured at τ = 1, and a softened target teaches a flatter distribution than the one evaluated.
    temperature_start: float = 1.0
    temperature_end: float = 1.0
    kd_warmup_start: float = 0.1  # KD weight at p = 0 as a fraction of kd_alpha, reached in full at the end progress
    kd_warmup_end_progress: float = 0.2


@dataclass
class OptimizerConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Learning-rate multipliers per parameter group: the student, auxiliary heads (router, layerwise, contrastive),
    # the projector.
    student_lr_multiplier: float = 1.0
    heads_lr_multiplier: float = 2.0
    projector_lr_multiplier: float = 5.0
    scheduler: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    patience: int = 3  # evaluations without an improvement of at least min_delta
    min_delta: float = 0.001  # in bits per byte
    warmup_steps: int = 0  # optimizer steps before early stopping may trigger


@dataclass
class TrainingConfig:
    max_steps: int | None = 25  # optimizer steps; null: run `epochs` over the training windows
    epochs: int = 1
    batch_size: int = 4  # windows per micro-batch per process
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    # Keep only each student layer's input and recompute the layer in backward: far less activation memory for about
    # one more student forward of time (`crosskd plan` shows how much).
    gradient_checkpointing: bool = False
    # Keep the C allocator's freed memory in the process while training or writing the teacher cache (glibc), so each
    # step's large CPU buffers reuse the last step's instead of fresh pages the kernel maps and zeroes
    # (crosskd.models.allocator).
    keep_freed_memory: bool = True
    seed: int = 0
    max_consecutive_nonfinite: int = 5
    log_every: int = 1
    eval_every: int = 0  # optimizer steps; 0: only before and after training
    checkpoint_every: int = 0  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 2
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class OutputConfig:
    run_dir: str = "runs/reference"
    tensorboard: bool = True


@dataclass
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        path.write_text(self.to_yaml())


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML or JSON file (or only defaults), apply dotted `key=value` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML or JSON file such as configs/reference.yaml")
        text = path.read_text()
        try:
            raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (models, data, objective, ...) at the top level")
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    """A config from a mapping of sections (as a YAML file holds them), with dotted `key=value` overrides applied on
    top; built and validated like a file."""
    raw = copy.deepcopy(dict(raw))
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's mapping of sections as dotted keys: {"training": {"max_steps": 4}} -> {"training.max_steps": 4}."""
    items: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            items.update(flatten_config(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def config_differences(stored: dict[str, Any], config: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ between a stored config (a `to_dict` kept as JSON) and `config`, each as
    `key: stored -> now`; keys in `ignore` are left out."""
    # JSON turns tuples into lists: compare both as JSON keeps them.
    before, now = flatten_config(stored), flatten_config(json.loads(json.dumps(config.to_dict())))
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
            if key not in ignore and before.get(key) != now.get(key)]


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value (e.g. training.max_steps=10)")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
    node[leaf] = yaml.safe_load(value)


def _build(cls, raw: Any, prefix: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the nearest valid one suggested."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in raw if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**values)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
        origin = typing.get_origin(hint)
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 2e-5 as a string
        except ValueError:
            pass
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    # Elements are checked too: a bad list entry would otherwise surface as a crash deep inside the run.
    if expected is list:
        (item_hint,) = typing.get_args(hint)
        return [_check_type(item, item_hint, f"{key}[{index}]") for index, item in enumerate(value)]
    if expected is dict:
        key_hint, value_hint = typing.get_args(hint)
        return {_check_type(name, key_hint, f"{key} key {name!r}"): _check_type(item, value_hint, f"{key}[{name!r}]")
                for name, item in value.items()}
    return value


def check_choice(value: Any, options: tuple, key: str) -> None:
    """`value` of config key `key` must be one of `options` (the nearest one is suggested)."""
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} is {value!r}, which is not one of {', '.join(options)}{hint}")


# Checks of sections whose valid values a registry below the config knows (the vocabulary transfers and divergences
# of crosskd.vocab.transfer): they register here when the package is imported, so the config imports none of them.
_REGISTERED_CHECKS: list[Callable[[Config], None]] = []


def register_config_check(check: Callable[[Config], None]) -> None:
    """Run `check(config)` in every `validate`; it raises ConfigError for a config that cannot run."""
    _REGISTERED_CHECKS.append(check)


def validate(config: Config) -> None:
    """Reject values and combinations that make no sense, saying why."""
    objective, router, training = config.objective, config.router, config.training
    for check in _REGISTERED_CHECKS:
        check(config)
    check_choice(config.models.teacher_dtype, ("float32", "bfloat16", "float16"), "models.teacher_dtype")
    check_choice(training.mixed_precision, ("no", "fp16", "bf16"), "training.mixed_precision")
    check_choice(config.optimizer.scheduler, ("cosine", "constant"), "optimizer.scheduler")
    check_choice(config.teacher.source, ("online", "cache"), "teacher.source")
    check_choice(config.objective.kd_balance, KD_BALANCES, "objective.kd_balance")
    check_choice(config.data.format, DATA_FORMATS, "data.format")
    if is_stdlib_chat_source(config.data.source) and config.data.format != "messages":
        raise ConfigError(f"data.source {config.data.source!r} is a set of conversations: set data.format=messages "
                          f"(data.format is {config.data.format!r})")
    if config.data.max_train_windows is not None and config.data.max_train_windows < 1:
        raise ConfigError(f"data.max_train_windows must be at least 1 or null (all windows), got "
                          f"{config.data.max_train_windows}")
    _check_teacher_text(config.data)
    if objective.kd_top_k < 1:
        raise ConfigError("objective.kd_top_k must be at least 1")
    if objective.chunk_size < 1:
        raise ConfigError(f"objective.chunk_size must be at least 1, got {objective.chunk_size}")
    if objective.kept_logits_mib < 0:
        raise ConfigError(f"objective.kept_logits_mib must be 0 (recompute every chunk in the backward) or more, got "
                          f"{objective.kept_logits_mib}")
    if config.data.window_tokens < 2:
        raise ConfigError("data.window_tokens must be at least 2: a window predicts its next tokens")
    if not 0.0 <= config.data.eval_fraction < 1.0:
        raise ConfigError("data.eval_fraction must be in [0, 1)")
    if not config.data.heldout_documents and config.data.eval_fraction == 0.0:
        raise ConfigError("no held-out split: set data.heldout_documents or data.eval_fraction > 0")
    if router.enabled and not 1 <= router.top_k <= router.num_experts:
        raise ConfigError(f"router.top_k ({router.top_k}) must be between 1 and router.num_experts ({router.num_experts})")
    if training.max_steps is not None and training.max_steps < 1:
        raise ConfigError("training.max_steps must be at least 1 (or null to run training.epochs)")
    for key in ("batch_size", "gradient_accumulation_steps", "epochs", "max_consecutive_nonfinite", "log_every"):
        if getattr(training, key) < 1:
            raise ConfigError(f"training.{key} must be at least 1")
    if config.schedule.temperature_start <= 0 or config.schedule.temperature_end <= 0:
        raise ConfigError("schedule temperatures must be positive")
    _check_optimizer(config.optimizer)
    if config.teacher.source == "cache":
        require_cacheable_terms(config)


def _check_teacher_text(data: DataConfig) -> None:
    text = data.teacher_text
    if text.dir is None:
        return
    if data.format != "text":
        raise ConfigError(f"data.teacher_text is for plain text; data.format is {data.format!r}: set "
                          "data.teacher_text.dir=null for conversations")
    if text.prompt_windows is None and data.max_train_windows is None:
        raise ConfigError("data.teacher_text.prompt_windows is null and so is data.max_train_windows: set one of them "
                          "to the number of training windows whose starts prompt the teacher")
    for key in ("prompt_tokens", "samples_per_window", "new_tokens", "batch_size"):
        if getattr(text, key) < 1:
            raise ConfigError(f"data.teacher_text.{key} must be at least 1, got {getattr(text, key)}")
    if text.prompt_windows is not None and text.prompt_windows < 1:
        raise ConfigError(f"data.teacher_text.prompt_windows must be at least 1 or null, got {text.prompt_windows}")
    if text.prompt_tokens >= data.window_tokens:
        raise ConfigError(f"data.teacher_text.prompt_tokens ({text.prompt_tokens}) must be below data.window_tokens "
                          f"({data.window_tokens}): a prompt is the start of a window")
    if text.temperature <= 0 or not 0 < text.top_p <= 1:
        raise ConfigError(f"data.teacher_text needs temperature > 0 and 0 < top_p <= 1, got temperature "
                          f"{text.temperature}, top_p {text.top_p}")


def _check_optimizer(optimizer: OptimizerConfig) -> None:
    """What AdamW would refuse only after the models have loaded, refused here naming the key."""
    for key in ("lr", "weight_decay", "student_lr_multiplier", "heads_lr_multiplier", "projector_lr_multiplier",
                "warmup_steps", "grad_clip"):
        if getattr(optimizer, key) < 0:
            raise ConfigError(f"optimizer.{key} must not be negative, got {getattr(optimizer, key)}")
    betas = optimizer.betas
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError(f"optimizer.betas must be two values in [0, 1) (AdamW's averaging factors, e.g. "
                          f"[0.9, 0.999]), got {betas}")


# Why each intermediate-layer term cannot be served by a teacher cache (crosskd cache-teacher stores what the
# vocabulary-level target needs: the top-k at aligned pairs, or the final hidden state there for the projector).
_UNCACHEABLE_TERMS = {
    "attention_alpha": "attention alignment needs the teacher's attention maps (heads x M x M per layer and window)",
    "layerwise_alpha": "layerwise matching needs every teacher layer's hidden state at every aligned pair "
                       "(layers x hidden x 2 bytes per position, ~43 KB on the reference teacher)",
    "feature_alpha": "the router needs the teacher's per-layer-group hidden states, which this cache does not store",
    "contrastive_alpha": "the contrastive term needs the teacher's hidden states at every window position, which "
                         "this cache does not store",
}


def require_cacheable_terms(config: Config) -> None:
    """A cached teacher serves the KD target only; terms that need more are refused, never silently dropped."""
    if not config.router.enabled:
        return
    for key, reason in _UNCACHEABLE_TERMS.items():
        if getattr(config.router, key) > 0:
            raise ConfigError(
                f"router.{key} is {getattr(config.router, key)} but a teacher cache cannot serve it: {reason}. "
                f"Set router.{key}=0 (or router.enabled=false), or run the teacher online with teacher.source=online"
            )
