"""The teacher signal computed online: one frozen forward per batch, reduced at once to what the vocabulary transfer
needs (`TeacherNeeds`).

The teacher's logits are never materialised for the whole batch: its final hidden states are gathered at the aligned
positions and pushed through its output layer a chunk at a time, keeping only the top-k at τ=1 (losses/target.py),
and, when a transfer reads them, the log-probability of the teacher's own next token at every teacher position.
A cached teacher (teacher/cache.py) serves the same `TeacherSignal`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from crosskd.losses.chunking import chunk_slices
from crosskd.losses.target import TopKTarget, observed_logp_and_topk, teacher_topk
from crosskd.models.moe import expert_usage_entropy, is_moe_config


@dataclass(frozen=True)
class TeacherNeeds:
    """What a vocabulary transfer reads of the teacher at the aligned pairs (`VocabularyTransfer.teacher_needs`): the
    online teacher computes, and a cache stores, only these parts of the `TeacherSignal`."""

    topk: bool = False
    final_hidden: bool = False
    # At every teacher position, not only at the pairs (declared after the pair parts: a cache's `signal` names its
    # parts in this order, so caches of the older parts keep their name).
    observed_logprobs: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        """The `TeacherSignal` fields these needs name, in declaration order."""
        return tuple(field.name for field in fields(self) if getattr(self, field.name))


@dataclass
class TeacherSignal:
    # The teacher's top-k at τ=1 and tail mass, at the aligned pairs, in the teacher's vocabulary.
    topk: TopKTarget | None = None
    final_hidden: Tensor | None = None  # [P, H_t] its last hidden state (after its final norm) at the aligned pairs
    # float32 [B, M]: at each teacher position m, log p_teacher(teacher_input_ids[:, m + 1] | tokens ..m) at τ=1 with
    # padded ids masked; 0.0 (a finite placeholder) where m + 1 is no real token: read it under `observed_token_mask`.
    observed_logprobs: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None  # every layer [B, M, H_t], when a feature term needs them
    attentions: tuple[Tensor, ...] | None = None  # [B, heads, M, M] per layer, when attention alignment is on
    # An MoE teacher's per-layer expert-usage entropy over the batch's real tokens, in [0, 1] (1: experts used evenly);
    # a collapsed router shows as values near 0 (crosskd.models.moe).
    expert_usage_entropy: Tensor | None = None


def observed_token_mask(teacher_attention_mask: Tensor) -> Tensor:
    """bool [B, M]: the teacher positions whose next token is a real token (where `observed_logprobs` is defined)."""
    has_next = torch.zeros_like(teacher_attention_mask, dtype=torch.bool)
    has_next[:, :-1] = teacher_attention_mask[:, 1:].bool()
    return has_next


class OnlineTeacher:
    def __init__(self, model, valid_mask: Tensor, top_k: int, chunk_size: int, needs: TeacherNeeds):
        self.model = model
        self.needs = needs
        self.valid_mask = valid_mask
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.moe_top_k = model.config.num_experts_per_tok if is_moe_config(model.config) else None

    @torch.no_grad()  # not inference_mode: the signal's tensors serve as targets inside autograd graphs
    def signal(self, batch, hidden_states: bool = False, attentions: bool = False) -> TeacherSignal:
        outputs = self.model.base_model(
            input_ids=batch.teacher_input_ids,
            attention_mask=batch.teacher_attention_mask,
            output_hidden_states=hidden_states,
            output_attentions=attentions,
            **({"output_router_logits": True} if self.moe_top_k else {}),
        )
        final = outputs.last_hidden_state[batch.pair_batch, batch.pair_teacher_pos]
        if self.needs.observed_logprobs:
            topk, observed = self._observed_and_topk(outputs.last_hidden_state, batch, final)
        else:
            topk, observed = self._topk(final) if self.needs.topk else None, None
        return TeacherSignal(
            topk=topk,
            observed_logprobs=observed,
            final_hidden=final if self.needs.final_hidden else None,
            hidden_states=outputs.hidden_states if hidden_states else None,
            attentions=outputs.attentions if attentions else None,
            expert_usage_entropy=(expert_usage_entropy(outputs.router_logits, self.moe_top_k,
                                                       batch.teacher_attention_mask)
                                  if self.moe_top_k else None),
        )

    def _topk(self, final: Tensor) -> TopKTarget:
        head = self.model.get_output_embeddings()
        valid_mask = self.valid_mask.to(final.device)
        return TopKTarget.concatenate([teacher_topk(head(final[rows]).float(), self.top_k, valid_mask, self.chunk_size)
                                       for rows in chunk_slices(final.shape[0], self.chunk_size)])

    def _observed_and_topk(self, hidden: Tensor, batch, final: Tensor) -> tuple[TopKTarget | None, Tensor]:
        """The observed-token log-probabilities [B, M] and, when needed, the top-k at the pairs, from one pass over
        the teacher positions that have a next token: each chunk's logits serve both, the top-k taking the chunk's
        pair rows (pairs are in flat position order, so they are a contiguous run of them)."""
        head = self.model.get_output_embeddings()
        valid_mask = self.valid_mask.to(hidden.device)
        width = hidden.shape[1]
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        rows = observed_token_mask(batch.teacher_attention_mask).reshape(-1).nonzero().squeeze(-1)
        next_ids = batch.teacher_input_ids.reshape(-1)[rows + 1]  # m + 1 stays in its row wherever m has a next token
        pair_rows = batch.pair_batch * width + batch.pair_teacher_pos
        observed = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
        flat_observed = observed.view(-1)
        topk_parts = []
        for chunk in chunk_slices(len(rows), self.chunk_size):
            chunk_rows = rows[chunk]
            in_chunk = None
            if self.needs.topk:
                first = int(torch.searchsorted(pair_rows, chunk_rows[0], side="left"))
                stop = int(torch.searchsorted(pair_rows, chunk_rows[-1], side="right"))
                in_chunk = torch.searchsorted(chunk_rows, pair_rows[first:stop])
            flat_observed[chunk_rows], topk = observed_logp_and_topk(head(flat_hidden[chunk_rows]).float(),
                                                                     next_ids[chunk], valid_mask, self.top_k,
                                                                     in_chunk)
            if topk is not None:
                topk_parts.append(topk)
        if not self.needs.topk:
            return None, observed
        return (TopKTarget.concatenate(topk_parts) if topk_parts else self._topk(final)), observed
