"""Shared fixtures: the tiny model is built once per test session (offline, seeded)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# torchrun's variables: a test that leaves one in its worker's environment changes what later tests' subprocesses
# do there (a converter that finds WORLD_SIZE takes itself for a launched rank), far from the cause
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_BEFORE = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[_LAUNCH_BEFORE] = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After every fixture (monkeypatch included) is torn down: a test that changed torchrun's variables in this
    process errors here, and they are put back."""
    result = yield
    before = item.stash.get(_LAUNCH_BEFORE, {})
    changed = {name: os.environ.get(name) for name in before if os.environ.get(name) != before[name]}
    for name in changed:
        if before[name] is None:
            del os.environ[name]
        else:
            os.environ[name] = before[name]
    if changed:
        pytest.fail(f"the test left {changed} in the environment of its pytest worker (use monkeypatch.setenv)")
    return result


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


# Held-out shapes: no other fixture has any of their traits, so code that only works on the default tiny shapes
# (even layer counts, heads x head_dim == hidden, a vocabulary padded to 128, the default M-RoPE sections) fails
# here. Both families, one tied and one untied. HF parity (test_actor), an uneven pipeline split (test_parallel_
# parity) and a conversion round trip (test_checkpoint_convert) run on each.
HELD_OUT_SPECS = {
    # 5 layers; 6 heads over 2 KV heads (GQA groups of 3), head_dim 32; sections (8, 4, 4), not (4, 6, 6); tied
    "qwen2_5_vl": dict(
        num_layers=5,
        hidden_size=192,
        intermediate_size=320,
        num_heads=6,
        num_kv_heads=2,
        mrope_section=(8, 4, 4),
        tokenizer_vocab=1000,
        vocab_multiple=2,
        tie_word_embeddings=True,
        seed=7,
    ),
    # 3 layers; 4 heads x head_dim 48 = 192 != hidden 160; interleaved sections (8, 8, 8), not (10, 7, 7);
    # untied; DeepStack into layers 0 and 1, which an uneven pipeline split must keep on the first stage
    "qwen3_vl": dict(
        num_layers=3,
        hidden_size=160,
        intermediate_size=288,
        num_heads=4,
        num_kv_heads=2,
        head_dim=48,
        mrope_section=(8, 8, 8),
        tokenizer_vocab=1000,
        vocab_multiple=2,
        seed=7,
    ),
}


def _held_out(tmp_path_factory, family):
    from vppo_megatron.tiny_model import build_tiny_model, tiny_spec

    spec = tiny_spec(family, **HELD_OUT_SPECS[family])
    return build_tiny_model(tmp_path_factory.mktemp("models") / f"held-out-{family}", spec)


@pytest.fixture(scope="session")
def held_out_qwen2_5_vl_dir(tmp_path_factory):
    return _held_out(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="session")
def held_out_qwen3_vl_dir(tmp_path_factory):
    return _held_out(tmp_path_factory, "qwen3_vl")


HELD_OUT_MODELS = {"qwen2_5_vl": "held_out_qwen2_5_vl_dir", "qwen3_vl": "held_out_qwen3_vl_dir"}


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


# Seconds each of the longest files takes (warm, 2 workers; `--durations=0`): the scheduler starts them heaviest
# first and the quick files fill the gaps. A slow-marked file missing here counts as SLOW_FILE_S.
FILE_SECONDS = {
    "rollout/test_fleet.py": 390,
    "test_checkpoint_convert.py": 180,
    "test_compare.py": 150,
    "rollout/test_launch_multinode.py": 130,
    "actor/test_parallel_parity.py": 100,
    "test_gpu_acceptance.py": 95,
    "test_eval.py": 50,
    "rollout/test_qwen3_vl.py": 45,
    "test_rehearsal.py": 40,
}
SLOW_FILE_S = 20


def pytest_collection_modifyitems(config, items):
    """Files heaviest first (FILE_SECONDS; other files with slow tests next), the rest in their usual order: with
    two workers (`make test`, which keeps this order with --no-loadscope-reorder: xdist would otherwise sort files
    by their number of tests) the longest files start at once and the quick ones fill the gaps, instead of one long
    file ending the run alone."""
    here = Path(__file__).parent
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def weight(item) -> float:
        known = FILE_SECONDS.get(item.path.relative_to(here).as_posix())
        return known if known is not None else SLOW_FILE_S if item.path in slow_files else 0

    items.sort(key=lambda item: -weight(item))
