"""Shared fixtures: the tiny model is built once per test session (offline, seeded)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from vppo_megatron.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory):
    """The tiny Qwen3-VL: 4 LLM layers, DeepStack from 2 of 3 ViT blocks, QK-norm, interleaved M-RoPE."""
    from vppo_megatron.tiny_model import build_tiny_model, tiny_spec

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3_vl", tiny_spec("qwen3_vl"))


@pytest.fixture(scope="session")
def tiny_qwen3_vl_tied_dir(tmp_path_factory):
    """The tiny Qwen3-VL with tied embeddings (as Qwen3-VL 2B / 4B): at PP > 1 the last stage holds a copy."""
    from vppo_megatron.tiny_model import build_tiny_model, tiny_spec

    spec = tiny_spec("qwen3_vl", tie_word_embeddings=True)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3_vl-tied", spec)


# model fixture of each family's tiny model: the family-parametrised tests (parity, conversion, sync) use it
FAMILY_MODELS = {"qwen2_5_vl": "tiny_model_dir", "qwen3_vl": "tiny_qwen3_vl_dir"}


@pytest.fixture(scope="session")
def tiny_model_3l_dir(tmp_path_factory):
    """3 language-model layers: an uneven pipeline split (1 + 2 on PP2)."""
    from vppo_megatron.tiny_model import TinySpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl-3l", TinySpec(num_layers=3))


@pytest.fixture(scope="session")
def tiny_model_4l_dir(tmp_path_factory):
    """4 language-model layers: one per virtual stage at PP2 x VPP2."""
    from vppo_megatron.tiny_model import TinySpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl-4l", TinySpec(num_layers=4))


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, the rest in their usual order: with two workers (`make test`) the longest
    files start at once and the quick ones fill the gaps, instead of one long file ending the run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
