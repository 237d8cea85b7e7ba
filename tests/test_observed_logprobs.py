"""The teacher's log-probability of its own observed next token at every teacher position (`TeacherNeeds.
observed_logprobs`): equal to a direct log_softmax over its full logits, chunk size irrelevant, the top-k unchanged."""

from __future__ import annotations


import pytest
import torch

from crosskd.teacher.online import OnlineTeacher, TeacherNeeds, observed_token_mask
from trainer_helpers import models_and_batches, tiny_config

TOP_K = 8


@pytest.fixture(scope="module")
def teacher_and_batches(tmp_path_factory):
    teacher, _, batches = models_and_batches(tiny_config(tmp_path_factory.mktemp("observed")), batch_size=3, count=2)
    return teacher, batches


def direct_observed_logprobs(teacher, batch) -> torch.Tensor:
    """log_softmax over the full [B, M, V] logits (padded ids masked), gathered at the next token."""
    with torch.no_grad():
        logits = teacher.model(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask).logits
    logp = teacher.vocab.mask_logits(logits.float()).log_softmax(-1)
    observed = logp[:, :-1].gather(-1, batch.teacher_input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(observed, (0, 1))


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_observed_logprobs_equal_a_direct_log_softmax_over_the_full_logits(teacher_and_batches, chunk_size):
    teacher, batches = teacher_and_batches
    online = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, TOP_K, chunk_size,
                           TeacherNeeds(observed_logprobs=True))
    for batch in batches:
        signal = online.signal(batch)
        has_next = observed_token_mask(batch.teacher_attention_mask)
        assert signal.topk is None and signal.observed_logprobs.dtype == torch.float32
        assert signal.observed_logprobs.shape == batch.teacher_input_ids.shape
        expected = direct_observed_logprobs(teacher, batch)
        torch.testing.assert_close(signal.observed_logprobs[has_next], expected[has_next], rtol=1e-5, atol=1e-5)
        assert (signal.observed_logprobs[has_next] < 0).all()
        # Positions without a next real token hold a finite placeholder, never NaN.
        assert (signal.observed_logprobs[~has_next] == 0).all()
    assert (~observed_token_mask(batches[0].teacher_attention_mask)).any()


def test_the_top_k_read_from_the_shared_chunks_is_the_top_k_alone(teacher_and_batches):
    teacher, batches = teacher_and_batches
    alone = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, TOP_K, 16, TeacherNeeds(topk=True))
    shared = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, TOP_K, 16,
                           TeacherNeeds(topk=True, observed_logprobs=True))
    for batch in batches:
        expected, got = alone.signal(batch).topk, shared.signal(batch).topk
        assert torch.equal(got.ids, expected.ids)
        torch.testing.assert_close(got.logp, expected.logp)
        torch.testing.assert_close(got.tail_logmass, expected.tail_logmass)
        assert alone.signal(batch).observed_logprobs is None


def test_observed_token_mask_marks_positions_followed_by_a_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert observed_token_mask(mask).tolist() == [[True, True, False, False], [True, True, True, False]]
