"""The distillation objective of one run: which terms, how they are computed, how they are weighted and normalised.

Terms come back as sums over positions (per-token terms) or per-micro-batch values (batch-statistic terms);
`combine` divides the per-token sums by the valid-position counts of the WHOLE optimizer step (every micro-batch,
every process; `crosskd.losses.selection.step_counts`), so gradient accumulation and data parallelism give the same
gradient as one large batch. Batch-statistic terms cannot be made equivalent; each micro-batch's value is averaged
over micro-batches and processes.

The vocabulary transfer (`objective.strategy`, a class of the registry in crosskd.vocab.transfer) supplies the KD
target and its per-chunk loss, the pairs it trains on, its preparation, extra terms and parameters; this module runs
the fused LM + KD chunk loop over them and adds the intermediate-layer terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from crosskd.config import Config
from crosskd.data.collate import DualBatch
from crosskd.losses import calibration
from crosskd.losses.attention import attention_alignment_loss, attention_layer_pairs
from crosskd.losses.calibration import HiddenStateStats
from crosskd.losses.divergences import get_divergence
from crosskd.losses.heads import build_feature_heads
from crosskd.losses.lm import chunked_cross_entropy, fused_chunked_losses, student_forward_kwargs
from crosskd.losses.selection import PositionSelection, select_positions, step_counts
from crosskd.losses.target import support_atoms
from crosskd.losses.terms import PER_BATCH, PER_TOKEN, Term
from crosskd.schedules import ScheduleSettings, schedule_settings
from crosskd.teacher.cache import open_teacher_cache
from crosskd.teacher.online import OnlineTeacher, TeacherSignal
from crosskd.vocab.transfer import ParameterGroup, VocabularyTransfer, transfer_class


@dataclass(frozen=True)
class CombinedLoss:
    """A micro-batch's share of the step loss, with its components: `weighted` (they add up to `total`) and `raw`
    (each term before its weight: what a head optimises; KD with its τ² factor); both are this process's shares."""

    total: Tensor
    weighted: dict[str, float]
    raw: dict[str, float]


@dataclass(frozen=True)
class TermSwitches:
    """What a config's terms need of the teacher during the steps, from the config alone (the objective and
    `crosskd plan` read the same rules)."""

    lm_only: bool  # plain fine-tuning (KD weight 0, no extra or feature terms): the teacher is not run in the steps
    hidden_states: bool  # a feature head or attention alignment reads every teacher layer's hidden states
    attentions: bool  # attention alignment reads attention maps (eager attention on both sides)

    @classmethod
    def of(cls, config: Config, settings: ScheduleSettings | None = None) -> TermSwitches:
        """The switches of `config` under `settings` (by default the config's own schedule, `schedule_settings`)."""
        settings = settings or schedule_settings(config)
        heads = any(alpha > 0 for alpha in (settings.feature_alpha, settings.layerwise_alpha,
                                            settings.contrastive_alpha))
        attentions = settings.attention_alpha > 0
        hidden_states = heads or attentions
        extra_terms = bool(transfer_class(config.objective).extra_term_names)
        return cls(lm_only=settings.kd_alpha == 0 and not extra_terms and not hidden_states,
                   hidden_states=hidden_states, attentions=attentions)


class DistillationObjective(nn.Module):
    """Holds the trainable parts of the objective (the transfer's modules, the feature heads) and computes every term
    of a micro-batch from the teacher signal and the student's outputs.

    The teacher and the student are deliberately not submodules: the student is prepared by accelerate on its own,
    and the frozen teacher must not be wrapped for data parallelism or saved in checkpoints. The training loop runs
    both forwards itself and hands their results to `forward`; pre-fit and retention run the plain student.
    """

    def __init__(self, config: Config, teacher, student, settings: ScheduleSettings):
        super().__init__()
        objective = config.objective
        self.config = config
        self.settings = settings
        self.switches = TermSwitches.of(config, settings)
        self.lm_alpha = objective.lm_alpha
        self.kd_balance = objective.kd_balance
        self.chunk_size = objective.chunk_size
        self.kept_logit_bytes = objective.kept_logits_mib * 2**20
        self._student = [student.model]  # a list hides it from nn.Module registration
        transfer_type = transfer_class(objective)
        needs = transfer_type.teacher_needs(objective)
        self.teacher_source = (
            open_teacher_cache(config, needs, teacher, student.tokenizer) if config.teacher.source == "cache"
            else OnlineTeacher(teacher.model, teacher.vocab.valid_mask, objective.kd_top_k, objective.chunk_size, needs)
        )
        # Built before the feature heads: module creation order is the order the random initialisations are drawn.
        self.transfer: VocabularyTransfer = transfer_type(config, teacher, student)
        for name, module in self.transfer.modules().items():
            self.add_module(name, module)  # checkpoint keys `objective.<name>.*`
        self._build_feature_heads(config, teacher.model, student.model)
        self._diagnostics: dict[str, float] = {}
        self._teacher_diagnostics: dict[str, float] = {}

    def _build_feature_heads(self, config: Config, teacher_model, student_model) -> None:
        """The intermediate-layer terms that are switched on (alpha > 0), each with its learned head."""
        router, settings = config.router, self.settings
        t_hidden, t_layers = teacher_model.config.hidden_size, teacher_model.config.num_hidden_layers
        s_hidden, s_layers = student_model.config.hidden_size, student_model.config.num_hidden_layers
        heads = build_feature_heads(router, settings, t_hidden, t_layers, s_hidden, s_layers)
        self.matcher, self.layerwise, self.contrastive = heads.matcher, heads.layerwise, heads.contrastive
        self.attention_layer_pairs = (
            attention_layer_pairs(router.attention_layers or [s_layers // 2], s_layers, t_layers)
            if settings.attention_alpha > 0 else ()
        )
        if self.attention_layer_pairs:
            # Attention weights exist only in the eager implementation (sdpa/flash never build them).
            for model in (teacher_model, student_model):
                model.set_attn_implementation("eager")
        self.stats: HiddenStateStats | None = None

    @property
    def student_model(self) -> nn.Module:
        """The plain student model (not the data-parallel wrapper): its output embedding is the LM head the losses
        read, and pre-fit and retention run it."""
        return self._student[0]

    @property
    def heads(self) -> list[nn.Module]:
        return [head for head in (self.matcher, self.layerwise, self.contrastive) if head is not None]

    @property
    def uses_hidden_states(self) -> bool:
        return self.switches.hidden_states

    def _calibration_layers(self) -> tuple[int, ...]:
        layers = {layer for head in (self.matcher, self.layerwise) if head is not None for layer in head.teacher_layers}
        if self.contrastive is not None:
            layers.add(self.contrastive.teacher_layer)
        return tuple(sorted(layers))

    # --- parameters ---------------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[ParameterGroup]:
        """The objective's trainable parameters by learning-rate group: the feature heads, then the transfer's."""
        heads = ParameterGroup("heads", [p for head in self.heads for p in head.parameters()],
                               self.config.optimizer.heads_lr_multiplier)
        return [heads, *self.transfer.parameter_groups()]

    def all_trainable(self, student_model: nn.Module) -> list[nn.Parameter]:
        return [p for p in student_model.parameters() if p.requires_grad] + [
            p for p in self.parameters() if p.requires_grad
        ]

    # --- preparation --------------------------------------------------------------------------------------------------
    @property
    def needs_preparation(self) -> bool:
        return self.transfer.needs_preparation or bool(self.heads)

    def prepare(self, batches: list, device, stats_path: Path, resuming: bool) -> str | None:
        """Fit what must be sane before the first step, on training batches the loop does not start with; returns
        the transfer's line for the log (None when it has none or the run resumes).

        The teacher's hidden-state statistics (for the feature terms) are estimated once and stored with the run;
        then the transfer prepares itself (the projector's pre-fit). A resumed run reads the statistics back and
        gets the transfer's parameters from its checkpoint.
        """
        if self.heads:
            if stats_path.is_file():
                self.stats = HiddenStateStats.load(stats_path)
            else:
                self.stats = calibration.estimate(
                    ((self.teacher_source.signal(b, hidden_states=True).hidden_states, b.teacher_attention_mask)
                     for b in self._calibration_batches(batches)),
                    self._calibration_layers(),
                )
                self.stats.save(stats_path)
        if not self.transfer.needs_preparation or resuming:
            return None
        return self.transfer.prepare(batches, self.teacher_source.signal, self.student_model, device)

    def _calibration_batches(self, batches: list) -> list:
        """The first batches holding at least `router.calibration_windows` windows."""
        wanted, taken, windows = self.config.router.calibration_windows, [], 0
        for batch in batches:
            if windows >= wanted:
                break
            taken.append(batch)
            windows += len(batch.student_input_ids)
        return taken

    def diagnostics(self) -> dict[str, float]:
        """Router health for the logs (each expert's token share, gate entropy, each group's error) and an MoE
        teacher's expert-usage entropy (lowest and mean over its layers) on the last micro-batch."""
        return {**self._diagnostics, **self._teacher_diagnostics}

    # --- one micro-batch ----------------------------------------------------------------------------------------------
    def select(self, batch: DualBatch) -> PositionSelection:
        """The positions every term of `batch` trains on (and the step's counts are made of)."""
        return select_positions(batch, self.transfer.kd_pairs(batch), self.transfer.reads_likelihood_chunks)

    @property
    def lm_only(self) -> bool:
        """Plain fine-tuning (kd_alpha 0, no extra or feature terms): the teacher is not run during training."""
        return self.switches.lm_only

    def wants_attentions(self, weights: dict[str, float]) -> bool:
        """Attention maps are requested only while the attention term's weight is non-zero (they cost memory)."""
        return bool(self.attention_layer_pairs) and weights["attention"] > 0

    def teacher_signal(self, batch: DualBatch, weights: dict[str, float]) -> TeacherSignal:
        """The teacher's signal at the batch's aligned pairs (no gradient), with every layer's hidden states and
        attention maps when a feature term needs them."""
        signal = self.teacher_source.signal(batch, hidden_states=self.uses_hidden_states,
                                            attentions=self.wants_attentions(weights))
        if signal.expert_usage_entropy is not None:
            entropy = signal.expert_usage_entropy
            self._teacher_diagnostics = {"teacher_expert_entropy/min": float(entropy.min()),
                                         "teacher_expert_entropy/mean": float(entropy.mean())}
        return signal

    def student_inputs(self, batch: DualBatch, weights: dict[str, float]) -> dict:
        """The keyword arguments of the student's training forward on `batch`."""
        return student_forward_kwargs(batch, attentions=self.wants_attentions(weights))

    def forward(self, batch: DualBatch, selection: PositionSelection, student_hidden_states: tuple[Tensor, ...],
                student_attentions: tuple[Tensor, ...] | None, signal: TeacherSignal | None,
                weights: dict[str, float], temperature: float) -> dict[str, Term]:
        """Every term of one micro-batch from the student forward's hidden states (and attention maps) and the
        teacher's `signal` (None: LM only)."""
        head_weight = self.student_model.get_output_embeddings().weight
        hidden = student_hidden_states[-1]
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.lm_only:
            lm_sum, _ = chunked_cross_entropy(flat_hidden, head_weight, selection.lm_targets, self.chunk_size,
                                              self.kept_logit_bytes)
            return {"lm": Term(lm_sum, PER_TOKEN, count_key="lm", scale=self.lm_alpha)}
        transfer = self.transfer
        with record_function("crosskd.kd_target"):
            inputs = transfer.micro_batch_inputs(signal, batch, selection, flat_hidden)
            target = transfer.kd_target(signal, selection, inputs, head_weight)
        # One chunk loop for both terms: the KD rows first, in pair order, then the rows only LM uses.
        with record_function("crosskd.lm_kd_chunks"):
            sums = fused_chunked_losses(flat_hidden, head_weight, selection.lm_targets, selection.kd_rows, target,
                                        transfer.kd_loss_sum(temperature, flat_hidden.device), self.chunk_size,
                                        keep_token_logp=transfer.reads_likelihood_chunks,
                                        kept_logit_bytes=self.kept_logit_bytes)
        kd_sum = transfer.scaled_kd_sum(sums.kd_sum, temperature)
        terms = {
            "lm": Term(sums.lm_sum, PER_TOKEN, count_key="lm", scale=self.lm_alpha),
            "kd": Term(kd_sum, PER_TOKEN, count_key="kd", weight_key="kd",
                       scale=self._kd_balance(sums.lm_sum, kd_sum, selection, hidden, weights)),
        }
        terms.update(transfer.extra_terms(inputs, selection, head_weight))
        terms.update(transfer.likelihood_terms(signal, selection, sums.lm_token_logp))
        if self.uses_hidden_states:
            terms.update(self._feature_terms(student_hidden_states, student_attentions, signal, selection, weights))
        return terms

    def _kd_balance(self, lm_sum: Tensor, kd_sum: Tensor, selection: PositionSelection, hidden: Tensor,
                    weights: dict[str, float]) -> float:
        """The KD term's balance factor: 1 with `objective.kd_balance: fixed`; with `gradient-norm`, the ratio of the
        LM and KD gradient norms at the student's final hidden states, each term divided by this micro-batch's own
        positions (the step's counts are not known yet; equal micro-batches give the same ratio). The ratio is a
        detached number: it rescales the KD gradient and has none of its own. Logged as `kd_balance`."""
        if self.kd_balance == "fixed" or not torch.is_grad_enabled() or not weights["kd"] > 0:
            return 1.0
        counts = selection.counts()
        lm_norm, kd_norm = (torch.autograd.grad(value, hidden, retain_graph=True)[0].norm().item() / max(int(n), 1)
                            for value, n in ((lm_sum, counts["lm"]), (kd_sum, counts["kd"])))
        ratio = lm_norm / kd_norm if kd_norm > 0 else 1.0
        self._diagnostics["kd_balance"] = ratio
        return ratio

    def _feature_terms(self, student_states, student_attentions, signal: TeacherSignal,
                       selection: PositionSelection, weights) -> dict[str, Term]:
        """Intermediate-layer terms. Each head trains at full strength on detached student states; the schedule's
        weight scales only the gradient that flows back into the student (`student_grad_weight`), so these terms
        enter the total with coefficient 1."""
        pairs = selection.feature_pairs
        teacher_states = signal.hidden_states
        terms: dict[str, Term] = {}
        if self.matcher is not None:
            matched = self.matcher(student_states, teacher_states, pairs, self.stats,
                                   student_grad_weight=weights["feature"])
            terms["feature"] = Term(matched.feature.sum, PER_TOKEN, count_key="features")
            self._diagnostics.update({f"group_mse/{e}": float(v) for e, v in enumerate(matched.group_mse.tolist())})
            if matched.routing is not None:
                routing = matched.routing
                terms["load_balance"] = Term(routing.load_balance, PER_BATCH, weight_key="load_balance")
                terms["importance"] = Term(routing.importance, PER_BATCH, weight_key="importance")
                self._diagnostics.update({f"expert_share/{e}": float(v)
                                          for e, v in enumerate(routing.expert_share.tolist())})
                self._diagnostics["gate_entropy"] = float(routing.gate_entropy)
        if self.layerwise is not None:
            matched = self.layerwise(student_states, teacher_states, pairs, self.stats,
                                     student_grad_weight=weights["layerwise"])
            terms["layerwise"] = Term(matched.sum, PER_TOKEN, count_key="features")
        if self.contrastive is not None:
            # InfoNCE compares positions within a micro-batch: a batch statistic, averaged over micro-batches.
            matched = self.contrastive(student_states, teacher_states, pairs, self.stats,
                                       student_grad_weight=weights["contrastive"])
            terms["contrastive"] = Term(matched.mean(), PER_BATCH)
        if self.wants_attentions(weights):
            matched = attention_alignment_loss(student_attentions, signal.attentions, pairs,
                                               self.attention_layer_pairs, student_grad_weight=weights["attention"])
            terms["attention"] = Term(matched.sum, PER_TOKEN, count_key="features")
        return terms

    def combine(self, terms: dict[str, Term], counts: dict[str, Tensor], weights: dict[str, float],
                micro_batches: int, processes: int) -> CombinedLoss:
        """The micro-batch's share of the step loss, with its weighted and raw components."""
        total = None
        weighted: dict[str, float] = {}
        raw: dict[str, float] = {}
        for name, term in terms.items():
            if term.kind == PER_TOKEN:
                # x processes: data parallelism averages gradients over processes, the sum over all must be kept.
                normalised = term.value * processes / counts[term.count_key].clamp_min(1).to(term.value.dtype)
            else:
                normalised = term.value / micro_batches
            contribution = normalised * (term.scale * (weights[term.weight_key] if term.weight_key else 1.0))
            total = contribution if total is None else total + contribution
            weighted[name] = contribution.detach().item() / processes
            raw[name] = normalised.detach().item() / processes
        return CombinedLoss(total, weighted, raw)

    # --- knowledge retention ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_retention(self, eval_batches, weights, temperature) -> dict[str, float]:
        """Knowledge retention on held-out windows: top-1 agreement and KL(teacher‖student) at the KD positions,
        and every loss component with the weights training uses at this step."""
        agree = torch.zeros((), dtype=torch.float64)
        kl = torch.zeros((), dtype=torch.float64)
        positions = torch.zeros((), dtype=torch.float64)
        component_sums: dict[str, float] = {}
        batches = list(eval_batches)
        selections = [self.select(batch) for batch in batches]
        counts = step_counts(selections)
        student_model = self.student_model
        for batch, selection in zip(batches, selections):
            signal = self.teacher_signal(batch, weights)
            outputs = student_model(**self.student_inputs(batch, weights))
            terms = self.forward(batch, selection, outputs.hidden_states, outputs.attentions, signal, weights,
                                 temperature)
            for name, value in self.combine(terms, counts, weights, len(batches), 1).weighted.items():
                component_sums[f"eval_{name}"] = component_sums.get(f"eval_{name}", 0.0) + value
            if len(selection.kd_rows):
                stats = self._retention_stats(batch, selection, signal)
                agree += stats[0]
                kl += stats[1]
                positions += stats[2]
        if not positions > 0:  # no token-level target (chunk-likelihood alone): nothing to agree on
            return component_sums
        result = {
            "top1_agreement": (agree / positions).item(),
            "kl_teacher_student": (kl / positions).item(),
        }
        return {**result, **component_sums}

    def _retention_stats(self, batch, selection: PositionSelection, signal: TeacherSignal) -> tuple[Tensor, ...]:
        student_model = self.student_model
        hidden = student_model(**student_forward_kwargs(batch)).hidden_states[-1]
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        rows = flat_hidden[selection.kd_rows]
        embedding = student_model.get_output_embeddings()
        inputs = self.transfer.micro_batch_inputs(signal, batch, selection, flat_hidden)
        target = self.transfer.retention_target(signal, selection, inputs, embedding.weight)
        logits = embedding(rows).float()
        groups = self.transfer.student_groups(logits.device)
        student_logp, teacher_logp = support_atoms(logits, target, temperature=1.0, groups=groups)
        best_slot = target.logp.masked_fill(~target.mask, -torch.inf).argmax(dim=-1, keepdim=True)
        teacher_top = target.ids.gather(-1, best_slot).squeeze(-1)
        student_top = logits.argmax(dim=-1)
        student_top = groups.root_of(student_top) if groups is not None else student_top
        agree = (student_top == teacher_top).double().sum().cpu()
        kl = get_divergence("forward_kl")(student_logp, teacher_logp).double().sum().cpu()
        return agree, kl, torch.tensor(float(rows.shape[0]), dtype=torch.float64)
