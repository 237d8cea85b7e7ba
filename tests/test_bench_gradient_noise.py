"""The arithmetic of bench/gradient_noise.py: the noise-to-signal ratio it reads from gradients of several batches.

The figures themselves come from `python bench/gradient_noise.py` on the reference pair.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gradient_noise  # noqa: E402  (bench/ is not a package)


def test_the_noise_to_signal_ratio_is_unbiased_for_few_batches():
    # Six "batch gradients" around a known expected gradient: variance 4 per vector, signal 1, so a ratio of 4; the
    # plain deviation from the sample mean (5/6 of the variance) over the mean's own norm (1 + 4/6) would read 2.
    generator = torch.Generator().manual_seed(0)
    dims, batches = 400_000, 6
    expected = torch.randn(dims, generator=generator)
    expected /= expected.norm()
    noise_scale = 2 / dims**0.5
    vectors = [expected + noise_scale * torch.randn(dims, generator=generator) for _ in range(batches)]
    deviation, mean_norm = gradient_noise.noise_energy(vectors)
    energy = {"lm_deviation_from_its_mean": deviation, "lm_mean_squared_norm": mean_norm,
              "kd_deviation_from_its_mean": deviation / 2, "kd_mean_squared_norm": 1 + deviation / 2 / 5}
    ratios = gradient_noise.noise_to_signal(energy, batches)
    assert ratios["lm"] == pytest.approx(4, rel=0.02)
    assert deviation / mean_norm == pytest.approx(2, rel=0.02)
    assert ratios["kd"] == pytest.approx(deviation / 2 * 6 / 5, rel=1e-9)  # signal exactly 1 after the correction


def test_cosines_of_large_vectors_stay_within_one():
    vector = torch.full((20_000_000,), 0.1) + torch.linspace(0, 1e-3, 20_000_000)
    assert gradient_noise.cosine(vector, vector) == pytest.approx(1, abs=1e-12)
    assert gradient_noise.mean_pairwise_cosine([vector, -vector, vector]) == pytest.approx(-1 / 3, abs=1e-12)
