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
from crosskd.losses.divergences import get_divergence
from crosskd.losses.lm import LossSums, chunked_lm_and_kd
from crosskd.losses.target import MappedTarget, support_atoms
from crosskd.schedules import ScheduleSettings
from crosskd.teacher.online import OnlineTeacher, TeacherSignal
from crosskd.vocab.first_token import first_token_kd_pairs, load_or_build_first_token_map, push_topk_through_map
from crosskd.vocab.projector import (
    AnchorData,
    LogitProjector,
    anchor_loss,
    least_squares_init,
    prefit_projector,
    projected_target,
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


def schedule_settings(config: Config) -> ScheduleSettings:
    """The schedule of this run: config values, with terms that are switched off at weight 0."""
    router = config.router
    on = router.enabled
    return ScheduleSettings(
        kd_alpha=config.objective.kd_alpha,
        kd_warmup_start=config.schedule.kd_warmup_start,
        kd_warmup_end_progress=config.schedule.kd_warmup_end_progress,
        temperature_start=config.schedule.temperature_start,
        temperature_end=config.schedule.temperature_end,
        use_curriculum=config.schedule.use_curriculum,
        feature_alpha=router.feature_alpha if on else 0.0,
        attention_alpha=router.attention_alpha if on else 0.0,
        layerwise_alpha=router.layerwise_alpha if on else 0.0,
        contrastive_alpha=router.contrastive_alpha if on else 0.0,
        load_balance_alpha=router.load_balance_alpha if on else 0.0,
        importance_alpha=router.importance_alpha if on else 0.0,
    )


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
        self._teacher_source = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, objective.kd_top_k,
                                             objective.chunk_size)
        divergence_name = objective.divergence or "forward_kl"
        self.divergence = None if self.strategy == "uld" else get_divergence(divergence_name,
                                                                              **objective.divergence_params)
        self.top_k = objective.kd_top_k
        self.projector = None
        # The first-token map is the first-token strategy's transfer, and for the others it still serves the
        # knowledge-retention metrics (agreement with the mapped teacher).
        token_map = load_or_build_first_token_map(student.tokenizer, teacher.tokenizer, teacher.vocab.valid_mask,
                                                  student.vocab.logit_size)
        self.register_buffer("teacher_to_student", token_map.teacher_to_student, persistent=False)
        if self.strategy == "projector":
            self.projector = LogitProjector(teacher.model.config.hidden_size, student.model.config.hidden_size)
            self.anchor_alpha = objective.projector_anchor_alpha
        self.last_raw: dict[str, float] = {}
        self.prefit_report = None

    # --- parameters ---------------------------------------------------------------------------------------------------
    def head_parameters(self) -> list[nn.Parameter]:
        return []

    def projector_parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) if self.projector is not None else []

    def all_trainable(self, student_model: nn.Module) -> list[nn.Parameter]:
        return [p for p in student_model.parameters() if p.requires_grad] + [
            p for p in self.parameters() if p.requires_grad
        ]

    @property
    def needs_preparation(self) -> bool:
        return self.projector is not None

    def prepare(self, batches: list, device) -> None:
        """Fit what must be sane before the first step, on training batches the loop will not see again first:
        the projector is pre-fitted with the student frozen (a random projector gives a confident random target,
        ~17 nats of KL at step 0). The first half of `batches` fits, the second half decides when to stop."""
        self.projector.to(device)
        half = max(1, len(batches) // 2)
        fit, check = self._anchor_data(batches[:half]), self._anchor_data(batches[half:] or batches[:half])
        least_squares_init(self.projector, fit[0].teacher_features, fit[1])
        embedding = self._student[0].model.get_output_embeddings().weight
        self.prefit_report = prefit_projector(self.projector, embedding, fit[0], check[0], check[2],
                                              max_steps=self.config.objective.projector_prefit_steps,
                                              chunk_size=self.chunk_size)

    @torch.no_grad()
    def _anchor_data(self, batches) -> tuple[AnchorData, Tensor, float]:
        """(teacher features and true next student tokens at aligned pairs, the student's final hidden states
        there, the student's own mean NLL of those tokens)."""
        model = self._student[0].model
        features, targets, hidden_rows, nll = [], [], [], []
        for batch in batches:
            signal = self._teacher_source.signal(batch)
            hidden = model.base_model(input_ids=batch.student_input_ids,
                                      attention_mask=batch.student_attention_mask).last_hidden_state
            rows = hidden[batch.pair_batch, batch.pair_student_pos]
            next_ids = batch.student_targets[batch.pair_batch, batch.pair_student_pos]
            logits = model.get_output_embeddings()(rows).float()
            nll.append(torch.nn.functional.cross_entropy(logits, next_ids, reduction="none"))
            features.append(signal.final_hidden.float())
            targets.append(next_ids)
            hidden_rows.append(rows.float())
        return (AnchorData(torch.cat(features), torch.cat(targets)), torch.cat(hidden_rows),
                torch.cat(nll).mean().item())

    def diagnostics(self) -> dict[str, float]:
        return {}

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
        }
        counts = {name: torch.as_tensor(value, dtype=torch.float64, device=device) for name, value in counts.items()}
        if accelerator is not None and accelerator.num_processes > 1:
            counts = {name: accelerator.reduce(value, reduction="sum") for name, value in counts.items()}
        return counts

    # --- the terms ----------------------------------------------------------------------------------------------------
    def forward(self, batch, weights: dict[str, float], temperature: float) -> dict[str, Term]:
        student_model = self._student[0].model
        signal = self._teacher_source.signal(batch)
        hidden = student_model.base_model(
            input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask
        ).last_hidden_state
        kd_mask = self.kd_pair_mask(batch)
        kd_rows = (batch.pair_batch * hidden.shape[1] + batch.pair_student_pos)[kd_mask]
        sums = self._lm_and_kd(hidden.reshape(-1, hidden.shape[-1]), student_model, batch, kd_rows,
                               signal, kd_mask, temperature)
        terms = {
            "lm": Term(sums.lm_sum, PER_TOKEN, count_key="lm", weight_key="lm"),
            "kd": Term(sums.kd_sum, PER_TOKEN, count_key="kd", weight_key="kd"),
        }
        if self.projector is not None:
            # The anchor keeps the projector a good predictor of the true next student token while the student moves.
            next_ids = batch.student_targets[batch.pair_batch, batch.pair_student_pos]
            anchor_sum, _ = anchor_loss(self.projector, signal.final_hidden, student_model.get_output_embeddings().weight,
                                        next_ids, self.chunk_size)
            terms["anchor"] = Term(anchor_sum, PER_TOKEN, count_key="kd", weight_key="anchor")
        return terms

    def _lm_and_kd(self, hidden, student_model, batch, kd_rows, signal: TeacherSignal, kd_mask, temperature) -> LossSums:
        head_weight = student_model.get_output_embeddings().weight
        lm_targets = batch.student_targets.reshape(-1)
        if self.strategy == "uld":
            return chunked_lm_and_uld(hidden, head_weight, lm_targets, kd_rows, signal.topk.select(kd_mask),
                                      temperature, chunk_size=self.chunk_size)
        return chunked_lm_and_kd(hidden, head_weight, lm_targets, kd_rows, self._mapped_teacher(signal, kd_mask),
                                 temperature, self.divergence, chunk_size=self.chunk_size,
                                 scale_by_t2=self.scale_by_t2)

    def _mapped_teacher(self, signal: TeacherSignal, kd_mask: Tensor) -> MappedTarget:
        """The teacher's distribution on the student's vocabulary at the KD pairs (detached: a target)."""
        if self.strategy == "projector":
            embedding = self._student[0].model.get_output_embeddings().weight
            return projected_target(self.projector, signal.final_hidden[kd_mask], embedding, self.top_k,
                                    self.chunk_size)
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
            terms = self.forward(batch, weights, temperature)
            _, weighted = self.combine(terms, counts, weights, len(batches), 1)
            for name, value in weighted.items():
                component_sums[f"eval_{name}"] = component_sums.get(f"eval_{name}", 0.0) + value
            stats = self._retention_stats(batch)
            agree += stats[0]
            kl += stats[1]
            positions += stats[2]
        result = {
            "top1_agreement": (agree / positions.clamp_min(1)).item(),
            "kl_teacher_student": (kl / positions.clamp_min(1)).item(),
        }
        return {**result, **component_sums}

    def _retention_stats(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        student_model = self._student[0].model
        signal = self._teacher_source.signal(batch)
        kd_mask = self.kd_pair_mask(batch)
        target = self._mapped_teacher(signal, kd_mask)
        hidden = student_model.base_model(input_ids=batch.student_input_ids,
                                          attention_mask=batch.student_attention_mask).last_hidden_state
        rows = hidden[batch.pair_batch[kd_mask], batch.pair_student_pos[kd_mask]]
        logits = student_model.get_output_embeddings()(rows).float()
        student_logp, teacher_logp = support_atoms(logits, target, temperature=1.0)
        best_slot = target.logp.masked_fill(~target.mask, -torch.inf).argmax(dim=-1, keepdim=True)
        teacher_top = target.ids.gather(-1, best_slot).squeeze(-1)
        agree = (logits.argmax(dim=-1) == teacher_top).double().sum().cpu()
        kl = get_divergence("forward_kl")(student_logp, teacher_logp).double().sum().cpu()
        return agree, kl, torch.tensor(float(rows.shape[0]), dtype=torch.float64)
