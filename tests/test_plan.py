"""`crosskd plan`: the step's memory components respond to the config as they should, suggestions fit by the
planner's own estimate, bad input is refused clearly, and the tiny pair's estimate matches a measured peak."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config

from crosskd.cli import main
from crosskd.config import ConfigError, load_config
from crosskd.models.memory import ArchitectureError, architecture_facts
from crosskd.plan import parse_memory, plan_memory, with_overrides

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
sys.path.insert(0, str(REPO / "bench"))

import memory_plan  # noqa: E402  (bench/ is not a package)


@pytest.fixture(scope="module")
def reference_shaped(tmp_path_factory) -> tuple[str, str]:
    """Config-only model folders with the reference pair's shapes (config.json from the reference models): the
    planner reads shapes, never weights."""
    root = tmp_path_factory.mktemp("shapes")
    teacher = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)
    student = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    return str(root / "teacher"), str(root / "student")


def reference_config(shapes, *overrides: str):
    teacher, student = shapes
    return load_config(REPO / "configs" / "reference.yaml",
                       [f"models.teacher={teacher}", f"models.student={student}", *overrides])


def component(plan, name: str) -> int:
    return next((c.bytes for c in plan.components if c.name == name), 0)


def test_parameter_counts_come_from_the_model_config(reference_shaped):
    teacher, student = (architecture_facts(spec) for spec in reference_shaped)
    # Qwen2.5-0.5B with untied embeddings (0.49 B + a second 136 M-row embedding); SmolLM2-135M tied.
    assert teacher.parameters == 630_167_424
    assert student.parameters == 134_515_008
    assert student.input_embedding_parameters == 0 and student.output_embedding_parameters == 49152 * 576


def test_a_cached_teacher_never_runs_forward_but_its_weights_stay(reference_shaped):
    online = plan_memory(reference_config(reference_shaped))
    cached = plan_memory(reference_config(reference_shaped, "teacher.source=cache"))
    assert component(online, "teacher top-k logits") > 0 and component(cached, "teacher top-k logits") == 0
    assert component(cached, "teacher forward") == 0
    # The trainer still loads the teacher in cache mode (its BPB, docs/CACHE.md): the planner must not pretend not.
    assert component(cached, "teacher weights") == component(online, "teacher weights") > 0
    assert cached.phase_bytes("teacher forward") == 0


def test_gradient_checkpointing_shrinks_activations(reference_shaped):
    plain = plan_memory(reference_config(reference_shaped))
    checkpointed = plan_memory(reference_config(reference_shaped, "training.gradient_checkpointing=true"))
    assert component(checkpointed, "student activations") < component(plain, "student activations") / 5
    assert checkpointed.total_bytes < plain.total_bytes


def test_doubling_the_micro_batch_doubles_activations_and_not_weights(reference_shaped):
    small = plan_memory(reference_config(reference_shaped, "training.batch_size=4"))
    large = plan_memory(reference_config(reference_shaped, "training.batch_size=8"))
    assert component(large, "student activations") == pytest.approx(2 * component(small, "student activations"),
                                                                     rel=0.01)
    assert component(large, "student weights") == component(small, "student weights")


def test_a_16_bit_teacher_halves_the_teacher_weights(reference_shaped):
    full = plan_memory(reference_config(reference_shaped))
    for dtype in ("bfloat16", "float16"):
        half = plan_memory(reference_config(reference_shaped, f"models.teacher_dtype={dtype}"))
        assert 2 * component(half, "teacher weights") == component(full, "teacher weights")


def test_lm_only_runs_hold_no_teacher_signal(reference_shaped):
    plan = plan_memory(reference_config(reference_shaped, "objective.kd_alpha=0"))
    assert component(plan, "teacher signal") == 0 and plan.phase_bytes("teacher forward") == 0


def test_feature_terms_keep_every_teacher_layer_and_train_their_heads(reference_shaped):
    plain = plan_memory(reference_config(reference_shaped))
    routed = plan_memory(reference_config(reference_shaped, "router.enabled=true"))
    # 25 hidden states (embeddings + 24 layers) instead of the last one.
    assert component(routed, "teacher hidden states") == 25 * component(plain, "teacher hidden states")
    assert component(plain, "objective modules") == 0 < component(routed, "objective modules")
    projector = plan_memory(reference_config(reference_shaped, "objective.strategy=projector"))
    assert component(projector, "objective modules") > 0


def test_accumulation_keeps_gradients_through_the_step(reference_shaped):
    once = plan_memory(reference_config(reference_shaped))
    accumulated = plan_memory(reference_config(reference_shaped, "training.gradient_accumulation_steps=2"))
    gradients = component(once, "student gradients")
    assert accumulated.phase_bytes("static") == once.phase_bytes("static") + gradients


def test_mixed_precision_halves_the_saved_activations_but_adds_weight_copies(reference_shaped):
    fp32 = plan_memory(reference_config(reference_shaped))
    bf16 = plan_memory(reference_config(reference_shaped, "training.mixed_precision=bf16"))
    assert component(bf16, "student activations") < 0.75 * component(fp32, "student activations")
    assert component(bf16, "autocast weight copies") == component(fp32, "student weights") // 2


def test_suggestions_for_a_config_too_large_for_16_gib_fit_by_the_planners_own_estimate(reference_shaped):
    config = reference_config(reference_shaped, "training.batch_size=16", "data.window_tokens=1024")
    memory = parse_memory("16GiB")
    plan = plan_memory(config, memory_bytes=memory)
    assert plan.fits is False and plan.suggestions
    for suggestion in plan.suggestions:
        changed = with_overrides(config, suggestion.overrides)
        replanned = plan_memory(changed, memory_bytes=memory)
        assert replanned.fits and replanned.total_bytes == suggestion.total_bytes
        # The same windows per optimizer step: only how they are split into micro-batches changes.
        training = changed.training
        assert training.batch_size * training.gradient_accumulation_steps == 16


def test_a_config_that_fits_gets_no_suggestions(reference_shaped):
    plan = plan_memory(reference_config(reference_shaped), memory_bytes=parse_memory("80GiB"))
    assert plan.fits and plan.suggestions == []


def test_data_parallel_processes_add_gradient_buckets(reference_shaped):
    config = reference_config(reference_shaped)
    assert component(plan_memory(config, processes=2), "data-parallel buckets") == \
        component(plan_memory(config), "student gradients")


@pytest.mark.parametrize("text, expected", [("16GiB", 16 * 2**30), ("24 GB", 24 * 10**9), ("40G", 40 * 2**30),
                                            ("81920MiB", 80 * 2**30)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["16 parrots", "-4GiB", "GiB", ""])
def test_bad_memory_sizes_are_refused_with_the_expected_form(text):
    with pytest.raises(ConfigError, match="e.g. 16GiB"):
        parse_memory(text)


def test_bad_device_and_processes_are_refused(reference_shaped):
    config = reference_config(reference_shaped)
    with pytest.raises(ConfigError, match="--device 'tpu' is not one of cuda, cpu"):
        plan_memory(config, device="tpu")
    with pytest.raises(ConfigError, match="--processes must be at least 1"):
        plan_memory(config, processes=0)


def test_a_model_without_decoder_shapes_is_refused_naming_the_field(tmp_path):
    GPT2Config(n_inner=None).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ArchitectureError, match="no intermediate_size / n_inner / ffn_dim"):
        architecture_facts(str(tmp_path / "gpt2"))


def test_cli_prints_the_table_the_verdict_and_json(reference_shaped, capsys):
    teacher, student = reference_shaped
    args = ["plan", str(REPO / "configs" / "reference.yaml"), f"models.teacher={teacher}", f"models.student={student}",
            "training.batch_size=16", "data.window_tokens=1024", "--memory", "16GiB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student activations" in out and "does NOT fit in 16.00 GiB" in out and "fits with" in out
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["16GiB"]
    assert plan["fits"] is False and plan["total_bytes"] == sum(plan["phases"][p] for p in ("static",
                                                                                            plan["peak_phase"]))
    assert main([*args[:-2], "--memory", "lots"]) == 2
    assert "not a memory size" in capsys.readouterr().err
    assert main([*args[:-2], "models.student=/no/such/model"]) == 2
    assert "is a path but not an existing folder" in capsys.readouterr().err


def test_without_memory_the_cli_plans_the_standard_cards_16_gib_in_float16(reference_shaped, capsys):
    teacher, student = reference_shaped
    assert main(["plan", str(REPO / "configs" / "reference.yaml"), f"models.teacher={teacher}",
                 f"models.student={student}", "training.batch_size=16", "data.window_tokens=1024", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [card.split()[0] for card in plans] == ["16GiB", "24GiB", "40GiB", "80GiB"]
    small = plans["16GiB (P100, T4, V100-16)"]
    assert small["fits"] is False and small["suggestions"]
    assert not any("bf" in override for s in small["suggestions"] for override in s["overrides"])
    assert plans["80GiB (A100-80, H100)"]["fits"] is True


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_layer_saved_bytes_match_what_autograd_saves(mixed_precision):
    """The per-layer formula against the bytes autograd really saves in the tiny student (CPU, SDPA)."""
    from transformers import AutoModelForCausalLM

    from crosskd.models.loading import resolve_spec

    facts = architecture_facts("tiny:student")
    model = AutoModelForCausalLM.from_pretrained(resolve_spec("tiny:student").location).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, window = 4, 128
    half = mixed_precision == "bf16"
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        model(input_ids=torch.randint(0, 300, (batch, window)), output_hidden_states=True, logits_to_keep=1)
    weight_copies = facts.parameters * 2 if half else 0  # autocast's cached 16-bit weights (their own component)
    per_token = (sum(saved.values()) - weight_copies) / (batch * window) - facts.final_norm_saved_bytes_per_token()
    assert per_token / facts.layers == pytest.approx(facts.layer_saved_bytes_per_token(2 if half else 4), rel=0.03)


def test_tiny_pair_estimate_is_within_20_percent_of_a_measured_peak():
    """A real tiny-pair run (bench/memory_plan.py's measurement, a fresh process, glibc's mmap threshold pinned so
    RSS follows the live tensors; docs/MEMORY.md) against the CPU estimate with its measured host baseline."""
    overrides = ["data.window_tokens=256", "training.batch_size=32"]
    measured = memory_plan._case_in_fresh_process(TINY_CONFIG, overrides, "cpu", "pinned")
    config = load_config(TINY_CONFIG, [*memory_plan.COMMON, *overrides])
    plan = plan_memory(config, device="cpu")
    assert plan.total_bytes / measured["step_peak_bytes"] == pytest.approx(1.0, abs=0.2)
    # What the steps add on top of the static part must be of the right size too, not only the baseline.
    added = measured["step_peak_bytes"] - measured["step_start_bytes"]
    assert plan.phase_bytes(plan.peak_phase) / added == pytest.approx(1.0, abs=0.35)
