"""The distillation objective of one run: which terms, how they are computed, how they are weighted and normalised.

Terms come back as sums over positions (per-token terms) or per-micro-batch values (batch-statistic terms);
`combine` divides the per-token sums by the valid-position counts of the WHOLE optimizer step (every micro-batch,
every process), so gradient accumulation and data parallelism give the same gradient as one large batch. Batch-
statistic terms cannot be made equivalent; each micro-batch's value is averaged over micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crosskd.config import Config
from crosskd.losses.attention import attention_alignment_loss, attention_layer_pairs
from crosskd.losses.contrastive import ContrastiveMatcher
from crosskd.losses.divergences import get_divergence
from crosskd.losses.features import AlignedPairs
from crosskd.losses.layerwise import LayerwiseMatcher
from crosskd.losses.lm import LossSums, chunked_cross_entropy, chunked_lm_and_kd
from crosskd.losses.target import MappedTarget, StudentGroups, support_atoms
from crosskd.losses.router import DenseGroupMatcher, StudentAwareRouter, default_student_layer
from crosskd.schedules import ScheduleSettings
from crosskd.losses import calibration
from crosskd.teacher.cache import open_teacher_cache
from crosskd.teacher.online import OnlineTeacher, TeacherSignal
from crosskd.vocab.first_token import (
    first_token_kd_pairs,
    load_or_build_first_token_map,
    load_or_build_student_groups,
    push_topk_through_map,
)
from crosskd.vocab.projector import (
    AnchorData,
    LogitProjector,
    anchor_loss,
    least_squares_init,
    prefit_projector,
    projected_target,
    topk_embedding_features,
    without_sink,
)
from crosskd.vocab.uld import chunked_lm_and_uld

PER_TOKEN = "per-token"
PER_BATCH = "per-batch"


@dataclass
class Term:
    value: Tensor  # a sum over positions (PER_TOKEN) or a micro-batch value (PER_BATCH)
    kind: str
    count_key: str | None = None  # which position count normalises it
    weight_key: str | None = None  # which schedule weight multiplies it (None: 1)


@dataclass(frozen=True)
class PrefitPairs:
    """The aligned pairs of the projector's pre-fit batches."""

    teacher_features: Tensor  # [P, D_t] what the projector reads of the teacher (`_teacher_features`)
    after_sink: Tensor  # bool [P] the teacher position is not window position 0
    target_ids: Tensor  # [P] the true next student token
    student_hidden: Tensor  # [P, D_s] the student's final hidden state
    student_nll: float  # the frozen student's own mean NLL of the true next tokens


@dataclass(frozen=True)
class ProjectorInputs:
    """What the projector reads at a micro-batch's KD pairs, computed once for both its KD target and its anchor."""

    teacher_features: Tensor  # [P, D_t] window position 0 at the fitted mean
    student_rows: Tensor | None  # [P, D_s] the student's final hidden state (the residual projector only)


class DistillationObjective(nn.Module):
    """Holds the trainable parts of the objective (projector, heads) and computes every term of a micro-batch.

    The teacher and the student are deliberately not submodules: the student is prepared by accelerate on its own,
    and the frozen teacher must not be wrapped for data parallelism or saved in checkpoints.
    """

    def __init__(self, config: Config, teacher, student, settings: ScheduleSettings):
        super().__init__()
        objective = config.objective
        self.config = config
        self.settings = settings
        self.strategy = objective.strategy
        self.lm_alpha = objective.lm_alpha
        self.chunk_size = objective.chunk_size
        self.scale_by_t2 = objective.scale_by_t2
        self.exclude_mismatch = objective.mismatch_policy == "exclude"
        self._student = [student]  # a list hides it from nn.Module registration
        self._student_forward = [student.model]  # replaced by the data-parallel wrapper in use_student_forward
        self._teacher_source = (
            open_teacher_cache(config, teacher, student.tokenizer) if config.teacher.source == "cache"
            else OnlineTeacher(teacher.model, teacher.vocab.valid_mask, objective.kd_top_k, objective.chunk_size)
        )
        divergence_name = objective.divergence or "forward_kl"
        self.divergence = None if self.strategy == "uld" else get_divergence(divergence_name,
                                                                              **objective.divergence_params)
        self.top_k = objective.kd_top_k
        self.projector = None
        # The first-token map is the first-token strategy's transfer, and for the others it still serves the
        # knowledge-retention metrics (agreement with the mapped teacher).
        token_map = load_or_build_first_token_map(student.tokenizer, teacher.tokenizer, teacher.vocab.valid_mask,
                                                  student.vocab.logit_size)
        teacher_to_student = token_map.teacher_to_student
        # `merge`: student tokens that run past the teacher's token share one atom with it (docs/VOCAB.md), so the
        # teacher's mass lands on group roots and the student's atoms pool their groups.
        self.student_groups = None
        if self.strategy == "first-token" and objective.mismatch_policy == "merge":
            self.student_groups = load_or_build_student_groups(student.tokenizer, teacher.tokenizer,
                                                               student.vocab.logit_size)
            teacher_to_student = self.student_groups.root_of(teacher_to_student)
        self.register_buffer("teacher_to_student", teacher_to_student, persistent=False)
        if self.strategy == "projector":
            self.projector = LogitProjector(teacher.model.config.hidden_size, student.model.config.hidden_size,
                                            residual=objective.projector_residual)
            self.anchor_alpha = objective.projector_anchor_alpha
            self.projector_features = objective.projector_features
            # Frozen and not ours: a list keeps it out of the module's parameters and checkpoints.
            self._teacher_embedding = [teacher.model.get_output_embeddings().weight]
        self._build_feature_heads(config, teacher.model, student.model)
        self.last_raw: dict[str, float] = {}
        self.prefit_report = None
        self._diagnostics: dict[str, float] = {}
        self._teacher_diagnostics: dict[str, float] = {}

    def _build_feature_heads(self, config: Config, teacher_model, student_model) -> None:
        """The intermediate-layer terms that are switched on (alpha > 0), each with its learned head."""
        router, settings = config.router, self.settings
        t_hidden, t_layers = teacher_model.config.hidden_size, teacher_model.config.num_hidden_layers
        s_hidden, s_layers = student_model.config.hidden_size, student_model.config.num_hidden_layers
        self.matcher = self.layerwise = self.contrastive = None
        if settings.feature_alpha > 0:
            student_layer = router.student_layer or default_student_layer(s_layers)
            common = dict(student_layer=student_layer, num_experts=router.num_experts)
            self.matcher = (DenseGroupMatcher(s_hidden, t_hidden, t_layers, **common) if router.dense
                            else StudentAwareRouter(s_hidden, t_hidden, t_layers, top_k=router.top_k, **common))
        if settings.layerwise_alpha > 0:
            self.layerwise = LayerwiseMatcher(s_hidden, t_hidden, s_layers, t_layers)
        if settings.contrastive_alpha > 0:
            # The last hidden states on both sides (the student's and teacher's final-norm outputs).
            self.contrastive = ContrastiveMatcher(s_hidden, t_hidden, temperature=router.contrastive_temperature,
                                                  student_layer=s_layers, teacher_layer=t_layers)
        self.attention_layer_pairs = (
            attention_layer_pairs(router.attention_layers or [s_layers // 2], s_layers, t_layers)
            if settings.attention_alpha > 0 else ()
        )
        if self.attention_layer_pairs:
            # Attention weights exist only in the eager implementation (sdpa/flash never build them).
            for model in (teacher_model, student_model):
                model.set_attn_implementation("eager")
        self.stats: calibration.HiddenStateStats | None = None

    @property
    def heads(self) -> list[nn.Module]:
        return [head for head in (self.matcher, self.layerwise, self.contrastive) if head is not None]

    @property
    def uses_hidden_states(self) -> bool:
        return bool(self.heads) or bool(self.attention_layer_pairs)

    def _calibration_layers(self) -> tuple[int, ...]:
        layers = {layer for head in (self.matcher, self.layerwise) if head is not None for layer in head.teacher_layers}
        if self.contrastive is not None:
            layers.add(self.contrastive.teacher_layer)
        return tuple(sorted(layers))

    # --- parameters ---------------------------------------------------------------------------------------------------
    def head_parameters(self) -> list[nn.Parameter]:
        return [p for head in self.heads for p in head.parameters()]

    def projector_parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) if self.projector is not None else []

    def all_trainable(self, student_model: nn.Module) -> list[nn.Parameter]:
        return [p for p in student_model.parameters() if p.requires_grad] + [
            p for p in self.parameters() if p.requires_grad
        ]

    @property
    def needs_preparation(self) -> bool:
        return self.projector is not None or bool(self.heads)

    def prepare(self, batches: list, device, stats_path, resuming: bool) -> None:
        """Fit what must be sane before the first step, on training batches the loop does not start with.

        The teacher's hidden-state statistics (for the feature terms) are estimated once and stored with the run.
        The projector's feature standardisation is fitted, then the projector is pre-fitted with the student frozen
        (a random plain projector gives a confident random target, ~17 nats of KL at step 0; the residual one starts
        as the student and must learn what the teacher adds before it teaches anything). A resumed
        run reads the statistics back and gets the projector from its checkpoint.
        """
        if self.heads:
            if stats_path.is_file():
                self.stats = calibration.HiddenStateStats.load(stats_path)
            else:
                self.stats = calibration.estimate(
                    ((self._teacher_source.signal(b, hidden_states=True).hidden_states, b.teacher_attention_mask)
                     for b in self._calibration_batches(batches)),
                    self._calibration_layers(),
                )
                self.stats.save(stats_path)
        if self.projector is None or resuming:
            return
        self.projector.to(device)
        # Three quarters fit, one quarter decides when to stop (a tiny corpus with one batch uses it for both).
        split = max(1, (3 * len(batches)) // 4)
        fit, check = self._prefit_pairs(batches[:split]), self._prefit_pairs(batches[split:] or batches[:split])
        # Statistics from the pairs after window position 0 (the attention sink, see `without_sink`).
        self.projector.fit_standardisation(fit.teacher_features[fit.after_sink] if fit.after_sink.any()
                                           else fit.teacher_features)
        train, heldout = (self._anchor_view(pairs) for pairs in (fit, check))
        if not self.projector.residual:
            least_squares_init(self.projector, train.teacher_features, fit.student_hidden)
        embedding = self._student[0].model.get_output_embeddings().weight
        self.prefit_report = prefit_projector(self.projector, embedding, train, heldout, check.student_nll,
                                              max_steps=self.config.objective.projector_prefit_steps,
                                              chunk_size=self.chunk_size)

    def _calibration_batches(self, batches: list) -> list:
        """The first batches holding at least `router.calibration_windows` windows."""
        wanted, taken, windows = self.config.router.calibration_windows, [], 0
        for batch in batches:
            if windows >= wanted:
                break
            taken.append(batch)
            windows += len(batch.student_input_ids)
        return taken

    def _anchor_view(self, pairs: PrefitPairs) -> AnchorData:
        """What the projector reads of the pre-fit pairs: the residual one also takes the student's final state."""
        features = without_sink(pairs.teacher_features, pairs.after_sink, self.projector.feature_mean)
        return AnchorData(features, pairs.target_ids, pairs.student_hidden if self.projector.residual else None)

    @torch.no_grad()
    def _prefit_pairs(self, batches) -> PrefitPairs:
        model = self._student[0].model
        features, targets, hidden_rows, nll, after_sink = [], [], [], [], []
        for batch in batches:
            signal = self._teacher_source.signal(batch)
            hidden = self._student_outputs(batch).hidden_states[-1]
            rows = hidden[batch.pair_batch, batch.pair_student_pos]
            next_ids = batch.student_targets[batch.pair_batch, batch.pair_student_pos]
            logits = model.get_output_embeddings()(rows).float()
            nll.append(torch.nn.functional.cross_entropy(logits, next_ids, reduction="none"))
            features.append(self._teacher_features(signal))
            targets.append(next_ids)
            hidden_rows.append(rows.float())
            after_sink.append(batch.pair_teacher_pos > 0)
        return PrefitPairs(*(torch.cat(parts) for parts in (features, after_sink, targets, hidden_rows)),
                           torch.cat(nll).mean().item())

    def _teacher_features(self, signal: TeacherSignal, rows: Tensor | slice = slice(None)) -> Tensor:
        """What the projector reads of the teacher at the selected pairs (`objective.projector_features`), float32."""
        if self.projector_features == "final_hidden":
            return signal.final_hidden[rows].float()
        return topk_embedding_features(signal.topk.select(rows), self._teacher_embedding[0])

    def _projector_inputs(self, signal: TeacherSignal, batch, mask: Tensor, student_rows: Tensor) -> ProjectorInputs:
        """The projector's inputs at the selected pairs; `student_rows` is the student's final state there."""
        features = without_sink(self._teacher_features(signal, mask), (batch.pair_teacher_pos > 0)[mask],
                                self.projector.feature_mean)
        return ProjectorInputs(features, student_rows if self.projector.residual else None)

    def diagnostics(self) -> dict[str, float]:
        """Router health for the logs (each expert's token share, gate entropy, each group's error) and an MoE
        teacher's expert-usage entropy (lowest and mean over its layers) on the last micro-batch."""
        return {**self._diagnostics, **self._teacher_diagnostics}

    # --- counting -----------------------------------------------------------------------------------------------------
    def kd_pair_mask(self, batch) -> Tensor:
        """Aligned pairs that enter KD: where the student's next token runs past the teacher's, the first-token target
        cannot give the true student token any probability, so with the `exclude` policy those pairs are left out."""
        if self.strategy == "first-token" and self.exclude_mismatch:
            return first_token_kd_pairs(batch.pair_student_next_bytes, batch.pair_teacher_next_bytes)
        return torch.ones_like(batch.pair_batch, dtype=torch.bool)

    def count_positions(self, micro_batches, accelerator) -> dict[str, Tensor]:
        """Valid positions of each per-token term over the whole step: every micro-batch on every process."""
        device = micro_batches[0].student_input_ids.device
        counts = {
            "lm": sum((b.student_targets != -100).sum() for b in micro_batches),
            "kd": sum(self.kd_pair_mask(b).sum() for b in micro_batches),
            # The feature terms leave window position 0 out on both sides (the attention sink).
            "features": sum(((b.pair_student_pos > 0) & (b.pair_teacher_pos > 0)).sum() for b in micro_batches),
        }
        counts = {name: torch.as_tensor(value, dtype=torch.float64, device=device) for name, value in counts.items()}
        if accelerator is not None and accelerator.num_processes > 1:
            counts = {name: accelerator.reduce(value, reduction="sum") for name, value in counts.items()}
        return counts

    # --- the terms ----------------------------------------------------------------------------------------------------
    def _wants_attentions(self, weights: dict[str, float]) -> bool:
        """Attention maps are requested only while the attention term's weight is non-zero (they cost memory)."""
        return bool(self.attention_layer_pairs) and weights["attention"] > 0

    def _teacher_signal(self, batch, weights: dict[str, float]) -> TeacherSignal:
        signal = self._teacher_source.signal(batch, hidden_states=self.uses_hidden_states,
                                             attentions=self._wants_attentions(weights))
        if signal.expert_usage_entropy is not None:
            entropy = signal.expert_usage_entropy
            self._teacher_diagnostics = {"teacher_expert_entropy/min": float(entropy.min()),
                                         "teacher_expert_entropy/mean": float(entropy.mean())}
        return signal

    @property
    def lm_only(self) -> bool:
        """Plain fine-tuning (kd_alpha 0, no feature terms): the teacher is not run during training at all."""
        return self.settings.kd_alpha == 0 and self.projector is None and not self.uses_hidden_states

    def use_student_forward(self, module: nn.Module) -> None:
        """Run the student's training forward through `module`: the data-parallel wrapper accelerate made, so that
        its gradient synchronisation happens (calling the inner model's parts directly would skip it)."""
        self._student_forward = [module]

    def _student_outputs(self, batch, attentions: bool = False):
        """The one student forward (training, projector pre-fit, retention). `logits_to_keep=1` stops the LM head from
        building [B, N, V] logits; the losses compute them chunk by chunk from the final hidden state
        (`hidden_states[-1]`, after the norm)."""
        return self._student_forward[0](
            input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask,
            output_hidden_states=True, output_attentions=attentions, logits_to_keep=1,
        )

    def forward(self, batch, weights: dict[str, float], temperature: float,
                signal: TeacherSignal | None = None) -> dict[str, Term]:
        student_model = self._student[0].model
        if self.lm_only:
            hidden = self._student_outputs(batch).hidden_states[-1]
            lm_sum, _ = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                              student_model.get_output_embeddings().weight,
                                              batch.student_targets.reshape(-1), self.chunk_size)
            return {"lm": Term(lm_sum, PER_TOKEN, count_key="lm", weight_key="lm")}
        attentions = self._wants_attentions(weights)
        signal = signal or self._teacher_signal(batch, weights)
        outputs = self._student_outputs(batch, attentions)
        hidden = outputs.hidden_states[-1]
        kd_mask = self.kd_pair_mask(batch)
        kd_rows = (batch.pair_batch * hidden.shape[1] + batch.pair_student_pos)[kd_mask]
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        # The projector's KD pairs are every aligned pair (only first-token's `exclude` masks any), so its KD target
        # and its anchor read the same inputs.
        projector_inputs = (self._projector_inputs(signal, batch, kd_mask, flat_hidden[kd_rows])
                            if self.projector is not None else None)
        sums = self._lm_and_kd(flat_hidden, student_model, batch, kd_rows, signal, kd_mask, temperature,
                               projector_inputs)
        terms = {
            "lm": Term(sums.lm_sum, PER_TOKEN, count_key="lm", weight_key="lm"),
            "kd": Term(sums.kd_sum, PER_TOKEN, count_key="kd", weight_key="kd"),
        }
        if self.projector is not None:
            # The anchor keeps the projector a good predictor of the true next student token while the student moves.
            next_ids = batch.student_targets.reshape(-1)[kd_rows]
            anchor_sum, _ = anchor_loss(self.projector, projector_inputs.teacher_features,
                                        student_model.get_output_embeddings().weight, next_ids, self.chunk_size,
                                        projector_inputs.student_rows)
            terms["anchor"] = Term(anchor_sum, PER_TOKEN, count_key="kd", weight_key="anchor")
        if self.uses_hidden_states:
            terms.update(self._feature_terms(outputs, signal, batch, weights, attentions))
        return terms

    def _feature_terms(self, outputs, signal: TeacherSignal, batch, weights, attentions: bool) -> dict[str, Term]:
        """Intermediate-layer terms. Each head trains at full strength on detached student states; the schedule's
        weight scales only the gradient that flows back into the student (`student_grad_weight`), so these terms
        enter the total with coefficient 1."""
        pairs = AlignedPairs(batch.pair_batch, batch.pair_student_pos, batch.pair_teacher_pos)
        student_states, teacher_states = outputs.hidden_states, signal.hidden_states
        terms: dict[str, Term] = {}
        if self.matcher is not None:
            matched = self.matcher(student_states, teacher_states, pairs, self.stats,
                                   student_grad_weight=weights["feature"])
            terms["feature"] = Term(matched.feature.sum, PER_TOKEN, count_key="features")
            self._diagnostics = {f"group_mse/{e}": float(v) for e, v in enumerate(matched.group_mse.tolist())}
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
        if attentions:
            matched = attention_alignment_loss(outputs.attentions, signal.attentions, pairs,
                                               self.attention_layer_pairs, student_grad_weight=weights["attention"])
            terms["attention"] = Term(matched.sum, PER_TOKEN, count_key="features")
        return terms

    def _lm_and_kd(self, hidden, student_model, batch, kd_rows, signal: TeacherSignal, kd_mask, temperature,
                   projector_inputs: ProjectorInputs | None) -> LossSums:
        head_weight = student_model.get_output_embeddings().weight
        lm_targets = batch.student_targets.reshape(-1)
        if self.strategy == "uld":
            return chunked_lm_and_uld(hidden, head_weight, lm_targets, kd_rows, signal.topk.select(kd_mask),
                                      temperature, chunk_size=self.chunk_size)
        return chunked_lm_and_kd(hidden, head_weight, lm_targets, kd_rows,
                                 self._mapped_teacher(signal, kd_mask, projector_inputs), temperature, self.divergence,
                                 chunk_size=self.chunk_size, scale_by_t2=self.scale_by_t2,
                                 student_groups=self._groups_on(hidden.device))

    def _groups_on(self, device) -> StudentGroups | None:
        if self.student_groups is not None and self.student_groups.members.device != device:
            self.student_groups = self.student_groups.to(device)
        return self.student_groups

    def _mapped_teacher(self, signal: TeacherSignal, kd_mask: Tensor,
                        projector_inputs: ProjectorInputs | None) -> MappedTarget:
        """The teacher's distribution on the student's vocabulary at the KD pairs (detached: a target).
        `projector_inputs`: the projector's inputs at those pairs (the projector strategy only)."""
        if self.strategy == "projector":
            embedding = self._student[0].model.get_output_embeddings().weight
            return projected_target(self.projector, projector_inputs.teacher_features, embedding, self.top_k,
                                    self.chunk_size, projector_inputs.student_rows)
        return push_topk_through_map(signal.topk.select(kd_mask), self.teacher_to_student)

    def combine(self, terms: dict[str, Term], counts: dict[str, Tensor], weights: dict[str, float],
                micro_batches: int, processes: int) -> tuple[Tensor, dict[str, float]]:
        """The micro-batch's share of the step loss, and its weighted components (they add up to the loss)."""
        weights = {**weights, "lm": self.lm_alpha, "anchor": getattr(self, "anchor_alpha", 0.0)}
        total = None
        weighted: dict[str, float] = {}
        raw: dict[str, float] = {}
        for name, term in terms.items():
            if term.kind == PER_TOKEN:
                # x processes: data parallelism averages gradients over processes, the sum over all must be kept.
                normalised = term.value * processes / counts[term.count_key].clamp_min(1).to(term.value.dtype)
            else:
                normalised = term.value / micro_batches
            contribution = normalised * (weights[term.weight_key] if term.weight_key else 1.0)
            total = contribution if total is None else total + contribution
            weighted[name] = contribution.detach().item() / processes
            raw[name] = normalised.detach().item() / processes
        self.last_raw = raw
        return total, weighted

    @torch.no_grad()
    def evaluate_retention(self, eval_batches, weights, temperature, accelerator) -> dict[str, float]:
        """Knowledge retention on held-out windows: top-1 agreement and KL(teacher‖student) at the KD positions,
        and every loss component with the weights training uses at this step."""
        agree = torch.zeros((), dtype=torch.float64)
        kl = torch.zeros((), dtype=torch.float64)
        positions = torch.zeros((), dtype=torch.float64)
        component_sums: dict[str, float] = {}
        batches = list(eval_batches)
        counts = self.count_positions(batches, None)
        for batch in batches:
            signal = self._teacher_signal(batch, weights)
            terms = self.forward(batch, weights, temperature, signal)
            _, weighted = self.combine(terms, counts, weights, len(batches), 1)
            for name, value in weighted.items():
                component_sums[f"eval_{name}"] = component_sums.get(f"eval_{name}", 0.0) + value
            stats = self._retention_stats(batch, signal)
            agree += stats[0]
            kl += stats[1]
            positions += stats[2]
        result = {
            "top1_agreement": (agree / positions.clamp_min(1)).item(),
            "kl_teacher_student": (kl / positions.clamp_min(1)).item(),
        }
        return {**result, **component_sums}

    def _retention_stats(self, batch, signal: TeacherSignal) -> tuple[Tensor, Tensor, Tensor]:
        student_model = self._student[0].model
        kd_mask = self.kd_pair_mask(batch)
        hidden = self._student_outputs(batch).hidden_states[-1]
        rows = hidden[batch.pair_batch[kd_mask], batch.pair_student_pos[kd_mask]]
        projector_inputs = (self._projector_inputs(signal, batch, kd_mask, rows) if self.projector is not None
                            else None)
        target = self._mapped_teacher(signal, kd_mask, projector_inputs)
        logits = student_model.get_output_embeddings()(rows).float()
        groups = self._groups_on(logits.device)
        student_logp, teacher_logp = support_atoms(logits, target, temperature=1.0, groups=groups)
        best_slot = target.logp.masked_fill(~target.mask, -torch.inf).argmax(dim=-1, keepdim=True)
        teacher_top = target.ids.gather(-1, best_slot).squeeze(-1)
        student_top = logits.argmax(dim=-1)
        student_top = groups.root_of(student_top) if groups is not None else student_top
        agree = (student_top == teacher_top).double().sum().cpu()
        kl = get_divergence("forward_kl")(student_logp, teacher_logp).double().sum().cpu()
        return agree, kl, torch.tensor(float(rows.shape[0]), dtype=torch.float64)
