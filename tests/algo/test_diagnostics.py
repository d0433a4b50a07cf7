"""Perception diagnostics: the answer's token span, the histograms and fractions of a step, their TensorBoard
histograms and the end-of-run PNG."""

import json

import pytest
import torch

from vppo_megatron.algo import diagnostics as D


def test_the_answer_span_is_the_content_of_the_last_boxed(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    text = "<think> The largest shape is red. red is 4. 4 + 2 = 6. </think> \\boxed{16}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    a, b = D.answer_span(tokenizer, ids)
    assert tokenizer.decode(ids[a:b]) == "16" and tokenizer.decode(ids[b:]) == "}"
    nested = tokenizer.encode("\\boxed{x} so \\boxed{\\frac{1}{2}} end", add_special_tokens=False)
    a, b = D.answer_span(tokenizer, nested)
    assert "\\frac{1}{2" in tokenizer.decode(nested[a:b]) and "x" not in tokenizer.decode(nested[a:b])
    assert D.answer_span(tokenizer, tokenizer.encode("no answer", add_special_tokens=False)) is None
    assert D.answer_span(tokenizer, tokenizer.encode("\\boxed{6", add_special_tokens=False)) is None  # cut short


def test_histogram_bins_have_under_and_overflow():
    counts = D.histogram(torch.tensor([0.0, 1e-7, 1e-6, 2e-6, 0.5, 10.0, 11.0]), D.DEPENDENCY_EDGES)
    assert len(counts) == len(D.DEPENDENCY_EDGES) + 1 and counts.sum() == 7
    assert counts[0] == 3 and counts[-1] == 1 and counts[-2] == 1  # <= 1e-6 | ... | (5.6, 10] | > 10


def test_a_steps_fractions_concentration_and_alpha():
    # 2 rollouts x 5 positions; the second has 4 valid tokens. One token carries almost all the dependency.
    dependency = torch.tensor([[1e-4, 1e-4, 1.0, 1e-4, 1e-4], [1e-4, 1e-4, 1e-4, 1e-4, 9.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.float32)
    selected = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    answer = D.answer_mask([(3, 5), (3, 4)], dependency.shape)
    metrics, hist = D.perception_diagnostics(dependency, valid, selected, torch.tensor([0.9, 1.1]), answer)
    assert metrics["vppo/answer_token_fraction"] == pytest.approx(3 / 9)  # positions 3, 4 | 3 (4 is padding)
    assert metrics["vppo/selected_answer_fraction"] == pytest.approx(1 / 3)  # (0, 3) of (0, 2), (0, 3), (1, 0)
    assert metrics["vppo/answer_tokens_selected"] == pytest.approx(1 / 3)
    assert metrics["vppo/dependency_top10_share"] == pytest.approx(1.0 / (1.0 + 8e-4), rel=1e-6)  # top 1 of 9
    assert metrics["vppo/tas_alpha_mean"] == pytest.approx(1.0) and metrics["vppo/tas_alpha_std"] == pytest.approx(0.1)
    assert sum(hist["token_dependency"]["counts"]) == 9 and sum(hist["trajectory_dependency"]["counts"]) == 2
    assert hist["token_dependency"]["max"] == 1.0 and hist["tas_alpha"]["min"] == pytest.approx(0.9)


def test_histograms_reach_tensorboard_and_the_end_of_run_png(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vppo_megatron.config import load
    from vppo_megatron.metrics import MetricsLogger

    logger = MetricsLogger(load(None, ["logging.tensorboard=true"]), tmp_path)
    dependency = torch.rand(4, 6) ** 4
    valid, answer = torch.ones(4, 6), D.answer_mask([(4, 6)] * 4, (4, 6))
    for step in (0, 1):
        metrics, hist = D.perception_diagnostics(dependency * (step + 1), valid, valid, torch.ones(4), answer)
        logger.log(step, metrics, console=False)
        logger.log_histograms(step, hist)
    logger.log_histograms(1, hist)  # a resumed run repeats a step: it counts once
    assert [r["step"] for r in logger.histograms()] == [0, 1]
    assert json.loads((tmp_path / "histograms.jsonl").read_text().splitlines()[0])["step"] == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert {"vppo/token_dependency", "vppo/trajectory_dependency", "vppo/tas_alpha"} <= set(events.Tags()["histograms"])
    token = events.Histograms("vppo/token_dependency")
    assert [h.step for h in token] == [0, 1, 1] and token[0].histogram_value.num == 24
    png = logger.plot_perception(tmp_path / "perception.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (
        MetricsLogger(load(None, ["logging.tensorboard=false"]), tmp_path / "none").plot_perception(tmp_path / "x.png")
        is None
    )
