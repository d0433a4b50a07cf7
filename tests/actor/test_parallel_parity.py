"""Every parallel layout equals the serial actor: log-probs, dependency, loss and parameters after one step."""

import pytest
import torch
from conftest import FAMILY_MODELS
from parity_worker import run_layout

from vppo_megatron.testing import run_distributed

TOLERANCE = 1e-5
LAYOUTS = {
    "tp2": ({"tp": 2}, 2),
    "pp2": ({"pp": 2}, 2),
    "cp2": ({"cp": 2}, 2),
    "dp2": ({"dp": 2}, 2),
    "tp2_pp2_dp2": ({"tp": 2, "pp": 2, "dp": 2}, 8),
}


def _run(model_dir, layout, world_size, overrides=()):
    results = run_distributed(run_layout, world_size, str(model_dir), layout, list(overrides), timeout_s=900)
    experience = {}
    for r in sorted(results, key=lambda r: r["shard"]):
        if r["shard"] in {s for s, _ in experience.values()}:
            continue
        experience[r["dp_rank"]] = (r["shard"], r["experience"])
    assembled = {}
    for name in next(iter(experience.values()))[1]:
        parts = [exp[name] for _, (_, exp) in sorted(experience.items())]
        width = max(p.shape[1] for p in parts)
        assembled[name] = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])
    params = {}
    for r in results:
        params.update(r["params"])
    return assembled, results[0]["metrics"], params


@pytest.fixture(scope="module")
def serial_of(request):
    """The serial run of a model fixture, computed once per module."""
    runs = {}

    def get(model_fixture):
        if model_fixture not in runs:
            runs[model_fixture] = _run(request.getfixturevalue(model_fixture), {}, 1)
        return runs[model_fixture]

    return get


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_serial_step_is_meaningful(family, serial_of, request):
    tiny_model_dir = request.getfixturevalue(FAMILY_MODELS[family])
    experience, metrics, params = serial_of(FAMILY_MODELS[family])
    mask = experience["response_mask_BT"].bool()
    assert (experience["dependency_BT"][mask] > 0).any(), "perturbing the image must move some prediction"
    assert torch.equal(experience["dependency_BT"][~mask], torch.zeros((~mask).sum()))
    assert metrics["actor/update_ok"] == 1.0 and metrics["actor/grad_norm"] > 0
    from vppo_megatron.actor.weights import SafetensorsReader

    reader = SafetensorsReader(tiny_model_dir)
    moved = max((params[n] - reader.get(n)).abs().max().item() for n in params)
    assert moved > 1e-3, "one optimizer step at lr 0.1 (adam eps 1: ~lr * grad) must visibly change the weights"
    assert set(params) == reader.keys()


def _assert_equal(result, serial):
    experience, metrics, params = result
    serial_experience, serial_metrics, serial_params = serial
    for key, value in serial_experience.items():
        torch.testing.assert_close(experience[key], value, atol=TOLERANCE, rtol=0, msg=key)
    for key in ("actor/loss", "actor/pg_loss", "actor/neg_logp", "actor/grad_norm", "vppo/dependency_selected"):
        assert abs(metrics[key] - serial_metrics[key]) <= TOLERANCE * max(1.0, abs(serial_metrics[key])), key
    assert set(params) == set(serial_params)
    for key, value in serial_params.items():
        torch.testing.assert_close(params[key], value, atol=TOLERANCE, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_MODELS))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_serial(name, family, serial_of, request):
    layout, world_size = LAYOUTS[name]
    model_fixture = FAMILY_MODELS[family]
    _assert_equal(_run(request.getfixturevalue(model_fixture), layout, world_size), serial_of(model_fixture))


# Interleaved (virtual) and uneven pipelines need more layers than the 2-layer model: (model fixture, layout, ranks)
PIPELINE_SPLITS = {
    "pp2_vpp2": ("tiny_model_4l_dir", {"pp": 2, "vpp": 2}, 2),
    "tp2_pp2_vpp2": ("tiny_model_4l_dir", {"tp": 2, "pp": 2, "vpp": 2}, 4),
    "pp2_uneven_1_2": ("tiny_model_3l_dir", {"pp": 2, "first_stage_layers": 1, "last_stage_layers": 2}, 2),
    # tied embeddings: the last stage's output layer is megatron-core's copy of the embedding (loaded from the
    # embedding, both gradients all-reduced over the embedding group), so the step equals the serial one
    "qwen3_vl_tied_pp2": ("tiny_qwen3_vl_tied_dir", {"pp": 2}, 2),
    # the held-out shapes (conftest.HELD_OUT_SPECS): 5 layers as 2 + 3 (tied), 3 as 2 + 1 (DeepStack's two layers
    # stay on the first stage, where the vision tower runs; 1 + 2 is a ConfigError that says so)
    "held_out_qwen2_5_vl_pp2_2_3": ("held_out_qwen2_5_vl_dir", {"pp": 2, "first_stage_layers": 2}, 2),
    "held_out_qwen3_vl_pp2_2_1": ("held_out_qwen3_vl_dir", {"pp": 2, "first_stage_layers": 2}, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PIPELINE_SPLITS))
def test_virtual_and_uneven_pipelines_equal_serial(name, serial_of, request):
    model_fixture, layout, world_size = PIPELINE_SPLITS[name]
    result = _run(request.getfixturevalue(model_fixture), layout, world_size)
    _assert_equal(result, serial_of(model_fixture))


# Sequence parallelism on the local spec (actor/model.py SequenceParallelNorm), in the layouts the recipes use it:
# TP2 + SP (Qwen2.5-VL 7B / 32B) and TP2 x CP2 + SP (Qwen3-VL 8B, DeepStack features scattered like the tokens)
SEQUENCE_PARALLEL = {
    "qwen2_5_vl_tp2_sp": ("qwen2_5_vl", {"tp": 2}, 2),
    "qwen3_vl_tp2_cp2_sp": ("qwen3_vl", {"tp": 2, "cp": 2}, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEQUENCE_PARALLEL))
def test_sequence_parallel_equals_serial(name, serial_of, request):
    family, layout, world_size = SEQUENCE_PARALLEL[name]
    model_fixture = FAMILY_MODELS[family]
    result = _run(request.getfixturevalue(model_fixture), layout, world_size, ["parallel.sequence_parallel=true"])
    _assert_equal(result, serial_of(model_fixture))


# Packed micro-batches (trainer.pack_sequences: one row of rollouts, THD attention within each): the same numbers
# as the padded serial run, alone, with TP2 + sequence parallelism, and across a pipeline (DeepStack on stage 1)
PACKED = {
    "qwen2_5_vl_serial": ("qwen2_5_vl", {}, 1, []),
    "qwen2_5_vl_tp2_sp": ("qwen2_5_vl", {"tp": 2}, 2, ["parallel.sequence_parallel=true"]),
    "qwen3_vl_pp2": ("qwen3_vl", {"pp": 2}, 2, []),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PACKED))
def test_packed_sequences_equal_padded_serial(name, serial_of, request):
    family, layout, world_size, overrides = PACKED[name]
    model_fixture = FAMILY_MODELS[family]
    result = _run(
        request.getfixturevalue(model_fixture), layout, world_size, ["trainer.pack_sequences=true", *overrides]
    )
    _assert_equal(result, serial_of(model_fixture))
