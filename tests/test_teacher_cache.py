"""The teacher cache on the tiny pair: exact ids, fp16-rounded values, training equal to online training within that
rounding, two temperatures from one cache (reproducible), refusals naming the field, resume after a kill."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import crosskd.teacher.cache as cache_module
from crosskd.config import ConfigError
from crosskd.data.collate import collate_windows
from crosskd.data.sources import Document
from crosskd.data.windows import dual_windows
from crosskd.losses.target import TopKTarget
from crosskd.models.loading import load_model
from crosskd.api import cache_teacher
from crosskd.data.corpus import TrainingCorpus
from crosskd.teacher.cache import TeacherCacheError, open_teacher_cache, planned_batches, write_teacher_cache
from crosskd.teacher.cache_format import FP16_ABSOLUTE_ROUNDING, FP16_RELATIVE_ROUNDING, CacheLayout, read_index
from crosskd.teacher.online import OnlineTeacher, TeacherNeeds, TeacherSignal, observed_token_mask
from crosskd.vocab.transfer import transfer_class
from trainer_helpers import log_records, run_training, tiny_config, write_corpus, write_single_window_corpus

EVERY_PART = TeacherNeeds(topk=True, final_hidden=True)


def open_run_cache(config, teacher, student_tokenizer):
    """The cache of `config`'s run, opened for what its vocabulary transfer reads (as the objective opens it)."""
    return open_teacher_cache(config, transfer_class(config.objective).teacher_needs(config.objective), teacher,
                              student_tokenizer)

STEPS = 3
# Tolerances of cached against online training (docs/CACHE.md, "Exactness"). The stored log-probabilities are within
# 2^-11 relative of the online ones; the KD value moves by at most about that relative amount times the mass-weighted
# |log p| of the target (a few nats), so 1e-3 relative bounds it with room; the measured gap is ~2e-4. The LM loss
# does not read the teacher: it moves only through the student's parameters after a step on a slightly different KD.
KD_RELATIVE_TOLERANCE = 1e-3
LM_RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared") / "teacher-cache"


def cached_run_config(tmp_path, corpus, cache_dir, *overrides):
    return tiny_config(tmp_path, f"training.max_steps={STEPS}", f"teacher.cache_dir={cache_dir}", *overrides,
                       corpus=corpus)


@pytest.fixture(scope="module")
def written(tmp_path_factory, corpus, cache_dir):
    """The cache of a 3-step tiny run, written once for the module."""
    config = cached_run_config(tmp_path_factory.mktemp("writer"), corpus, cache_dir)
    return config, cache_teacher(config, progress=False)


@pytest.fixture(scope="module")
def tiny_pair():
    return load_model("tiny:teacher", "teacher"), load_model("tiny:student", "student")


def within_fp16_rounding(stored: torch.Tensor, exact: torch.Tensor) -> bool:
    finite = torch.isfinite(exact)
    if not torch.equal(finite, torch.isfinite(stored)) or not torch.equal(stored[~finite], exact[~finite]):
        return False
    error = (stored[finite] - exact[finite]).abs()
    return bool((error <= FP16_RELATIVE_ROUNDING * exact[finite].abs() + FP16_ABSOLUTE_ROUNDING).all())


# --- the stored rows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("logit_size", "top_k", "high_bytes"), [(151_936, 256, 64), (151_936, 7, 2), (768, 32, 0),
                                                                 (2**20, 5, 3)])
def test_teacher_ids_are_stored_exactly_in_16_bits_plus_packed_high_bits(logit_size, top_k, high_bytes):
    layout = CacheLayout("topk", top_k, logit_size, hidden_size=8)
    ids = torch.randint(0, logit_size, (50, top_k))
    ids[0, 0], ids[1, -1] = logit_size - 1, 0
    logp = torch.randn(50, top_k).abs().neg().sort(dim=-1, descending=True).values
    signal = TeacherSignal(topk=TopKTarget(ids, logp, torch.full((50,), -3.0)), final_hidden=None)
    rows = layout.encode(signal)
    assert layout.high_bytes_per_row == high_bytes
    assert sum(tensor[0].numel() * tensor.element_size() for tensor in rows.values()) == layout.bytes_per_row
    decoded = layout.decode(rows, "cpu").topk
    assert torch.equal(decoded.ids, ids)
    assert within_fp16_rounding(decoded.logp, logp)


def test_reference_teacher_at_k_256_needs_1090_bytes_per_aligned_position():
    assert CacheLayout("topk", 256, 151_936, 896).bytes_per_row == 1090
    assert CacheLayout("topk", 64, 151_936, 896).bytes_per_row == 274
    assert CacheLayout("final_hidden", 256, 151_936, 896).bytes_per_row == 1792


def test_observed_logprobs_take_4_bytes_per_teacher_token_and_no_pair_bytes():
    layout = CacheLayout("topk+observed_logprobs", 256, 151_936, 896)
    assert layout.pair_parts == ("topk",) and layout.token_parts == ("observed_logprobs",)
    assert (layout.bytes_per_row, layout.bytes_per_token) == (1090, 4)
    assert CacheLayout("topk", 256, 151_936, 896).bytes_per_token == 0


def test_bf16_rounding_would_fail_the_fp16_bound():
    # The bound the cache is tested against is tight enough to tell fp16 from bf16 (which loses up to ~6%).
    logp = -torch.linspace(0.01, 20, 1000)
    assert within_fp16_rounding(logp.half().float(), logp)
    assert not within_fp16_rounding(logp.bfloat16().float(), logp)


def test_stored_signal_is_the_online_signal_within_fp16_rounding(written, tiny_pair):
    config, summary = written
    teacher, student = tiny_pair
    cached = open_run_cache(config, teacher, student.tokenizer)
    online = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, config.objective.kd_top_k, 64, EVERY_PART)
    corpus = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    budget = cache_module.Budget(STEPS, 1, config.training.batch_size, STEPS * config.training.batch_size)
    stages = set()
    for stage, batch in planned_batches(config, corpus, teacher.vocab.pad_id, budget, with_preparation=False):
        stages.add(stage)
        exact, stored = online.signal(batch).topk, cached.signal(batch).topk
        assert torch.equal(stored.ids, exact.ids)
        assert within_fp16_rounding(stored.logp, exact.logp)
        assert within_fp16_rounding(stored.tail_logmass, exact.tail_logmass)
    assert stages == {"training", "evaluation"}
    assert summary.positions == sum(shard["positions"] for shard in read_index(summary.cache_dir)["shards"])
    assert summary.bytes_per_position < CacheLayout("topk", 32, teacher.vocab.logit_size, 96).bytes_per_row + 1


WITH_OBSERVED = TeacherNeeds(topk=True, observed_logprobs=True)


def test_observed_logprobs_are_stored_per_teacher_token_and_served_as_online(corpus, tiny_pair, tmp_path):
    teacher, student = tiny_pair
    config = cached_run_config(tmp_path, corpus, tmp_path / "cache", "training.max_steps=1")
    summary = write_teacher_cache(config, WITH_OBSERVED, with_preparation=False, progress=False)
    index = read_index(summary.cache_dir)
    assert index["layout"]["signal"] == index["fingerprint"]["signal"] == "topk+observed_logprobs"
    cached = open_teacher_cache(config, WITH_OBSERVED, teacher, student.tokenizer)
    online = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, config.objective.kd_top_k,
                           config.objective.chunk_size, WITH_OBSERVED)
    corpus_ = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    budget = cache_module.Budget(1, 1, config.training.batch_size, config.training.batch_size)
    teacher_tokens = 0
    for _, batch in planned_batches(config, corpus_, teacher.vocab.pad_id, budget, with_preparation=False):
        exact, stored = online.signal(batch), cached.signal(batch)
        has_next = observed_token_mask(batch.teacher_attention_mask)
        assert stored.observed_logprobs.shape == batch.teacher_input_ids.shape
        torch.testing.assert_close(stored.observed_logprobs[has_next], exact.observed_logprobs[has_next])
        assert torch.isfinite(stored.observed_logprobs).all()
        assert torch.equal(stored.topk.ids, exact.topk.ids)
        teacher_tokens += int(batch.teacher_attention_mask.sum())
    # 4 bytes per teacher token on top of the top-k rows (the windows here are all distinct).
    layout = CacheLayout(**index["layout"])
    assert summary.bytes > summary.positions * layout.bytes_per_row + 4 * teacher_tokens


def test_a_cache_without_observed_logprobs_is_refused_naming_the_missing_part(written, tiny_pair):
    config, _ = written
    teacher, student = tiny_pair
    with pytest.raises(TeacherCacheError, match="signal differs .*the cache lacks observed_logprobs") as error:
        open_teacher_cache(config, WITH_OBSERVED, teacher, student.tokenizer)
    assert "crosskd cache-teacher" in str(error.value)


def test_a_window_the_cache_does_not_hold_is_an_error(written, tiny_pair):
    config, _ = written
    teacher, student = tiny_pair
    cached = open_run_cache(config, teacher, student.tokenizer)
    windows = list(dual_windows([Document("new", "def other():\n    return 42\n" * 20)], student.tokenizer,
                                teacher.tokenizer, config.data.window_tokens))
    with pytest.raises(TeacherCacheError, match="not in the teacher cache"):
        cached.signal(collate_windows(windows[:1], teacher.vocab.pad_id))


# --- training from the cache -----------------------------------------------------------------------------------------


def no_online_teacher(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the online teacher ran in a cached run")

    monkeypatch.setattr(OnlineTeacher, "signal", refuse)


def test_training_from_the_cache_gives_the_online_losses_within_fp16_rounding(written, corpus, cache_dir, tmp_path,
                                                                             monkeypatch):
    online_config = tiny_config(tmp_path / "online", f"training.max_steps={STEPS}", corpus=corpus)
    run_training(online_config)
    no_online_teacher(monkeypatch)
    cached_config = cached_run_config(tmp_path / "cached", corpus, cache_dir, "teacher.source=cache")
    run_training(cached_config)

    online, cached = log_records(online_config.output.run_dir), log_records(cached_config.output.run_dir)
    assert len(online) == len(cached) == STEPS
    for exact, from_cache in zip(online, cached):
        assert from_cache["loss/kd"] > 0
        assert math.isclose(from_cache["loss/kd"], exact["loss/kd"], rel_tol=KD_RELATIVE_TOLERANCE)
        assert math.isclose(from_cache["loss/lm"], exact["loss/lm"], rel_tol=LM_RELATIVE_TOLERANCE)
    (online_eval,), (cached_eval,) = (log_records(c.output.run_dir, "eval") for c in (online_config, cached_config))
    # The teacher's top-1 can flip only where its two best log-probabilities are within fp16 rounding of each other.
    assert math.isclose(cached_eval["top1_agreement"], online_eval["top1_agreement"], abs_tol=0.01)
    for key in ("kl_teacher_student", "eval_kd"):
        assert math.isclose(cached_eval[key], online_eval[key], rel_tol=KD_RELATIVE_TOLERANCE)
    assert math.isclose(cached_eval["bpb"], online_eval["bpb"], rel_tol=LM_RELATIVE_TOLERANCE)


def test_two_students_with_different_temperatures_train_from_one_cache_reproducibly(written, corpus, cache_dir,
                                                                                   tmp_path, monkeypatch):
    no_online_teacher(monkeypatch)
    kd_by_temperature = {}
    for temperature in (1.0, 4.0):
        runs = []
        for attempt in range(2):
            config = cached_run_config(tmp_path / f"t{temperature}-{attempt}", corpus, cache_dir,
                                       "teacher.source=cache", f"schedule.temperature_start={temperature}",
                                       f"schedule.temperature_end={temperature}")
            run_training(config)
            runs.append([(r["temperature"], r["total"], r["loss/lm"], r["loss/kd"])
                         for r in log_records(config.output.run_dir)])
        assert runs[0] == runs[1]  # bit for bit
        assert all(record[0] == temperature for record in runs[0])
        kd_by_temperature[temperature] = [record[3] for record in runs[0]]
    assert kd_by_temperature[1.0] != kd_by_temperature[4.0]


# --- refusals --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.kd_top_k=16"], "objective.kd_top_k differs"),
        (["data.window_tokens=32"], "data.window_tokens differs"),
        (["data.seed=1"], "data.seed differs"),
        (["models.teacher_dtype=bfloat16"], "models.teacher_dtype differs"),
        (["objective.strategy=projector", "objective.divergence=null"], "signal differs"),
        ([f"training.max_steps={STEPS + 1}"], "does not cover this run: this run reads 8 training windows"),
        (["training.max_steps=null", "training.epochs=1"], "does not cover this run"),
    ],
)
def test_a_cache_written_for_another_run_is_refused_naming_what_differs(written, corpus, cache_dir, tiny_pair,
                                                                         tmp_path, overrides, message):
    teacher, student = tiny_pair
    config = cached_run_config(tmp_path, corpus, cache_dir, *overrides)
    with pytest.raises(TeacherCacheError, match=message) as error:
        open_run_cache(config, teacher, student.tokenizer)
    assert "crosskd cache-teacher" in str(error.value)


def test_a_shorter_run_or_another_top_k_strategy_reads_the_same_cache(written, corpus, cache_dir, tiny_pair, tmp_path):
    teacher, student = tiny_pair
    for overrides in (["training.max_steps=1"], ["objective.strategy=uld", "objective.divergence=null"]):
        open_run_cache(cached_run_config(tmp_path, corpus, cache_dir, *overrides), teacher, student.tokenizer)


def test_changed_corpus_text_is_refused(corpus, tiny_pair, tmp_path):
    teacher, student = tiny_pair
    own_corpus = shutil.copytree(corpus, tmp_path / "corpus")
    config = cached_run_config(tmp_path, own_corpus, tmp_path / "cache", "training.max_steps=1")
    cache_teacher(config, progress=False)
    document = next(path for path in sorted(own_corpus.iterdir()) if path.name != "heldout.txt")
    document.write_text(document.read_text() + "\n# one more line\n")  # same source, same settings, other text
    with pytest.raises(TeacherCacheError, match="corpus_text differs"):
        open_run_cache(config, teacher, student.tokenizer)


def test_missing_cache_is_refused_with_the_command_to_write_it(tiny_pair, corpus, tmp_path):
    teacher, student = tiny_pair
    config = cached_run_config(tmp_path, corpus, tmp_path / "nowhere")
    with pytest.raises(TeacherCacheError, match="holds no teacher cache.*crosskd cache-teacher"):
        open_run_cache(config, teacher, student.tokenizer)


@pytest.mark.parametrize("term", ["attention_alpha", "layerwise_alpha", "feature_alpha"])
def test_terms_a_cache_cannot_serve_are_refused_by_the_config(tmp_path, term):
    overrides = ["teacher.source=cache", "router.enabled=true", "router.feature_alpha=0", f"router.{term}=0.1"]
    with pytest.raises(ConfigError, match=f"router.{term} is 0.1 but a teacher cache cannot serve it"):
        tiny_config(tmp_path, *overrides)
    tiny_config(tmp_path, *overrides[1:])  # the same terms online are fine


# --- resuming --------------------------------------------------------------------------------------------------------


def test_a_killed_cache_resumes_after_its_last_complete_shard_and_ends_identical(written, corpus, tiny_pair, tmp_path,
                                                                                 monkeypatch):
    reference_config, reference = written
    teacher, student = tiny_pair
    config = cached_run_config(tmp_path, corpus, tmp_path / "cache")
    tiny_shards = 0.005  # megabytes: one micro-batch per shard

    signal = OnlineTeacher.signal
    teacher_batches = []

    def killed_at_the_third_micro_batch(self, batch, **kwargs):
        # Every micro-batch of this plan has new windows and a shard of its own: two shards are complete.
        if len(teacher_batches) == 2:
            raise KeyboardInterrupt
        teacher_batches.append(1)
        return signal(self, batch, **kwargs)

    monkeypatch.setattr(OnlineTeacher, "signal", killed_at_the_third_micro_batch)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(config, shard_megabytes=tiny_shards, progress=False)
    with pytest.raises(TeacherCacheError, match=r"incomplete \(2 of 7 micro-batches\).*it resumes"):
        open_run_cache(config, teacher, student.tokenizer)

    teacher_batches.clear()
    monkeypatch.setattr(OnlineTeacher, "signal", lambda self, batch, **kw: teacher_batches.append(1) or
                        signal(self, batch, **kw))
    resumed = cache_teacher(config, shard_megabytes=tiny_shards, progress=False)
    assert resumed.resumed_at == 2 and len(teacher_batches) == reference.micro_batches - 2 == 5
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    assert len(read_index(tmp_path / "cache")["shards"]) == 7

    straight = open_run_cache(reference_config, teacher, student.tokenizer)
    pieced = open_run_cache(config, teacher, student.tokenizer)
    corpus_ = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    budget = cache_module.Budget(STEPS, 1, config.training.batch_size, STEPS * config.training.batch_size)
    for _, batch in planned_batches(config, corpus_, teacher.vocab.pad_id, budget, with_preparation=False):
        a, b = straight.signal(batch).topk, pieced.signal(batch).topk
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logp, b.logp)
        assert torch.equal(a.tail_logmass, b.tail_logmass)


def test_a_window_read_again_is_stored_once_and_still_served(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    corpus = write_single_window_corpus(tmp_path / "corpus")  # every step reads the same window
    config = cached_run_config(tmp_path, corpus, tmp_path / "cache", "training.batch_size=1")
    summary = cache_teacher(config, shard_megabytes=0.001, progress=False)  # one micro-batch per shard
    shards = read_index(summary.cache_dir)["shards"]
    assert [shard["windows"] for shard in shards[:STEPS]] == [1, 0, 0]  # the training window, then the same again
    assert summary.windows - summary.unique_windows == STEPS - 1
    cached = open_run_cache(config, teacher, student.tokenizer)
    teacher_corpus = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    window = next(teacher_corpus.train_windows(0, 0, 1, batch_size=1))
    assert cached.signal(collate_windows(window, teacher.vocab.pad_id)).topk.ids.shape[1] == config.objective.kd_top_k


def test_a_cache_folder_holding_another_runs_cache_is_not_overwritten(written, corpus, cache_dir, tmp_path):
    config = cached_run_config(tmp_path, corpus, cache_dir, "data.seed=3")
    with pytest.raises(TeacherCacheError, match="already holds a teacher cache for another run: data.seed differs"):
        cache_teacher(config, progress=False)


# --- the projector's final hidden states -----------------------------------------------------------------------------


def test_projector_cache_stores_final_hidden_states_of_its_preparation_windows(corpus, tiny_pair, tmp_path):
    teacher, student = tiny_pair
    config = cached_run_config(tmp_path, corpus, tmp_path / "cache", "objective.strategy=projector",
                               "objective.divergence=null", "training.max_steps=1")
    cache_teacher(config, progress=False)
    cached = open_run_cache(config, teacher, student.tokenizer)
    online = OnlineTeacher(teacher.model, teacher.vocab.valid_mask, config.objective.kd_top_k, 64, EVERY_PART)
    corpus_ = TrainingCorpus(config.data, student.tokenizer, teacher.tokenizer, teacher.vocab.pad_id)
    for batch in corpus_.preparation_batches(config.training.batch_size, "cpu"):
        stored = cached.signal(batch)
        assert stored.topk is None
        assert within_fp16_rounding(stored.final_hidden, online.signal(batch).final_hidden)


def test_projector_on_top_k_embeddings_trains_from_a_top_k_cache_with_its_preparation_windows(corpus, tmp_path,
                                                                                               monkeypatch):
    overrides = ("objective.strategy=projector", "objective.divergence=null",
                 "objective.projector_features=topk_embeddings")
    online_config = tiny_config(tmp_path / "online", f"training.max_steps={STEPS}", *overrides, corpus=corpus)
    run_training(online_config)
    cached_config = cached_run_config(tmp_path / "cached", corpus, tmp_path / "cache", "teacher.source=cache",
                                      *overrides)
    cache_teacher(cached_config, progress=False)
    assert read_index(tmp_path / "cache")["layout"]["signal"] == "topk"

    # A first-token cache has the same top-k but not the pre-fit's windows: refused, saying so.
    first_token_cache = cached_run_config(tmp_path / "refused", corpus, tmp_path / "first-token-cache")
    cache_teacher(first_token_cache, progress=False)
    with pytest.raises(TeacherCacheError, match="without its preparation windows"):
        run_training(cached_run_config(tmp_path / "refused", corpus, tmp_path / "first-token-cache",
                                       "teacher.source=cache", *overrides))

    no_online_teacher(monkeypatch)  # the pre-fit reads its preparation windows from the cache too
    run_training(cached_config)

    online, cached = log_records(online_config.output.run_dir), log_records(cached_config.output.run_dir)
    assert len(online) == len(cached) == STEPS
    # The residual projector starts as the student, so its KD is ~1e-4 nats here: an absolute floor of 1e-6 next to
    # the relative tolerance (the measured gap is ~1.5e-7).
    for exact, from_cache in zip(online, cached):
        for key in ("loss/kd", "loss/anchor"):
            assert math.isclose(from_cache[key], exact[key], rel_tol=KD_RELATIVE_TOLERANCE, abs_tol=1e-6), key


# --- damage ----------------------------------------------------------------------------------------------------------


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[-9:]
    else:  # overwritten in place: same size, other values
        data[-9] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_a_damaged_shard_is_named_when_opened_and_rewritten_by_cache_teacher(written, corpus, tiny_pair, tmp_path,
                                                                            how):
    _, reference = written
    teacher, student = tiny_pair
    copy = tmp_path / "cache"
    shutil.copytree(reference.cache_dir, copy)
    config = cached_run_config(tmp_path, corpus, copy)
    shard = copy / read_index(copy)["shards"][0]["file"]
    _damage(shard, how)
    problem = "has .* bytes, the index records .*: truncated" if how == "truncated" else "does not match its SHA-256"
    with pytest.raises(TeacherCacheError, match=f"damaged: {shard}.*{problem}.*rewrites the damaged shard"):
        open_run_cache(config, teacher, student.tokenizer)

    repaired = cache_teacher(config, progress=False)
    assert repaired.resumed_at == 0  # the damaged shard was the first: everything is rewritten
    assert (copy / shard.name).read_bytes() == (reference.cache_dir / shard.name).read_bytes()
    open_run_cache(config, teacher, student.tokenizer)


def test_a_truncated_index_is_named_and_cache_teacher_writes_the_cache_afresh(written, corpus, tiny_pair, tmp_path):
    _, reference = written
    teacher, student = tiny_pair
    copy = tmp_path / "cache"
    shutil.copytree(reference.cache_dir, copy)
    index = copy / "index.json"
    index.write_text(index.read_text()[:100])
    config = cached_run_config(tmp_path, corpus, copy)
    with pytest.raises(TeacherCacheError, match=f"{index} is corrupt .*cache-teacher"):
        open_run_cache(config, teacher, student.tokenizer)
    cache_teacher(config, progress=False)
    assert read_index(copy) == read_index(reference.cache_dir)
    open_run_cache(config, teacher, student.tokenizer)
