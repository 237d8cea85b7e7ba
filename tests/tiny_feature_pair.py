"""A tiny random Llama-like student and Qwen2-MoE-like teacher with synthetic aligned pairs, for the feature terms.

Different widths and depths on purpose (student 32 x 4 blocks, teacher 48 x 3 blocks); no tokenizer is needed
because the pairs are synthetic: monotone in both sequences, with (0, 0) included, then passed to the terms as a
micro-batch's position selection gives them (`AlignedPairs.without_window_start`, crosskd.losses.selection).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from crosskd.losses.features import AlignedPairs, SummedLoss
from crosskd.losses.calibration import HiddenStateStats, estimate

STUDENT_HIDDEN, STUDENT_LAYERS, STUDENT_VOCAB, STUDENT_LEN = 32, 4, 100, 12
TEACHER_HIDDEN, TEACHER_LAYERS, TEACHER_VOCAB, TEACHER_LEN = 48, 3, 120, 10
BATCH = 3


def tiny_student(num_layers: int = STUDENT_LAYERS, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=STUDENT_VOCAB,
        hidden_size=STUDENT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def tiny_teacher(seed: int = 1) -> Qwen2MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=TEACHER_VOCAB,
        hidden_size=TEACHER_HIDDEN,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=TEACHER_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        attn_implementation="eager",
    )
    return Qwen2MoeForCausalLM(config).eval()


def synthetic_pairs(generator: torch.Generator) -> AlignedPairs:
    """Per row: (0, 0) plus a random monotone matching of student positions 1.. to teacher positions 1.."""
    rows, student_pos, teacher_pos = [], [], []
    count = min(STUDENT_LEN, TEACHER_LEN) - 2
    for row in range(BATCH):
        student = torch.randperm(STUDENT_LEN - 1, generator=generator)[:count].sort().values + 1
        teacher = torch.randperm(TEACHER_LEN - 1, generator=generator)[:count].sort().values + 1
        rows.append(torch.full((count + 1,), row))
        student_pos.append(torch.cat([torch.zeros(1, dtype=torch.long), student]))
        teacher_pos.append(torch.cat([torch.zeros(1, dtype=torch.long), teacher]))
    return AlignedPairs(torch.cat(rows), torch.cat(student_pos), torch.cat(teacher_pos))


@dataclass
class TinyBatch:
    student: LlamaForCausalLM
    student_ids: Tensor
    teacher_hidden_states: tuple[Tensor, ...]
    teacher_attentions: tuple[Tensor, ...]
    pairs: AlignedPairs  # the feature pairs: window position 0 left out, as the position selection does
    stats: HiddenStateStats

    def student_forward(self):
        return self.student(self.student_ids, output_hidden_states=True, output_attentions=True)


def tiny_batch(student_layers: int = STUDENT_LAYERS, seed: int = 0) -> TinyBatch:
    generator = torch.Generator().manual_seed(seed)
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher_out = teacher(
            torch.randint(TEACHER_VOCAB, (BATCH, TEACHER_LEN), generator=generator),
            output_hidden_states=True,
            output_attentions=True,
        )
    mask = torch.ones(BATCH, TEACHER_LEN, dtype=torch.long)
    stats = estimate([(teacher_out.hidden_states, mask)], layers=range(TEACHER_LAYERS + 1))
    return TinyBatch(
        student=tiny_student(student_layers),
        student_ids=torch.randint(STUDENT_VOCAB, (BATCH, STUDENT_LEN), generator=generator),
        teacher_hidden_states=teacher_out.hidden_states,
        teacher_attentions=teacher_out.attentions,
        pairs=synthetic_pairs(generator).without_window_start(),
        stats=stats,
    )


def optimise_alone(
    loss_of_student_output: Callable[[object], SummedLoss], batch: TinyBatch, heads: Iterable[nn.Parameter], steps: int
) -> list[float]:
    """Per-position loss over a few Adam steps on this term alone (student and heads), fresh student forward each."""
    optimizer = torch.optim.Adam([*batch.student.parameters(), *heads], lr=1e-2)
    history = []
    for _ in range(steps):
        loss = loss_of_student_output(batch.student_forward())
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        history.append(loss.mean().item())
    return history


def gradient_totals(loss: SummedLoss, batch: TinyBatch, heads: nn.Module) -> tuple[float, float]:
    """Total absolute gradient on the student's and on the heads' parameters after one backward of ``loss``."""
    batch.student.zero_grad()
    heads.zero_grad()
    loss.sum.backward()

    def total(module: nn.Module) -> float:
        return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)

    return total(batch.student), total(heads)
