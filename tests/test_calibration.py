import pytest
import torch
from tiny_feature_pair import TEACHER_LAYERS, tiny_batch

from crosskd.losses.calibration import HiddenStateStats, estimate


def synthetic_batches(generator, count=3, layers=2, hidden=5):
    batches = []
    for _ in range(count):
        states = tuple(torch.randn(2, 7, hidden, generator=generator) * (layer + 1) + layer for layer in range(layers))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0  # right padding
        batches.append((states, mask))
    return batches


def counted_values(batches, layer):
    return torch.cat([states[layer][:, 1:][mask[:, 1:].bool()] for states, mask in batches]).double()


def test_streaming_estimate_equals_one_pass_statistics_without_position_zero_and_padding():
    batches = synthetic_batches(torch.Generator().manual_seed(0))
    stats = estimate(batches, layers=[0, 1])
    for row, layer in enumerate((0, 1)):
        values = counted_values(batches, layer)
        torch.testing.assert_close(stats.mean[row].double(), values.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.std[row].double(), values.std(0), rtol=1e-5, atol=1e-6)
    assert stats.count == sum(int(mask[:, 1:].sum()) for _, mask in batches)


def test_outliers_at_window_start_and_in_padding_do_not_move_the_statistics():
    batches = synthetic_batches(torch.Generator().manual_seed(0))
    clean = estimate(batches, layers=[1])
    for states, _ in batches:
        states[1][:, 0, :2] = 1000.0  # the attention-sink position's massive channels
        states[1][1, 5:] = -1000.0  # padding
    spiked = estimate(batches, layers=[1])
    torch.testing.assert_close(spiked.mean, clean.mean)
    torch.testing.assert_close(spiked.std, clean.std)


def test_standardised_teacher_states_have_unit_scale_on_every_layer_including_the_final_norm():
    batch = tiny_batch()
    raw_scale = [h[:, 1:].std().item() for h in batch.teacher_hidden_states]
    assert max(raw_scale) > 10 * min(raw_scale)  # the post-norm last entry is on another scale
    for layer in range(TEACHER_LAYERS + 1):
        standardised = batch.stats.standardise(batch.teacher_hidden_states[layer][:, 1:], layer).flatten(0, 1)
        torch.testing.assert_close(standardised.mean(0), torch.zeros(standardised.shape[-1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(standardised.std(0), torch.ones(standardised.shape[-1]), atol=1e-3, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    stats = estimate(synthetic_batches(torch.Generator().manual_seed(2)), layers=[1, 0])
    stats.save(tmp_path / "teacher_stats.safetensors")
    loaded = HiddenStateStats.load(tmp_path / "teacher_stats.safetensors")
    assert loaded.layers == (1, 0) and loaded.count == stats.count
    torch.testing.assert_close(loaded.mean, stats.mean)
    torch.testing.assert_close(loaded.std, stats.std)


def test_uncalibrated_layer_is_a_clear_error():
    stats = estimate(synthetic_batches(torch.Generator().manual_seed(3)), layers=[0])
    with pytest.raises(KeyError, match="not calibrated"):
        stats.standardise(torch.zeros(5), 1)


def test_constant_channel_stays_finite_and_nan_teacher_is_refused():
    batches = synthetic_batches(torch.Generator().manual_seed(4), layers=1)
    for states, _ in batches:
        states[0][..., 0] = 3.0
    stats = estimate(batches, layers=[0])
    assert torch.isfinite(stats.standardise(batches[0][0][0], 0)).all()
    batches[0][0][0][0, 3, 1] = float("nan")
    with pytest.raises(ValueError):
        estimate(batches, layers=[0])
