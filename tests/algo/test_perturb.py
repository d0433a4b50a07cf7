import pytest
import torch
from PIL import Image, ImageFilter

from vppo_megatron.algo.perturb import (
    gaussian_blur,
    gaussian_noise,
    grey_mask,
    patch_blackening,
    perturb_image,
    perturbation_seed,
)


def _image(h=30, w=20, value=200):
    return torch.full((h, w, 3), value, dtype=torch.uint8)


def test_seed_is_stable_and_distinguishes_every_key():
    seed = perturbation_seed(1, 7, "prompt-3/5", 0)
    # blake2b is unsalted: this value is the same in every process and every Python version
    assert seed == perturbation_seed(1, 7, "prompt-3/5", 0) == 8007270812620648867
    others = {
        perturbation_seed(2, 7, "prompt-3/5", 0),
        perturbation_seed(1, 8, "prompt-3/5", 0),
        perturbation_seed(1, 7, "prompt-3/6", 0),
        perturbation_seed(1, 7, "prompt-3/5", 1),
    }
    assert seed not in others and len(others) == 4
    assert 0 <= seed < 2**63  # fits torch.Generator.manual_seed


def test_patch_blackening_blackens_whole_cells_including_partial_edges():
    out = patch_blackening(_image(30, 20), cell_size=14, probability=0.5, seed=3)
    assert out.shape == (30, 20, 3) and out.dtype == torch.uint8  # size unchanged: same image-token count
    # 30 x 20 with 14 px cells: rows [0,14) [14,28) [28,30), cols [0,14) [14,20): 3 x 2 cells, edges partial
    for rows in (slice(0, 14), slice(14, 28), slice(28, 30)):
        for cols in (slice(0, 14), slice(14, 20)):
            cell = out[rows, cols]
            assert bool((cell == 0).all()) or bool((cell == 200).all()), "a cell is blackened whole or not at all"
    assert torch.equal(out, patch_blackening(_image(30, 20), 14, 0.5, seed=3))  # seeded


def test_patch_blackening_probability_extremes_and_rate():
    assert torch.equal(patch_blackening(_image(), 14, 0.0, seed=0), _image())
    assert bool((patch_blackening(_image(), 14, 1.0, seed=0) == 0).all())
    big = patch_blackening(_image(1400, 1400), 14, 0.5, seed=11)  # 100 x 100 = 10,000 cells
    black_fraction = (big[::14, ::14, 0] == 0).float().mean().item()
    assert abs(black_fraction - 0.5) < 0.03  # binomial std 0.005: 6 sigma
    # cell size follows the vision patch: 16 px cells for Qwen3-VL
    qwen3 = patch_blackening(_image(32, 32), 16, 0.5, seed=5)
    assert all(bool((qwen3[r : r + 16, c : c + 16] == qwen3[r, c]).all()) for r in (0, 16) for c in (0, 16))


def test_different_seeds_give_different_masks():
    a = patch_blackening(_image(140, 140), 14, 0.5, seed=1)
    b = patch_blackening(_image(140, 140), 14, 0.5, seed=2)
    assert not torch.equal(a, b)


def test_gaussian_noise_is_seeded_clipped_and_strong():
    image = _image(64, 64, 128)
    a, b = gaussian_noise(image, 189.0, seed=4), gaussian_noise(image, 189.0, seed=4)
    assert torch.equal(a, b) and a.dtype == torch.uint8
    assert int(a.min()) == 0 and int(a.max()) == 255  # sigma 189 on 0..255 saturates often
    assert (a.float() - 128).abs().mean() > 60


def test_gaussian_blur_keeps_flat_images_and_follows_pillow():
    assert torch.equal(gaussian_blur(_image(40, 40, 77), 6.0), _image(40, 40, 77))  # blur of a constant
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8)
    ours = gaussian_blur(image, 6.0).float()
    pil = torch.tensor(list(Image.fromarray(image.numpy()).filter(ImageFilter.GaussianBlur(6.0)).getdata()))
    pil = pil.view(64, 64, 3).float()
    # Pillow approximates the Gaussian with box blurs: a few grey levels apart in the interior
    interior = (slice(18, 46), slice(18, 46))
    assert (ours[interior] - pil[interior]).abs().mean() < 3.0
    assert ours.std() < image.float().std() / 4  # it does blur


def test_grey_and_dispatch():
    assert bool((grey_mask(_image(), 128) == 128).all())
    for kind in ("patch_blackening", "gaussian_noise", "gaussian_blur", "grey"):
        out = perturb_image(_image(), kind, seed=1, cell_size=14)
        assert out.shape == _image().shape and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="unknown perturbation 'cutout'"):
        perturb_image(_image(), "cutout", seed=1, cell_size=14)


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_qwen3_vl_dir"])
def test_blackening_the_encoded_patches_equals_encoding_the_blackened_image(model, request):
    # the actor blackens a prompt's one encoding per rollout instead of encoding each rollout's blackened copy:
    # the same pixel values bit for bit, for either family's patch size, several image shapes and masks
    import numpy as np
    from transformers import AutoProcessor

    from vppo_megatron.actor.batching import blacken_patches, encode_images, unresized
    from vppo_megatron.algo.perturb import blackening_keep

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(model)).image_processor
    side = processor.patch_size * processor.merge_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h * side, w * side, 3), dtype=np.uint8) for h, w in [(4, 3), (2, 5), (3, 3)]]
    pixels, grid = encode_images(processor, images)
    assert unresized(processor, images, grid)
    black = encode_images(processor, [np.zeros((side, side, 3), dtype=np.uint8)])[0][0]
    for seeds in [(1, 2, 3), (4, 5, 6)]:
        keeps = [blackening_keep((h, w), 0.5, seed) for seed, (_, h, w) in zip(seeds, grid.tolist(), strict=True)]
        fast = blacken_patches(pixels, grid, keeps, processor.merge_size, black)
        blackened = [
            patch_blackening(torch.from_numpy(image), processor.patch_size, 0.5, seed).numpy()
            for image, seed in zip(images, seeds, strict=True)
        ]
        slow, slow_grid = encode_images(processor, blackened)
        assert torch.equal(fast, slow) and torch.equal(grid, slow_grid)
        assert 0.3 < (fast != pixels).any(-1).float().mean() < 0.7  # about half the patches changed
    odd = [rng.integers(0, 256, (side * 2 + 5, side * 3, 3), dtype=np.uint8)]  # the processor resizes this one
    assert not unresized(processor, odd, encode_images(processor, odd)[1])
