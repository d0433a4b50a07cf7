"""The perturbed image I' of VPPO's token-dependency score (paper Sec. 3.1, Table 11).

Perturbations act on decoded, smart-resized images (uint8 [H, W, C], the data stage's output), before the
processor normalises and patchifies them. Image size never changes, so image-token counts, positions and M-RoPE
ids are identical between the two passes; only pixel values differ.

Every perturbation is seeded from (run seed, step, rollout uid, image index): all ranks and every rerun build
the same I'. The reference draws a fresh unseeded mask per response; passing the *rollout's* uid (prompt uid +
sample index) keeps its "each of the n rollouts sees its own mask" behaviour while making it reproducible.

Legend: H, W image height/width in pixels, C channels, Hc, Wc cell-grid height/width.
"""

from __future__ import annotations

import hashlib
import math

import torch

REFERENCE_CELL_SIZE = 14  # the reference hard-codes 14 px cells even for Qwen3-VL (patch 16): a known defect
NOISE_CLIP = (0, 255)


def perturbation_seed(seed: int, step: int, uid: str, image_index: int) -> int:
    """A 63-bit seed from (seed, step, uid, image index), stable across processes and Python versions."""
    key = f"{seed}/{step}/{uid}/{image_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def blackening_keep(grid_shape: tuple[int, int], probability: float, seed: int) -> torch.Tensor:
    """The cells patch blackening keeps [Hc, Wc] (bool): each is blackened with `probability`. The one draw
    behind `patch_blackening`, so a blackening applied to already-encoded patches is the same I'."""
    return torch.rand(grid_shape, generator=_generator(seed)) >= probability


def patch_blackening(image_HWC: torch.Tensor, cell_size: int, probability: float, seed: int) -> torch.Tensor:
    """Random patch blackening (VPPO's I').

    The image is split into cell_size x cell_size cells from the top-left corner (edge cells may be partial);
    each cell is set to 0 in every channel independently with `probability`.
    """
    height, width = image_HWC.shape[:2]
    keep_HcWc = blackening_keep((math.ceil(height / cell_size), math.ceil(width / cell_size)), probability, seed)
    keep_HW = keep_HcWc.repeat_interleave(cell_size, 0).repeat_interleave(cell_size, 1)[:height, :width]
    return image_HWC * keep_HW.unsqueeze(-1).to(image_HWC.dtype)


def gaussian_noise(image_HWC: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Additive Gaussian noise with standard deviation `sigma` on the 0..255 scale, clipped and rounded."""
    noise_HWC = torch.randn(image_HWC.shape, generator=_generator(seed)) * sigma
    return (image_HWC.float() + noise_HWC).round().clamp(*NOISE_CLIP).to(image_HWC.dtype)


def gaussian_blur(image_HWC: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur with standard deviation `radius` px (Pillow's GaussianBlur(radius) convention).

    An exact separable Gaussian (kernel half-width ceil(3 * radius), edges replicated); Pillow approximates the
    same Gaussian with three box blurs, so pixels differ from PIL by a few levels.
    """
    half = max(1, math.ceil(3 * radius))
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / radius) ** 2)
    kernel = kernel / kernel.sum()
    channels = image_HWC.shape[-1]
    x_1CHW = image_HWC.permute(2, 0, 1).unsqueeze(0).float()
    x_1CHW = torch.nn.functional.pad(x_1CHW, (half, half, half, half), mode="replicate")
    x_1CHW = torch.nn.functional.conv2d(x_1CHW, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    x_1CHW = torch.nn.functional.conv2d(x_1CHW, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return x_1CHW[0].permute(1, 2, 0).round().clamp(*NOISE_CLIP).to(image_HWC.dtype)


def grey_mask(image_HWC: torch.Tensor, value: int) -> torch.Tensor:
    """The complete grey mask: every pixel set to `value`."""
    return torch.full_like(image_HWC, value)


def perturb_image(
    image_HWC: torch.Tensor,
    kind: str,
    seed: int,
    *,
    cell_size: int,
    probability: float = 0.5,
    noise_sigma: float = 189.0,
    blur_radius: float = 6.0,
    grey_value: int = 128,
) -> torch.Tensor:
    """Dispatches on `kind` (algorithm.perturbation): patch_blackening | gaussian_noise | gaussian_blur | grey."""
    if kind == "patch_blackening":
        return patch_blackening(image_HWC, cell_size, probability, seed)
    if kind == "gaussian_noise":
        return gaussian_noise(image_HWC, noise_sigma, seed)
    if kind == "gaussian_blur":
        return gaussian_blur(image_HWC, blur_radius)
    if kind == "grey":
        return grey_mask(image_HWC, grey_value)
    raise ValueError(f"unknown perturbation {kind!r}; use patch_blackening, gaussian_noise, gaussian_blur or grey")
