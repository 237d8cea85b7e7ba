"""The `projector` strategy: a learned linear map from the teacher's representation into the student's logit space.

    teacher features [P, D_t] --standardise--> --(LogitProjector, learned)--> [P, D_s]
        (+ the student's own final hidden state, DETACHED, in the default residual form)
        --(student output embedding, DETACHED)--> [P, V_s]

Teacher features (`objective.projector_features`) are either the teacher's final hidden state at the aligned
position (`final_hidden`, the fast path) or the teacher's renormalised top-k probabilities times its output-embedding
rows (`topk_embeddings`), computed with `embedding_bag` so the dense [positions x 151,936] probability matrix never
exists. Why each safeguard is there (docs/VOCAB.md):

- residual form (default): the map adds a teacher-driven correction to the student's own detached final state and
  starts at zero, so the target starts as the student's own distribution (step-0 KD 0) and the pre-fit only has to
  learn what the teacher adds. A plain map from the teacher's state alone has to rebuild the whole next-token
  predictor from a few thousand pairs; on the reference pair it never beat the student (docs/VOCAB.md);
- features are standardised per channel with statistics of the pre-fit pairs: the teacher's final hidden state has
  norm ~170, dominated by a few channels, and window position 0 (the attention sink) is an outlier by far, so its
  features are set to the mean (the residual projector then gives the student's own prediction there);
- the projector is pre-fitted with the student frozen before KD starts: a random plain map sends the teacher's state
  to confident random logits, whose KL to the student is ~17 nats at step 0;
- the cross-entropy anchor on the true next student token keeps the projector a good predictor while the student
  moves; without it, KD would pull the projector towards whatever the student already says;
- the student's output embedding is detached here: the embedding is tied to the input embedding, and a gradient
  through the projector would let the anchor (and KD) reshape the student's vocabulary to suit the projector;
- the projected target is detached inside the KD term: otherwise KD trains the projector to imitate the student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosskd.data.collate import IGNORE_INDEX
from crosskd.losses.chunking import DEFAULT_CHUNK_ROWS, chunk_slices, upcast
from crosskd.losses.lm import student_forward_kwargs
from crosskd.losses.target import MappedTarget, TopKTarget, teacher_topk
from crosskd.losses.terms import PER_TOKEN, Term
from crosskd.teacher.online import TeacherNeeds, TeacherSignal
from crosskd.vocab.transfer import DivergenceTransfer, ParameterGroup, register_transfer

PROJECTOR_FEATURES = ("final_hidden", "topk_embeddings")


class LogitProjector(nn.Module):
    """The learned map from teacher features [.., D_t] to the student's output-embedding space [.., D_s].

    `residual=True`: output = student's final hidden state (detached) + linear(standardised teacher features), with
    the linear map starting at zero. `residual=False`: output = linear(standardised teacher features) (the plain
    map), started by `least_squares_init`.
    """

    def __init__(self, teacher_dim: int, student_dim: int, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.linear = nn.Linear(teacher_dim, student_dim, bias=True)
        # Per-channel standardisation of the teacher features, fitted once from data (`fit_standardisation`) and
        # saved with the projector.
        self.register_buffer("feature_mean", torch.zeros(teacher_dim))
        self.register_buffer("feature_inverse_std", torch.ones(teacher_dim))
        if residual:
            nn.init.zeros_(self.linear.weight)
        else:
            # A small init only keeps the first pre-fit steps tame; pre-fit is what makes step 0 sane.
            nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def fit_standardisation(self, teacher_features: Tensor) -> None:
        features = teacher_features.double()
        std = features.std(dim=0)
        # Channels that never vary would otherwise get an infinite scale.
        floor = 1e-6 * float(std.mean().clamp_min(1e-12))
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_inverse_std.copy_(1.0 / std.clamp_min(floor))

    def standardise(self, teacher_features: Tensor) -> Tensor:
        features = teacher_features.to(self.linear.weight.dtype)
        return (features - self.feature_mean.to(features.dtype)) * self.feature_inverse_std.to(features.dtype)

    def forward(self, teacher_features: Tensor, student_hidden: Tensor | None = None) -> Tensor:
        correction = self.linear(self.standardise(teacher_features))
        if not self.residual:
            return correction
        if student_hidden is None:
            raise ValueError("a residual LogitProjector needs the student's final hidden state at the same positions")
        return student_hidden.detach().to(correction.dtype) + correction


def after_sink(pair_teacher_pos: Tensor) -> Tensor:
    """bool [P]: the pairs whose teacher position is past window position 0 (the attention sink)."""
    return pair_teacher_pos > 0


def fit_standardisation_after_sink(projector: LogitProjector, teacher_features: Tensor, after_sink: Tensor) -> None:
    """Fit the feature standardisation on the pairs after the sink (on all of them if there are no others)."""
    projector.fit_standardisation(teacher_features[after_sink] if after_sink.any() else teacher_features)


def anchor_data(projector: LogitProjector, teacher_features: Tensor, after_sink: Tensor, target_ids: Tensor,
                student_hidden: Tensor) -> AnchorData:
    """What the projector reads at some pairs for its anchor (sink rows at the fitted mean; the residual one also
    takes the student's final state)."""
    features = without_sink(teacher_features, after_sink, projector.feature_mean)
    return AnchorData(features, target_ids, student_hidden if projector.residual else None)


def without_sink(features: Tensor, after_sink: Tensor, feature_mean: Tensor) -> Tensor:
    """`features` [P, D_t] with the rows at teacher window position 0 (`after_sink` False) set to `feature_mean`.

    Position 0 is the attention sink: its final state is many standard deviations off in a few channels, so a
    projector reading it would produce an arbitrary correction there. At the mean, the standardised features are 0:
    the residual projector gives the student's own prediction and the plain one its bias.
    """
    return torch.where(after_sink[:, None], features, feature_mean.to(features.dtype))


def teacher_features_from_topk(topk_ids: Tensor, topk_probs: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Σ_k p_k · E[id_k] per position: [P, k] ids and probabilities, E [V_t, D_t] -> [P, D_t].

    `embedding_bag` sums the weighted rows without materialising [P, k, D_t], let alone [P, V_t].
    """
    return F.embedding_bag(topk_ids, teacher_embedding, per_sample_weights=topk_probs.to(teacher_embedding.dtype),
                           mode="sum")


def topk_embedding_features(topk: TopKTarget, teacher_embedding: Tensor) -> Tensor:
    """The `topk_embeddings` projector input: teacher embeddings weighted by the top-k renormalised, float32 [P, D_t].

    Renormalised because the tail atom stands for many tokens and has no embedding of its own.
    """
    weights = torch.softmax(topk.logp.float(), dim=-1)
    device = teacher_embedding.device
    return teacher_features_from_topk(topk.ids.to(device), weights.to(device), teacher_embedding).float().to(
        topk.logp.device)


def _rows(student_hidden: Tensor | None, rows: slice) -> Tensor | None:
    return None if student_hidden is None else student_hidden[rows]


def projected_logits(projector: LogitProjector, teacher_features: Tensor, student_output_embedding: Tensor,
                     student_hidden: Tensor | None = None) -> Tensor:
    """Student-vocabulary logits [P, V_s] of the projected teacher features, through the DETACHED student embedding.

    Call it on one chunk of positions at a time; its width is the student vocabulary, never the teacher's.
    """
    projected = upcast(projector(teacher_features, student_hidden))
    return projected @ upcast(student_output_embedding.detach()).T


def anchor_loss(
    projector: LogitProjector,
    teacher_features: Tensor,
    student_output_embedding: Tensor,
    target_ids: Tensor,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    student_hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the projected logits on the true next student token: (sum over positions, count).

    Only the projector receives a gradient. Each chunk's logits are recomputed in backward (checkpointing), so at
    most one chunk of [chunk, V_s] float32 logits is alive at a time.
    """
    total = teacher_features.new_zeros((), dtype=torch.promote_types(teacher_features.dtype, torch.float32))
    for rows in chunk_slices(teacher_features.shape[0], chunk_size):
        total = total + torch.utils.checkpoint.checkpoint(
            _anchor_chunk_sum, projector, teacher_features[rows], student_output_embedding, target_ids[rows],
            _rows(student_hidden, rows), use_reentrant=False,
        )
    return total, (target_ids != IGNORE_INDEX).sum()


def _anchor_chunk_sum(projector, features: Tensor, embedding: Tensor, targets: Tensor,
                      student_hidden: Tensor | None) -> Tensor:
    logits = projected_logits(projector, features, embedding, student_hidden)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def projected_target(
    projector: LogitProjector,
    teacher_features: Tensor,
    student_output_embedding: Tensor,
    top_k: int,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    student_hidden: Tensor | None = None,
) -> MappedTarget:
    """The projector's distribution as a KD target, DETACHED: its top-k on the student vocabulary plus a tail atom,
    the same kind of target the first-token strategy gives, so both feed the same divergences.

    No gradient: inside the KD term the projector plays the teacher, and a teacher that KD can move is simply pulled
    towards the student (the anchor is what trains it).
    """
    every_id = torch.ones(student_output_embedding.shape[0], dtype=torch.bool, device=teacher_features.device)
    parts = [
        teacher_topk(projected_logits(projector, teacher_features[rows], student_output_embedding,
                                      _rows(student_hidden, rows)), top_k, every_id)
        for rows in chunk_slices(teacher_features.shape[0], chunk_size)
    ]
    return TopKTarget.concatenate(parts).as_support()


# ---------------------------------------------------------------------------------------------------------------------
# Pre-fit


@dataclass(frozen=True)
class AnchorData:
    """Aligned positions for fitting the projector: teacher features, the true next student token, and (for the
    residual projector) the student's final hidden state there."""

    teacher_features: Tensor  # [P, D_t]
    target_ids: Tensor  # int64 [P]
    student_hidden: Tensor | None = None  # [P, D_s]

    def __len__(self) -> int:
        return self.target_ids.shape[0]

    def rows(self, index: Tensor) -> AnchorData:
        hidden = None if self.student_hidden is None else self.student_hidden[index]
        return AnchorData(self.teacher_features[index], self.target_ids[index], hidden)

    def anchor(self, projector: LogitProjector, student_output_embedding: Tensor, chunk_size: int) -> Tensor:
        """Mean anchor cross-entropy over these positions (with gradient to the projector)."""
        total, count = anchor_loss(projector, self.teacher_features, student_output_embedding, self.target_ids,
                                   chunk_size, self.student_hidden)
        return total / count.clamp_min(1)

    def mean_nll(self, projector: LogitProjector, student_output_embedding: Tensor, chunk_size: int) -> float:
        with torch.no_grad():
            return float(self.anchor(projector, student_output_embedding, chunk_size))


@dataclass(frozen=True)
class PrefitReport:
    steps: int
    heldout_nll: float  # the projector's mean NLL of the true next student token on held-out positions (best kept)
    student_nll: float  # the frozen student's own mean NLL on the same positions
    beats_student: bool  # False: the projector never got below the student on held-out positions

    def describe(self) -> str:
        verdict = "beats" if self.beats_student else "does NOT beat"
        return (f"projector pre-fit: {self.steps} steps, held-out NLL {self.heldout_nll:.3f} {verdict} "
                f"the student's {self.student_nll:.3f}")


def least_squares_init(projector: LogitProjector, teacher_features: Tensor, student_hidden: Tensor,
                       ridge: float = 0.1) -> None:
    """Start a plain (non-residual) projector as the ridge regression of the student's final hidden state on the
    standardised teacher features.

    Then the projected logits ≈ the student's own logits: the pre-fit starts near the student's NLL instead of from
    ~17 nats, and the cross-entropy steps only have to add what the teacher knows beyond the student.
    """
    x = projector.standardise(teacher_features).double()
    y = student_hidden.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    x, y = x - mean_x, y - mean_y
    # Ridge scaled by the features' average energy, so it means the same for features of any scale. It is strong
    # because pre-fit sets are small: ~900 pairs for 896 features interpolate the training pairs with ridge 1e-3
    # and the held-out NLL was 8.2 (bench/step0_sanity.py, first attempt).
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, x.T @ y).T  # [D_s, D_t]
    with torch.no_grad():
        projector.linear.weight.copy_(weight)
        projector.linear.bias.copy_(mean_y - weight @ mean_x)


def prefit_projector(
    projector: LogitProjector,
    student_output_embedding: Tensor,
    train: AnchorData,
    heldout: AnchorData,
    student_heldout_nll: float,
    max_steps: int = 200,
    lr: float = 1e-4,
    batch_pairs: int = 512,
    eval_every: int = 10,
    patience: int = 3,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    seed: int = 0,
) -> PrefitReport:
    """Fit the projector alone (the student frozen: its embedding is only read, detached) with the cross-entropy
    anchor: Adam on shuffled mini-batches of `batch_pairs` training pairs (lr 1e-4: at 1e-3 the first steps of the
    residual correction overshoot and the held-out NLL never improves on the reference pair), the held-out NLL checked every
    `eval_every` steps; stops after `patience` checks without improvement or `max_steps`, and keeps the best
    projector seen (pre-fit sets are small and a longer fit overfits them)."""
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best_nll = heldout.mean_nll(projector, student_output_embedding, chunk_size)
    best_state = copy.deepcopy(projector.state_dict())
    steps = checks_without_gain = 0
    order = torch.empty(0, dtype=torch.long)
    while steps < max_steps and checks_without_gain < patience:
        for _ in range(min(eval_every, max_steps - steps)):
            if order.numel() == 0:
                order = torch.randperm(len(train), generator=generator)
            batch, order = order[:batch_pairs], order[batch_pairs:]
            optimizer.zero_grad(set_to_none=True)
            train.rows(batch.to(train.target_ids.device)).anchor(projector, student_output_embedding,
                                                                 chunk_size).backward()
            optimizer.step()
            steps += 1
        nll = heldout.mean_nll(projector, student_output_embedding, chunk_size)
        if nll < best_nll:
            best_nll, best_state, checks_without_gain = nll, copy.deepcopy(projector.state_dict()), 0
        else:
            checks_without_gain += 1
    projector.load_state_dict(best_state)
    return PrefitReport(steps, best_nll, student_heldout_nll, best_nll < student_heldout_nll)


# ---------------------------------------------------------------------------------------------------------------------
# The transfer


@dataclass(frozen=True)
class PrefitPairs:
    """The aligned pairs of the projector's pre-fit batches."""

    teacher_features: Tensor  # [P, D_t] what the projector reads of the teacher (`ProjectorTransfer.teacher_features`)
    after_sink: Tensor  # bool [P] the teacher position is not window position 0
    target_ids: Tensor  # [P] the true next student token
    student_hidden: Tensor  # [P, D_s] the student's final hidden state
    student_nll: float  # the frozen student's own mean NLL of the true next tokens


@dataclass(frozen=True)
class ProjectorInputs:
    """What the projector reads at a micro-batch's KD pairs, computed once for both its KD target and its anchor."""

    teacher_features: Tensor  # [P, D_t] window position 0 at the fitted mean
    student_rows: Tensor | None  # [P, D_s] the student's final hidden state (the residual projector only)


@register_transfer
class ProjectorTransfer(DivergenceTransfer):
    """A learned map of standardised teacher features through the student's detached output embedding
    (`LogitProjector`): its top-k is the KD target, pre-fitted before the first step and kept a good predictor of the
    true next student token by the anchor term (`objective.projector_anchor_alpha`)."""

    name = "projector"
    exclusive_options = {"projector_features": PROJECTOR_FEATURES}
    extra_term_names = ("anchor",)

    @classmethod
    def teacher_needs(cls, objective) -> TeacherNeeds:
        if objective.projector_features == "final_hidden":
            return TeacherNeeds(final_hidden=True)
        return TeacherNeeds(topk=True)  # topk_embeddings: the teacher's output embedding weighted by its top-k

    @classmethod
    def prepares_on_training_windows(cls, objective) -> bool:
        return True

    @classmethod
    def build_modules(cls, objective, teacher_hidden: int, student_hidden: int) -> dict[str, nn.Module]:
        return {"projector": LogitProjector(teacher_hidden, student_hidden, residual=objective.projector_residual)}

    def __init__(self, config, teacher, student):
        super().__init__(config, teacher, student)
        objective = config.objective
        self.projector = self.build_modules(objective, teacher.model.config.hidden_size,
                                            student.model.config.hidden_size)["projector"]
        self.reads_final_hidden = objective.projector_features == "final_hidden"
        self.anchor_alpha = objective.projector_anchor_alpha
        self.top_k = objective.kd_top_k
        self.prefit_steps = objective.projector_prefit_steps
        self.lr_multiplier = config.optimizer.projector_lr_multiplier
        self.teacher_embedding = teacher.model.get_output_embeddings().weight  # frozen, read by `topk_embeddings`

    def modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def parameter_groups(self) -> list[ParameterGroup]:
        return [ParameterGroup("projector", list(self.projector.parameters()), self.lr_multiplier)]

    @property
    def needs_preparation(self) -> bool:
        return True

    def prepare(self, batches, signal_of, student_model, device) -> str:
        """Fit the feature standardisation, then pre-fit the projector with the student frozen (a random plain
        projector gives a confident random target, ~17 nats of KL at step 0; the residual one starts as the student
        and must learn what the teacher adds before it teaches anything)."""
        self.projector.to(device)
        # Three quarters fit, one quarter decides when to stop (a tiny corpus with one batch uses it for both).
        split = max(1, (3 * len(batches)) // 4)
        fit = self._prefit_pairs(batches[:split], signal_of, student_model)
        check = self._prefit_pairs(batches[split:] or batches[:split], signal_of, student_model)
        # Statistics from the pairs after window position 0 (the attention sink, see `without_sink`).
        fit_standardisation_after_sink(self.projector, fit.teacher_features, fit.after_sink)
        train, heldout = (anchor_data(self.projector, pairs.teacher_features, pairs.after_sink, pairs.target_ids,
                                      pairs.student_hidden) for pairs in (fit, check))
        if not self.projector.residual:
            least_squares_init(self.projector, train.teacher_features, fit.student_hidden)
        embedding = student_model.get_output_embeddings().weight
        report = prefit_projector(self.projector, embedding, train, heldout, check.student_nll,
                                  max_steps=self.prefit_steps, chunk_size=self.chunk_size)
        return report.describe()

    @torch.no_grad()
    def _prefit_pairs(self, batches, signal_of, student_model) -> PrefitPairs:
        features, targets, hidden_rows, nll, after_sinks = [], [], [], [], []
        for batch in batches:
            signal = signal_of(batch)
            hidden = student_model(**student_forward_kwargs(batch)).hidden_states[-1]
            # The pre-fit learns from the pairs the run trains: a loss mask (the prompts of conversations) removes
            # the others, as it does from every term.
            trained = (slice(None) if batch.student_loss_mask is None
                       else batch.student_loss_mask[batch.pair_batch, batch.pair_student_pos])
            pair_batch, pair_student_pos = batch.pair_batch[trained], batch.pair_student_pos[trained]
            rows = hidden[pair_batch, pair_student_pos]
            next_ids = batch.student_targets[pair_batch, pair_student_pos]
            logits = student_model.get_output_embeddings()(rows).float()
            nll.append(F.cross_entropy(logits, next_ids, reduction="none"))
            features.append(self.teacher_features(signal, trained))
            targets.append(next_ids)
            hidden_rows.append(rows.float())
            after_sinks.append(after_sink(batch.pair_teacher_pos[trained]))
        return PrefitPairs(*(torch.cat(parts) for parts in (features, after_sinks, targets, hidden_rows)),
                           torch.cat(nll).mean().item())

    def teacher_features(self, signal: TeacherSignal, rows: Tensor | slice = slice(None)) -> Tensor:
        """What the projector reads of the teacher at the selected pairs (`objective.projector_features`), float32."""
        if self.reads_final_hidden:
            return signal.final_hidden[rows].float()
        return topk_embedding_features(signal.topk.select(rows), self.teacher_embedding)

    def micro_batch_inputs(self, signal, batch, selection, student_hidden) -> ProjectorInputs:
        mask = selection.kd_pairs
        features = without_sink(self.teacher_features(signal, mask), after_sink(batch.pair_teacher_pos)[mask],
                                self.projector.feature_mean)
        return ProjectorInputs(features, student_hidden[selection.kd_rows] if self.projector.residual else None)

    def kd_target(self, signal, selection, inputs: ProjectorInputs, student_embedding) -> MappedTarget:
        return projected_target(self.projector, inputs.teacher_features, student_embedding, self.top_k,
                                self.chunk_size, inputs.student_rows)

    def extra_terms(self, inputs: ProjectorInputs, selection, student_embedding) -> dict[str, Term]:
        # The anchor keeps the projector a good predictor of the true next student token while the student moves.
        next_ids = selection.lm_targets[selection.kd_rows]
        anchor_sum, _ = anchor_loss(self.projector, inputs.teacher_features, student_embedding, next_ids,
                                    self.chunk_size, inputs.student_rows)
        return {"anchor": Term(anchor_sum, PER_TOKEN, count_key="kd", scale=self.anchor_alpha)}
