"""Image decoding and smart resizing: a DALI pipeline (CPU, or GPU where available) with a Pillow fallback.

Both backends return, per image, an RGB `uint8` array of shape [H, W, 3] whose sides are multiples of
`factor` (patch size x spatial merge size: 28 for Qwen2.5-VL, 32 for Qwen3-VL), sized by one of two rules
(`data.image_resize`):

- `reference` (default), the reference VPPO code's two steps: its dataset scales an image whose area is outside
  [min_pixels, max_pixels] into it (sides x sqrt(bound / area), truncated to integers), then the model's processor
  applies Qwen2-VL's `smart_resize` within its own limits (sides rounded to multiples of `factor`). A 2000 x 2000
  image becomes 1008 x 1008 (1,296 image tokens at 28 px) and a 200 x 300 one 364 x 560 (260), as there. Here the
  pixels are interpolated once, to the final size.
- `smart`: Qwen2-VL's `smart_resize` within [min_pixels, max_pixels] in one step (1,225 and 280 tokens above).

Either way the last step is the processor's own `smart_resize` within its limits, so the processor (the actor's
and vLLM's) keeps every image as it is: the image tokens counted here are the ones the model sees, and image
perturbations never change their number. EXIF orientation is applied (DALI does; Pillow is made to) and the size is
planned for the rotated image.

A corrupt image never raises out of `decode`: its slot holds an `ImageError` saying what went wrong, so the
caller can skip that sample, count it and carry on.
"""

from __future__ import annotations

import importlib.util
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps

MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses more extreme aspect ratios
RESAMPLE = Image.Resampling.BICUBIC  # what Qwen2-VL's image processor uses


@dataclass(frozen=True)
class ImageError:
    """Why one image could not be used: a stable `reason` (counted) and the library's `detail` (logged)."""

    reason: str
    detail: str = ""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides rounded to multiples of `factor`, area clamped to [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def read_source(source: bytes | str | Path | dict) -> bytes:
    """Encoded bytes of one image given as bytes, a path, or a Hugging Face datasets {bytes, path} struct."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return bytes(source["bytes"])
        if source.get("path"):
            return Path(source["path"]).read_bytes()
        raise ValueError("image struct has neither bytes nor path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source).read_bytes()


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # a quarter turn (with or without a mirror): width and height swap
RESIZE_RULES = ("reference", "smart")


def scale_into(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The reference dataset's step: an area outside [min_pixels, max_pixels] scaled to the bound it crossed,
    sides truncated to integers; an area inside unchanged."""
    area = height * width
    if area > max_pixels:
        factor = math.sqrt(max_pixels / area)
    elif area < min_pixels:
        factor = math.sqrt(min_pixels / area)
    else:
        return height, width
    return max(1, int(height * factor)), max(1, int(width * factor))


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as displayed: after its EXIF orientation (read from the header only)."""
    width, height = image.size
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a truncated file: its pixel decode reports it (as corrupt data)
        orientation = None
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return height, width


class ImageDecoder(Protocol):
    name: str

    def decode(self, encoded: list[bytes]) -> list[np.ndarray | ImageError]: ...


@dataclass
class ResizePlan:
    factor: int
    min_pixels: int
    max_pixels: int
    rule: str = "reference"
    processor_pixels: tuple[float, float] = (0, math.inf)
    """The model processor's own [min, max] area: its smart_resize is the last step (see the module docstring)."""

    def size(self, height: int, width: int) -> tuple[int, int]:
        if self.rule == "reference":
            height, width = scale_into(height, width, self.min_pixels, self.max_pixels)
        else:
            height, width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return smart_resize(height, width, self.factor, *self.processor_pixels)

    def sizes(self, encoded: list[bytes]) -> list[tuple[int, int] | ImageError]:
        """Planned from the headers alone (no pixel decode)."""
        out: list[tuple[int, int] | ImageError] = []
        for data in encoded:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    out.append(self.size(*oriented_size(image)))
            except Exception as exc:  # any header/format problem makes the image unusable
                out.append(ImageError("unreadable image header", str(exc)))
        return out


class PillowDecoder:
    """Decodes and resizes with Pillow, one image at a time."""

    name = "pillow"

    def __init__(self, plan: ResizePlan):
        self.plan = plan

    def decode(self, encoded: list[bytes]) -> list[np.ndarray | ImageError]:
        return [self.decode_one(data, size) for data, size in zip(encoded, self.plan.sizes(encoded))]

    @staticmethod
    def decode_one(data: bytes, size: tuple[int, int] | ImageError) -> np.ndarray | ImageError:
        if isinstance(size, ImageError):
            return size
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = ImageOps.exif_transpose(image).convert("RGB")  # as DALI's decoder orients it
                if rgb.size != (size[1], size[0]):
                    rgb = rgb.resize((size[1], size[0]), RESAMPLE)
                return np.asarray(rgb, dtype=np.uint8)
        except Exception as exc:  # truncated or corrupt pixel data
            return ImageError("corrupt image data", str(exc))


class DaliDecoder:
    """Decodes and resizes a whole batch in one DALI pipeline run (CPU operators, `device_id=None`).

    Target sizes are planned from the headers first, so the pipeline gets per-sample resize_x/resize_y argument
    inputs. If DALI rejects the batch (a corrupt file fails the whole run), the batch is decoded image by image
    with Pillow so only the bad images are lost.
    """

    name = "dali"

    def __init__(self, plan: ResizePlan, max_batch_size: int = 64, num_threads: int = 2):
        from nvidia.dali import fn, pipeline_def, types

        self.plan = plan
        self.max_batch_size = max_batch_size

        @pipeline_def(batch_size=max_batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            width = fn.external_source(name="width", dtype=types.FLOAT)
            height = fn.external_source(name="height", dtype=types.FLOAT)
            decoded = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            return fn.resize(decoded, resize_x=width, resize_y=height, interp_type=types.INTERP_CUBIC)

        self.pipeline = pipeline()
        self.pipeline.build()

    def decode(self, encoded: list[bytes]) -> list[np.ndarray | ImageError]:
        out: list[np.ndarray | ImageError] = []
        for start in range(0, len(encoded), self.max_batch_size):
            out += self._decode_chunk(encoded[start : start + self.max_batch_size])
        return out

    def _decode_chunk(self, encoded: list[bytes]) -> list[np.ndarray | ImageError]:
        sizes = self.plan.sizes(encoded)
        good = [i for i, size in enumerate(sizes) if not isinstance(size, ImageError)]
        out: list[np.ndarray | ImageError] = list(sizes)  # type: ignore[arg-type]
        if not good:
            return out
        try:
            arrays = self._run([encoded[i] for i in good], [sizes[i] for i in good])  # type: ignore[misc]
        except Exception:  # DALI fails the whole batch on one corrupt file: isolate it with Pillow
            return [PillowDecoder.decode_one(data, size) for data, size in zip(encoded, sizes)]
        for i, array in zip(good, arrays):
            out[i] = array
        return out

    def _run(self, encoded: list[bytes], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        self.pipeline.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in encoded])
        self.pipeline.feed_input("height", [np.float32(h) for h, _ in sizes])
        self.pipeline.feed_input("width", [np.float32(w) for _, w in sizes])
        (images,) = self.pipeline.run()
        return [np.array(images[i]) for i in range(len(encoded))]


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


DECODER_BACKENDS = ("auto", "dali", "pillow")


def processor_pixels(image_processor) -> tuple[int, int]:
    """The [min, max] image area a Qwen2-VL-style image processor resizes into (its `size` or min/max_pixels)."""
    size = getattr(image_processor, "size", None) or {}
    low = getattr(image_processor, "min_pixels", None) or size.get("shortest_edge")
    high = getattr(image_processor, "max_pixels", None) or size.get("longest_edge")
    return int(low or 0), int(high) if high else math.inf


def make_decoder(
    backend: str,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    rule: str = "reference",
    processor_limits: tuple[float, float] = (0, math.inf),
) -> ImageDecoder:
    """backend: auto (DALI when installed), dali, or pillow; rule: reference or smart (module docstring)."""
    if backend not in DECODER_BACKENDS:
        # Checked first: an unknown name used to fall through to DALI, hiding a typo such as "pil".
        raise ValueError(f"data.image_decoder={backend!r} is not one of {' | '.join(DECODER_BACKENDS)}")
    if rule not in RESIZE_RULES:
        raise ValueError(f"data.image_resize={rule!r} is not one of {' | '.join(RESIZE_RULES)}")
    plan = ResizePlan(factor, min_pixels, max_pixels, rule, processor_limits)
    if backend == "pillow" or (backend == "auto" and not dali_available()):
        return PillowDecoder(plan)
    if not dali_available():
        raise ValueError(
            "data.image_decoder=dali but nvidia-dali is not installed; "
            "pip install nvidia-dali-cuda120 or set data.image_decoder=pillow"
        )
    return DaliDecoder(plan)
