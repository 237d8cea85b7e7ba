"""The run config: unknown keys with suggestions, type checks, rejected combinations, overrides, JSON."""

from __future__ import annotations

import json

import pytest
import yaml

from crosskd.config import Config, ConfigError, load_config
from trainer_helpers import TINY_CONFIG


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("training.max_step=3", "'training.max_steps'"),
        ("trainng.max_steps=3", "'training'"),
        ("training.early_stopping.patiense=2", "'training.early_stopping.patience'"),
        ("objective.kd_topk=8", "'objective.kd_top_k'"),
    ],
)
def test_unknown_key_suggests_the_nearest_valid_one(override, suggestion):
    with pytest.raises(ConfigError, match="unknown config key") as error:
        load_config(TINY_CONFIG, [override])
    assert f"did you mean {suggestion}" in str(error.value)


def test_unknown_key_far_from_any_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*max_steps"):
        load_config(TINY_CONFIG, ["training.zzzzzz=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=ten", "training.max_steps must be int"),
        ("training.batch_size=2.5", "training.batch_size must be int"),
        ("training.max_steps=true", "training.max_steps must be int"),  # a bool is not a step count
        ("optimizer.lr=fast", "optimizer.lr must be float"),
        ("models.teacher=3", "models.teacher must be str"),
        ("output.tensorboard=maybe", "output.tensorboard must be bool"),
        ("optimizer.betas=0.9", "optimizer.betas must be list"),
        ("optimizer.betas=[0.9, high]", r"optimizer.betas\[1\] must be float"),
        ("data.heldout_documents=[1, 2]", r"data.heldout_documents\[0\] must be str"),
        ("objective.divergence_params={beta: much}", r"objective.divergence_params\['beta'\] must be float"),
        ("training=5", "training must be a mapping"),
    ],
)
def test_wrong_types_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, [override])


def test_numbers_are_read_as_the_declared_type():
    config = load_config(TINY_CONFIG, ["optimizer.lr=2e-5", "objective.kd_alpha=1", "optimizer.betas=[0.8, 0]"])
    assert config.optimizer.lr == 2e-5 and isinstance(config.optimizer.lr, float)
    assert config.objective.kd_alpha == 1.0 and isinstance(config.objective.kd_alpha, float)
    assert config.optimizer.betas == [0.8, 0.0] and all(isinstance(b, float) for b in config.optimizer.betas)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["objective.strategy=uld", "objective.divergence=forward_kl"], "ULD is a distance of its own"),
        (["objective.strategy=projector", "objective.mismatch_policy=keep"], "only to the first-token strategy"),
        (["objective.strategy=projector", "objective.mismatch_policy=exclude"], "only to the first-token strategy"),
        (["objective.strategy=uld", "objective.divergence=null", "objective.mismatch_policy=keep"],
         "only to the first-token strategy"),
        (["objective.projector_features=topk_embeddings"], "applies only to the projector strategy"),
        (["objective.strategy=projector", "objective.projector_features=topk_embedding"], "did you mean 'topk_embeddings'"),
        (["data.heldout_documents=[]", "data.eval_fraction=0"], "no held-out split"),
        (["router.enabled=true", "router.top_k=5", "router.num_experts=4"], r"router.top_k \(5\)"),
        (["objective.divergence=forward_kld"], "did you mean 'forward_kl'"),
        (["training.mixed_precision=fp8"], "not one of no, fp16, bf16"),
        (["objective.kept_logits_mib=-1"], r"objective.kept_logits_mib must be 0 \(recompute every chunk"),
        (["objective.chunk_size=0"], "objective.chunk_size must be at least 1, got 0"),
    ],
)
def test_combinations_that_make_no_sense_are_rejected_with_the_reason(overrides, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config(TINY_CONFIG, overrides)


def test_the_valid_counterparts_of_rejected_combinations_load():
    assert load_config(TINY_CONFIG, ["objective.strategy=uld", "objective.divergence=null"]).objective.strategy == "uld"
    kept = load_config(TINY_CONFIG, ["objective.mismatch_policy=keep"])
    assert kept.objective.mismatch_policy == "keep"


def test_dotted_overrides_reach_nested_sections_and_win_over_the_file():
    config = load_config(TINY_CONFIG, [
        "training.max_steps=7",
        "training.early_stopping.patience=9",
        "data.heldout_documents=[a.txt, b.txt]",
        "data.eval_max_chars=null",
        "objective.divergence_params={beta: 0.25}",
    ])
    assert config.training.max_steps == 7
    assert config.training.early_stopping.patience == 9
    assert config.data.heldout_documents == ["a.txt", "b.txt"]
    assert config.data.eval_max_chars is None
    assert config.objective.divergence_params == {"beta": 0.25}
    assert config.training.batch_size == 2  # from the file, untouched
    assert config.objective.kd_top_k == 32


@pytest.mark.parametrize("override", ["training.max_steps", "=3", "training.max_steps.deeper=3"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(ConfigError):
        load_config(TINY_CONFIG, [override])


def test_json_config_is_read_like_the_yaml_one(tmp_path):
    as_json = tmp_path / "tiny.json"
    as_json.write_text(json.dumps(yaml.safe_load(TINY_CONFIG.read_text())))
    assert load_config(as_json) == load_config(TINY_CONFIG)
    assert load_config(as_json, ["training.max_steps=3"]).training.max_steps == 3


def test_invalid_files_are_reported(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_loads_back_to_the_same_config(tmp_path):
    config = load_config(TINY_CONFIG, ["training.max_steps=3", "objective.divergence_params={beta: 0.5}"])
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config(None) == Config()


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1e-3", r"optimizer.lr must not be negative, got -0.001"),
    ("optimizer.betas=[0.9,1.0]", r"optimizer.betas must be two values in \[0, 1\)"),
    ("optimizer.betas=[0.9]", r"optimizer.betas must be two values in \[0, 1\)"),
])
def test_optimizer_values_adamw_refuses_are_refused_by_the_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
