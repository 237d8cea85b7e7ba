"""`mismatch_policy: chain-rule` of the first-token strategy: the merge target, plus the teacher's view of how a
student token that runs past the teacher's next token continues (docs/VOCAB.md, "chain-rule").

At an aligned pair (i, j) whose student token s (token i + 1) runs past the teacher's token t_{j+1} and ends on a
teacher boundary (the next pair is (i + 1, j + m): teacher tokens t_{j+1} .. t_{j+m} spell s exactly), the teacher's
probability of the text of s is the chain Π_{l=1..m} p_T(t_{j+l} | ...), the sum of its observed-token
log-probabilities (`TeacherSignal.observed_logprobs`). `merge` gives the group G of s one atom with the teacher's
mass q_G and lets the student split it in its own proportions. Chain-rule splits it on the teacher's side too: s gets
min(chain, q_G), the rest of G the remainder. Forward KL over the atoms with G split in two decomposes exactly into

    KL_merge + q_G · KL([ρ, 1 - ρ] ‖ [σ, 1 - σ]),    ρ = q_s / q_G,  σ = p_s / p_G,

so the loss is merge's plus a binary term at those pairs, and every other pair is merge's. At τ ≠ 1 each level is
tempered on its own: the group atom among the K + 1 atoms exactly as merge tempers it, the split as
log_softmax([log ρ, log(1 - ρ)] / τ) (and the student's likewise), weighted by the tempered teacher group atom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from crosskd.data.collate import DualBatch
from crosskd.losses.chunking import upcast
from crosskd.losses.divergences import forward_kl
from crosskd.losses.lm import divergence_loss_sum
from crosskd.losses.target import MappedTarget, StudentGroups, log1mexp, pooled_with_members, target_atoms

CHAIN_RULE = "chain-rule"


@dataclass(frozen=True)
class ObservedChains:
    """Per aligned pair: whether its student token is a group member that runs past the teacher's next token and is
    spelled exactly by the teacher's tokens from there (`splits`), that student token, and the log of the teacher's
    chain probability of its text."""

    splits: Tensor  # bool [P]
    observed_id: Tensor  # int64 [P]: the student's next token at the pair
    chain_logp: Tensor  # float32 [P]: Σ of the teacher's observed-token log-probabilities over it (0 where not splits)

    def select(self, index: Tensor) -> ObservedChains:
        return ObservedChains(self.splits[index], self.observed_id[index], self.chain_logp[index])


def observed_chains(batch: DualBatch, observed_logprobs: Tensor, root_table: Tensor) -> ObservedChains:
    """The chains of every aligned pair of `batch` from the teacher's observed-token log-probabilities [B, M].

    The student token s at pair (i, j) ends on a teacher boundary exactly when the next aligned pair of its row is
    (i + 1, j + m): both tokenisations start a token at the byte after s. Then t_{j+1} .. t_{j+m} spell s.
    """
    pair_batch, student_pos, teacher_pos = batch.pair_batch, batch.pair_student_pos, batch.pair_teacher_pos
    observed_id = batch.student_input_ids[pair_batch, student_pos + 1]
    ends_on_teacher_boundary = torch.zeros_like(pair_batch, dtype=torch.bool)
    ends_on_teacher_boundary[:-1] = (pair_batch[1:] == pair_batch[:-1]) & (student_pos[1:] == student_pos[:-1] + 1)
    runs_past = batch.pair_student_next_bytes > batch.pair_teacher_next_bytes
    is_member = root_table.to(observed_id.device)[observed_id] != observed_id
    splits = runs_past & ends_on_teacher_boundary & is_member
    cover_end = teacher_pos.clone()
    cover_end[:-1] = torch.where(ends_on_teacher_boundary[:-1], teacher_pos[1:], teacher_pos[:-1])
    # Prefix sums in float64: the difference of two long float32 sums would lose most of the chain's digits.
    prefix = F.pad(observed_logprobs.double().cumsum(1), (1, 0))
    chain = (prefix[pair_batch, cover_end] - prefix[pair_batch, teacher_pos]).float()
    return ObservedChains(splits, observed_id, chain.masked_fill(~splits, 0.0))


@dataclass(frozen=True)
class ChainRuleTarget:
    """The merge target, and at the pairs where `splits` the teacher's split of the group atom at `group_slot`
    between the observed member and the rest of its group: log ρ = `observed_share_logp`."""

    merged: MappedTarget
    splits: Tensor  # bool [P]
    group_slot: Tensor  # int64 [P]: the support slot of the observed token's group root (0 where not splits)
    observed_id: Tensor  # int64 [P]
    observed_share_logp: Tensor  # float32 [P]: log ρ <= 0 (0 where not splits)

    @property
    def ids(self) -> Tensor:
        return self.merged.ids

    @property
    def observed_logp(self) -> Tensor:
        """log of the teacher mass the observed member gets at τ = 1, q_G · ρ (where `splits`)."""
        return upcast(self.merged.logp).gather(-1, self.group_slot.unsqueeze(-1)).squeeze(-1) + self.observed_share_logp

    def select(self, index: Tensor | slice) -> ChainRuleTarget:
        return ChainRuleTarget(self.merged.select(index), self.splits[index], self.group_slot[index],
                               self.observed_id[index], self.observed_share_logp[index])


def chain_rule_target(merged: MappedTarget, chains: ObservedChains, root_table: Tensor) -> ChainRuleTarget:
    """The chain-rule target at the KD pairs: `merged` (ids are group roots) and the chains there, in pair order.
    A pair whose observed token's group is not on the support (its teacher mass is in the tail) stays merge's."""
    roots = root_table.to(chains.observed_id.device)[chains.observed_id]
    at_root = (merged.ids == roots.unsqueeze(-1)) & merged.mask
    splits = chains.splits & at_root.any(-1)
    group_slot = at_root.int().argmax(-1).masked_fill(~splits, 0)
    group_logp = upcast(merged.logp).gather(-1, group_slot.unsqueeze(-1)).squeeze(-1)
    # The chain starts with the teacher's own next token, usually one of the group's teacher tokens, so it is at most
    # q_G; where the group is another's (the context tokenised differently) the observed member takes all of it.
    share = (chains.chain_logp - group_logp).clamp_max(0.0).masked_fill(~splits, 0.0)
    return ChainRuleTarget(merged, splits, group_slot, chains.observed_id, share)


def split_kl(student_logp: Tensor, target: ChainRuleTarget, temperature: float, groups: StudentGroups) -> Tensor:
    """[n]: q_G,τ · KL(teacher split ‖ student split) at positions that all split, from the student's float32
    log-probabilities [n, V]. The student's split is [p_s, p_G - p_s] with the rest summed directly (the root and
    the other members), never as a difference, so it stays exact when s holds almost all of the group."""
    root = target.merged.ids.gather(-1, target.group_slot.unsqueeze(-1))
    observed = student_logp.gather(-1, target.observed_id.unsqueeze(-1)).squeeze(-1)
    rest = pooled_with_members(student_logp.gather(-1, root),
                               groups.member_mass_at(student_logp, root, target.observed_id)).squeeze(-1)
    student_split = torch.stack([observed, rest], dim=-1).div(temperature).log_softmax(-1)
    share = upcast(target.observed_share_logp)
    teacher_split = torch.stack([share, log1mexp(share)], dim=-1).div(temperature).log_softmax(-1)
    group_atom = target_atoms(target.merged, temperature).gather(-1, target.group_slot.unsqueeze(-1)).squeeze(-1)
    return group_atom.exp() * forward_kl(student_split, teacher_split)


def chain_rule_loss_sum(student_logp: Tensor, target: ChainRuleTarget, temperature: float,
                        groups: StudentGroups) -> tuple[Tensor, int]:
    """One chunk's KD sum: merge's forward KL at every position plus the split term where the target splits."""
    kd_sum, count = divergence_loss_sum(student_logp, target.merged, forward_kl, temperature, groups)
    rows = target.splits.nonzero().squeeze(-1)
    if len(rows) == 0:
        return kd_sum, count
    return kd_sum + split_kl(student_logp[rows], target.select(rows), temperature, groups).sum(), count
