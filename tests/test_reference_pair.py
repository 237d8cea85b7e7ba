"""The real reference pair: set up on first use (download + conversion, ~3 minutes), then checked as converted.

Run with `pytest -m reference tests/test_reference_pair.py`. BPB is re-evaluated here on the converted folders with
the one BPB function, loaded the plain Hugging Face way, so the test does not trust the set-up's marker.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosskd.data.stdlib import heldout_text
from crosskd.evaluate import bits_per_byte
from crosskd.models.loading import load_model
from crosskd.models.reference import STUDENT, TEACHER, ensure_reference_models

pytestmark = pytest.mark.reference

QWEN_REAL_VOCABULARY = 151_665  # 151,643 normal tokens + 22 added (control and tool-call) tokens
QWEN_LOGITS = 151_936


@pytest.fixture(scope="module")
def reference_pair():
    return ensure_reference_models()  # the test measures BPB itself, below


@pytest.mark.parametrize("source", [STUDENT, TEACHER], ids=lambda source: source.role)
def test_converted_folder_reloads_plainly_with_the_expected_bpb(reference_pair, source):
    folder = reference_pair.student_dir if source is STUDENT else reference_pair.teacher_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None

    bpb = bits_per_byte(model, tokenizer, heldout_text()).bits_per_byte
    assert bpb == pytest.approx(source.expected_bpb, abs=source.bpb_tolerance)


def test_teacher_has_exactly_271_padded_ids(reference_pair):
    teacher = load_model("reference:teacher", "teacher")
    vocab = teacher.vocab
    assert vocab.logit_size == QWEN_LOGITS
    assert vocab.padded_ids.numel() == 271
    assert vocab.padded_ids.tolist() == list(range(QWEN_REAL_VOCABULARY, QWEN_LOGITS))
    assert vocab.evidence == {"ids beyond the tokenizer": 0, "[PAD…] names": 271, "GGUF unused type": 271}
    assert teacher.tokenizer.convert_ids_to_tokens(QWEN_REAL_VOCABULARY) == "[PAD151665]"
    assert vocab.separator_id == teacher.tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151_643
    assert not teacher.is_moe


def test_student_has_no_padded_ids(reference_pair):
    student = load_model("reference:student", "student")
    assert student.vocab.logit_size == 49_152
    assert student.vocab.padded_ids.numel() == 0
    assert student.vocab.separator_id == 0  # <|endoftext|>
