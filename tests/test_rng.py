"""Per-image random streams: an image's noise does not depend on the batch it is drawn in."""

import pytest
import torch

from cascade.utils.rng import ImageGenerators, derive_seed, randn


def test_image_noise_is_independent_of_batching():
    seeds = [derive_seed(7, 1, i) for i in range(6)]
    whole = randn((6, 3, 4, 4), ImageGenerators(seeds), device="cpu")  # (6, 3, 4, 4)
    parts = [randn((n, 3, 4, 4), ImageGenerators(seeds[i : i + n]), device="cpu") for i, n in ((0, 1), (1, 3), (4, 2))]
    assert torch.equal(whole, torch.cat(parts))
    assert not torch.equal(whole[0], whole[1])  # distinct images get distinct noise


def test_single_generator_and_errors():
    expected = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(randn((2, 5), torch.Generator().manual_seed(3), device="cpu"), expected)
    assert derive_seed(1, 2, 3) != derive_seed(1, 2, 4) and 0 <= derive_seed(1, 2, 3) < 2**63
    with pytest.raises(ValueError, match="per-image generators"):
        randn((3, 2), ImageGenerators([1, 2]), device="cpu")
