import io

import numpy as np
import pytest
from PIL import Image

from vppo_megatron.data import images
from vppo_megatron.data.images import (
    DaliDecoder,
    ImageError,
    PillowDecoder,
    make_decoder,
    read_source,
    smart_resize,
)


def _encode(h, w, fmt="PNG", seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (112, 112, (112, 112)),  # already multiples of 28 inside the bounds: unchanged
        (100, 150, (112, 140)),  # rounded to the nearest multiple of 28: 100/28=3.6 -> 4, 150/28=5.4 -> 5
        (20, 20, (56, 56)),  # 28x28=784 < 3136: scaled by sqrt(3136/400)=2.8 -> ceil(56/28)*28 = 56
        (1000, 1000, (224, 224)),  # 1008^2 > 50176: beta = sqrt(1e6/50176)=4.46 -> floor(224.2/28)*28 = 224
    ],
)
def test_smart_resize_matches_qwen_rule(h, w, expected):
    assert smart_resize(h, w, 28, 3136, 50176) == expected


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100, 28, 3136, 50176)


def test_read_source_accepts_bytes_paths_and_structs(tmp_path):
    data = _encode(28, 28)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert read_source(data) == read_source(str(path)) == read_source({"bytes": None, "path": str(path)}) == data
    assert read_source({"bytes": data, "path": None}) == data
    with pytest.raises(ValueError, match="neither bytes nor path"):
        read_source({"bytes": None, "path": None})


@pytest.mark.parametrize("backend", ["pillow", "dali"])
def test_decoders_resize_and_isolate_corrupt_images(backend):
    decoder = make_decoder(backend, 28, 3136, 50176)
    good = [_encode(112, 112), _encode(100, 150, "JPEG"), _encode(300, 500)]
    truncated = good[0][:200]  # header intact, pixel data cut
    out = decoder.decode([good[0], truncated, b"not an image", good[1], good[2]])
    assert [o.shape if isinstance(o, np.ndarray) else "error" for o in out] == [
        (112, 112, 3),
        "error",
        "error",
        (112, 140, 3),
        (168, 280, 3),
    ]
    assert all(o.dtype == np.uint8 for o in out if isinstance(o, np.ndarray))
    assert out[1].reason == "corrupt image data" and "truncated" in out[1].detail
    assert isinstance(out[2], ImageError) and "header" in out[2].reason


def test_dali_equals_pillow_without_resize_and_is_close_with_it():
    dali, pillow = make_decoder("dali", 28, 3136, 50176), make_decoder("pillow", 28, 3136, 50176)
    same = [_encode(112, 112, seed=s) for s in range(3)]
    for a, b in zip(dali.decode(same), pillow.decode(same)):
        np.testing.assert_array_equal(a, b)  # lossless PNG at the target size: bit-identical decode
    resized = [_encode(300, 500, "JPEG")]
    a, b = dali.decode(resized)[0], pillow.decode(resized)[0]
    # Both bicubic, different kernels/antialiasing: a small mean difference on 0..255 noise.
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_auto_picks_pillow_without_dali_and_decodes_as_pil(monkeypatch):
    monkeypatch.setattr(images, "dali_available", lambda: False)
    decoder = make_decoder("auto", 28, 3136, 50176)
    assert isinstance(decoder, PillowDecoder)
    data = _encode(100, 150, "JPEG")
    # 100 x 150 -> 112 x 140 (see test_smart_resize_matches_qwen_rule); PIL's own bicubic resize of the same file.
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((140, 112), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(decoder.decode([data])[0], expected)


def test_auto_picks_dali_when_installed(monkeypatch):
    monkeypatch.setattr(images, "dali_available", lambda: True)
    assert isinstance(make_decoder("auto", 28, 3136, 50176), DaliDecoder)


def test_dali_without_the_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(images, "dali_available", lambda: False)
    with pytest.raises(ValueError, match="nvidia-dali is not installed.*data.image_decoder=pillow"):
        make_decoder("dali", 28, 3136, 50176)


@pytest.mark.parametrize("backend", ["pil", "DALI", ""])
def test_unknown_decoder_is_an_error_naming_the_choices(backend):
    with pytest.raises(ValueError) as err:
        make_decoder(backend, 28, 3136, 50176)
    assert str(err.value) == f"data.image_decoder={backend!r} is not one of auto | dali | pillow"


# Qwen2.5-VL's processor limits (its preprocessor_config.json) and the VPPO recipes' data range
QWEN_PROCESSOR = (3136, 12845056)
RECIPE_PIXELS = (200704, 1003520)


@pytest.mark.parametrize(
    "h, w, rule, tokens",
    [
        # the reference: 2000^2 scaled into the range (1001^2), then the processor's rounding: 36 x 36 tokens
        (2000, 2000, "reference", 1296),
        # the reference: 200 x 300 scaled up to 365 x 548, rounded to 364 x 560: 13 x 20 tokens
        (200, 300, "reference", 260),
        # one smart_resize within the range: floor to 980^2 (35 x 35), ceil to 392 x 560 (14 x 20)
        (2000, 2000, "smart", 1225),
        (200, 300, "smart", 280),
    ],
)
def test_resize_rules_give_the_reference_image_token_counts(h, w, rule, tokens):
    plan = images.ResizePlan(28, *RECIPE_PIXELS, rule, QWEN_PROCESSOR)
    height, width = plan.size(h, w)
    assert height % 28 == 0 and width % 28 == 0
    assert (height // 28) * (width // 28) == tokens
    assert smart_resize(height, width, 28, *QWEN_PROCESSOR) == (height, width)  # the processor keeps it


@pytest.mark.parametrize("backend", ["pillow", "dali"])
def test_the_decoders_size_images_by_the_reference_rule(backend):
    decoder = make_decoder(backend, 28, *RECIPE_PIXELS, "reference", QWEN_PROCESSOR)
    (out,) = decoder.decode([_encode(200, 300, "JPEG")])
    assert out.shape == (364, 560, 3)


def _exif_rotated_jpeg(orientation=6):
    """A 56 x 112 JPEG stored sideways: EXIF orientation 6 says to display it turned a quarter (112 x 56)."""
    array = np.zeros((56, 112, 3), np.uint8)
    array[:, :50] = 255
    array[:10] = [255, 0, 0]
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[images.EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_an_exif_rotated_jpeg_gives_the_same_pixels_through_dali_and_pillow():
    data = _exif_rotated_jpeg()
    dali, pillow = (make_decoder(b, 28, 3136, 50176) for b in ("dali", "pillow"))
    a, b = dali.decode([data])[0], pillow.decode([data])[0]
    assert a.shape == b.shape == (112, 56, 3)  # planned after the rotation: no resize (not 56 x 112 squashed)
    np.testing.assert_array_equal(a, b)  # both decoders turn it the same way
    upright = make_decoder("pillow", 28, 3136, 50176).decode([_exif_rotated_jpeg(orientation=1)])[0]
    assert upright.shape == (56, 112, 3)
