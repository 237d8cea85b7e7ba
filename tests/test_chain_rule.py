"""`mismatch_policy: chain-rule`: at a run-past pair the observed group member gets the teacher's chain probability of
its text, the loss is merge's plus an exact within-group term (zero at equal distributions, a gradient where merge
has none), every other pair is merge's; config rules; training online and from a cache."""

from __future__ import annotations

import math

import pytest
import torch

from crosskd.api import cache_teacher
from crosskd.config import ConfigError
from crosskd.data.collate import DualBatch
from crosskd.losses.divergences import forward_kl
from crosskd.losses.lm import divergence_loss_sum
from crosskd.losses.target import MappedTarget, StudentGroups
from crosskd.teacher.online import OnlineTeacher
from crosskd.vocab.chain_rule import (
    ChainRuleTarget,
    ObservedChains,
    chain_rule_loss_sum,
    chain_rule_target,
    observed_chains,
    split_kl,
)
from crosskd.vocab.transfer import transfer_class
from trainer_helpers import log_records, run_training, tiny_config

# Student vocabulary of 6: ids 4 and 5 are members of the group of root 1 (like '\n    ', '\n        ' -> '\n').
ROOT_TABLE = torch.tensor([0, 1, 2, 3, 1, 1])
GROUPS = StudentGroups.from_root_table(ROOT_TABLE)
ROOT, OBSERVED, OTHER_MEMBER = 1, 4, 5


def hand_built_batch() -> DualBatch:
    """One row. Student tokens [2, 4, 3, 5, 0, 1]; teacher tokens [7, 8, 9, 6, 5, 4, 3]. Pairs:
    (0, 0): the student's next token 4 (4 bytes) runs past the teacher's (1 byte) and the next pair is (1, 2), so
            teacher tokens 1 and 2 spell it: a split pair;
    (1, 2): not run-past;
    (2, 3): run-past (member 5), but the next pair is (4, 5): token 5 does not end on a teacher boundary;
    (4, 5): the next token 1 is a root."""
    student = torch.tensor([[2, 4, 3, 5, 0, 1]])
    teacher = torch.tensor([[7, 8, 9, 6, 5, 4, 3]])
    return DualBatch(
        student_input_ids=student, student_targets=torch.tensor([[4, 3, 5, 0, 1, -100]]),
        student_attention_mask=torch.ones_like(student), teacher_input_ids=teacher,
        teacher_attention_mask=torch.ones_like(teacher), pair_batch=torch.tensor([0, 0, 0, 0]),
        pair_student_pos=torch.tensor([0, 1, 2, 4]), pair_teacher_pos=torch.tensor([0, 2, 3, 5]),
        pair_student_next_bytes=torch.tensor([4, 1, 6, 3]), pair_teacher_next_bytes=torch.tensor([1, 1, 2, 1]),
        text_bytes=torch.tensor([16]),
    )


OBSERVED_LOGPROBS = torch.tensor([[-0.3, -0.9, -0.2, -1.1, -0.4, -0.7, 0.0]])  # the last entry is the placeholder


def merged_target(group_logp: float) -> MappedTarget:
    """A merge target with the group of root 1 on the support at slot 1."""
    logp = torch.tensor([[math.log(0.2), group_logp, math.log(0.1)]], dtype=torch.float64)
    tail = torch.log1p(-logp.exp().sum(-1))
    return MappedTarget(torch.tensor([[0, ROOT, 2]]), logp, torch.ones(1, 3, dtype=torch.bool), tail)


def test_the_observed_member_gets_the_chain_product_of_the_teachers_observed_tokens():
    chains = observed_chains(hand_built_batch(), OBSERVED_LOGPROBS, ROOT_TABLE)
    assert chains.splits.tolist() == [True, False, False, False]
    assert chains.observed_id.tolist() == [4, 3, 5, 1]
    # p_T(t_1) · p_T(t_2 | t_1): teacher positions 0 and 1 (the pair's own and the next).
    assert chains.chain_logp[0].item() == pytest.approx(-0.3 - 0.9)
    assert chains.chain_logp[1:].tolist() == [0.0, 0.0, 0.0]

    target = chain_rule_target(merged_target(math.log(0.6)), chains.select(torch.tensor([0])), ROOT_TABLE)
    assert target.splits.tolist() == [True] and target.group_slot.tolist() == [1]
    assert target.observed_logp.exp().item() == pytest.approx(math.exp(-1.2))
    assert target.observed_share_logp.exp().item() == pytest.approx(math.exp(-1.2) / 0.6)


def test_a_chain_above_the_groups_teacher_mass_gives_the_member_all_of_it_and_no_group_on_the_support_is_merge():
    chains = ObservedChains(torch.tensor([True]), torch.tensor([OBSERVED]), torch.tensor([-0.1]))
    assert chain_rule_target(merged_target(math.log(0.3)), chains, ROOT_TABLE).observed_share_logp.item() == 0.0
    off_support = MappedTarget(torch.tensor([[0, 2]]), torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2, dtype=torch.bool),
                               torch.tensor([-0.5]))
    assert not chain_rule_target(off_support, chains, ROOT_TABLE).splits.any()


def student_logp(seed: int = 0, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    logits.requires_grad_(requires_grad)
    return logits, logits.log_softmax(-1)


def split_target(group_logp: float, share_logp: float) -> ChainRuleTarget:
    return ChainRuleTarget(merged_target(group_logp), torch.tensor([True]), torch.tensor([1]),
                           torch.tensor([OBSERVED]), torch.tensor([share_logp], dtype=torch.float64))


def test_the_loss_is_the_forward_kl_over_the_split_atoms():
    _, logp = student_logp()
    target = split_target(math.log(0.6), math.log(0.25))
    value, count = chain_rule_loss_sum(logp, target, 1.0, GROUPS)
    p = logp[0].exp()
    student = torch.stack([p[0], p[4], p[1] + p[5], p[2], p[3]])  # 0, s, rest of the group, 2, tail (id 3)
    teacher = torch.tensor([0.2, 0.6 * 0.25, 0.6 * 0.75, 0.1, 0.1], dtype=torch.float64)
    assert count == 1
    assert value.item() == pytest.approx(float((teacher * (teacher / student).log()).sum()), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_teacher_equal_to_the_student_gives_zero(temperature):
    _, logp = student_logp()
    p = logp[0].exp()
    group = p[ROOT] + p[OBSERVED] + p[OTHER_MEMBER]
    merged = MappedTarget(torch.tensor([[0, ROOT, 2, 3]]), torch.stack([p[0], group, p[2], p[3]]).log()[None],
                          torch.ones(1, 4, dtype=torch.bool), torch.tensor([-math.inf], dtype=torch.float64))
    chains = ObservedChains(torch.tensor([True]), torch.tensor([OBSERVED]), logp[:, OBSERVED])
    target = chain_rule_target(merged, chains, ROOT_TABLE)
    assert target.splits.all()
    value, _ = chain_rule_loss_sum(logp, target, temperature, GROUPS)
    assert abs(value.item()) < 1e-12


def test_the_within_group_split_gets_a_gradient_where_merge_has_none():
    logits, logp = student_logp(requires_grad=True)
    target = split_target(math.log(0.6), math.log(0.25))
    p = logp[0].detach().exp()
    # Moving mass from the other member to the observed one at a fixed group mass: dz = e_s / p_s - e_o / p_o.
    within_group = torch.zeros(6, dtype=torch.float64)
    within_group[OBSERVED], within_group[OTHER_MEMBER] = 1 / p[OBSERVED], -1 / p[OTHER_MEMBER]
    merge, _ = divergence_loss_sum(logp, target.merged, forward_kl, 1.0, GROUPS)
    (merge_grad,) = torch.autograd.grad(merge, logits, retain_graph=True)
    chain, _ = chain_rule_loss_sum(logp, target, 1.0, GROUPS)
    (chain_grad,) = torch.autograd.grad(chain, logits)
    assert abs(float(merge_grad[0] @ within_group)) < 1e-12
    assert abs(float(chain_grad[0] @ within_group)) > 1e-3


def test_every_pair_that_does_not_split_is_merge_exactly():
    logp = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    merged = MappedTarget(torch.tensor([[0, ROOT, 2]] * 3), torch.log(torch.tensor([[0.2, 0.6, 0.1]] * 3)),
                          torch.ones(3, 3, dtype=torch.bool), torch.log(torch.tensor([0.1] * 3)))
    chains = ObservedChains(torch.tensor([False, True, False]), torch.tensor([2, OBSERVED, 3]),
                            torch.tensor([0.0, -1.5, 0.0]))
    target = chain_rule_target(merged, chains, ROOT_TABLE)
    for row in (0, 2):
        index = torch.tensor([row])
        got, _ = chain_rule_loss_sum(logp[index], target.select(index), 1.0, GROUPS)
        expected, _ = divergence_loss_sum(logp[index], merged.select(index), forward_kl, 1.0, GROUPS)
        assert torch.equal(got, expected)
    total, _ = chain_rule_loss_sum(logp, target, 1.0, GROUPS)
    merge_total, _ = divergence_loss_sum(logp, merged, forward_kl, 1.0, GROUPS)
    index = torch.tensor([1])
    torch.testing.assert_close(total - merge_total, split_kl(logp[index], target.select(index), 1.0, GROUPS).sum())


def test_split_kl_passes_gradcheck():
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    target = ChainRuleTarget(merged_target(math.log(0.6)).select(torch.tensor([0, 0])), torch.tensor([True, True]),
                             torch.tensor([1, 1]), torch.tensor([OBSERVED, OTHER_MEMBER]),
                             torch.tensor([math.log(0.3), math.log(0.9)], dtype=torch.float64))
    for temperature in (1.0, 2.5):
        assert torch.autograd.gradcheck(lambda z: split_kl(z.log_softmax(-1), target, temperature, GROUPS), (logits,))


# --- the config and the teacher's needs ---------------------------------------------------------------------------


def test_chain_rule_declares_the_observed_logprobs_and_the_other_policies_do_not(tmp_path):
    for policy, parts in (("chain-rule", ("topk", "observed_logprobs")), ("merge", ("topk",)), ("exclude", ("topk",))):
        objective = tiny_config(tmp_path, f"objective.mismatch_policy={policy}").objective
        assert transfer_class(objective).teacher_needs(objective).parts == parts


def test_chain_rule_with_another_divergence_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="chain-rule splits the forward KL.*objective.divergence 'reverse_kl'"):
        tiny_config(tmp_path, "objective.mismatch_policy=chain-rule", "objective.divergence=reverse_kl")
    with pytest.raises(ConfigError, match="only to the first-token strategy"):
        tiny_config(tmp_path, "objective.strategy=uld", "objective.divergence=null",
                    "objective.mismatch_policy=chain-rule")


# --- training ---------------------------------------------------------------------------------------------------------

# The tiny pair with the roles swapped: the student's 700-entry BPE has tokens that run past the teacher's 300-entry
# one (the other way round, the larger vocabulary holds every merge of the smaller one and nothing runs past).
SWAPPED_PAIR = ("models.teacher=tiny:student", "models.student=tiny:teacher")
STEPS = 3


def test_chain_rule_trains_online_and_from_a_cache_with_the_same_losses(tmp_path, monkeypatch):
    common = (*SWAPPED_PAIR, f"training.max_steps={STEPS}", "schedule.kd_warmup_start=1.0")
    merge = tiny_config(tmp_path / "merge", *common)
    online = tiny_config(tmp_path / "online", *common, "objective.mismatch_policy=chain-rule")
    cached = tiny_config(tmp_path / "cached", *common, "objective.mismatch_policy=chain-rule",
                         f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.source=cache")
    run_training(merge)
    run_training(online)
    cache_teacher(cached, progress=False)
    monkeypatch.setattr(OnlineTeacher, "signal", lambda *a, **k: pytest.fail("the online teacher ran"))
    run_training(cached)
    merge_logs, online_logs, cached_logs = (log_records(c.output.run_dir) for c in (merge, online, cached))
    assert len(online_logs) == len(cached_logs) == STEPS
    for from_merge, exact, from_cache in zip(merge_logs, online_logs, cached_logs):
        assert all(math.isfinite(r["loss/kd"]) for r in (exact, from_cache))
        assert math.isclose(from_cache["loss/kd"], exact["loss/kd"], rel_tol=1e-3)
        assert math.isclose(from_cache["loss/lm"], exact["loss/lm"], rel_tol=1e-4)
    # The split term is there: chain-rule's KD is above merge's from the first step (same weights at step 1).
    assert online_logs[0]["loss/kd"] > merge_logs[0]["loss/kd"]
