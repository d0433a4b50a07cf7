"""metrics.py: the JSONL file, the console line, TensorBoard scalars, the accuracy PNG and the progress bar."""

import pytest
from PIL import Image

from vppo_megatron.config import load
from vppo_megatron.metrics import MetricsLogger, Progress

STEP_METRICS = {
    "time/step_s": 12.3456,
    "custom/thing": 2.0,
    "actor/loss": -0.012341,
    "val/accuracy": 0.5,
    "rollout/kept_groups": 16.0,
    "reward/accuracy": 0.4375,
    "vppo/selected_fraction": 0.4,
    "sync/buckets": 3.0,
    "actor/grad_norm": 1.5,
}


def _logger(tmp_path, *overrides):
    return MetricsLogger(load(None, ["logging.tensorboard=false", *overrides]), tmp_path / "run")


def test_jsonl_line_is_the_step_then_metrics_in_data_flow_order(tmp_path):
    logger = _logger(tmp_path)
    logger.log(3, STEP_METRICS, console=False)
    logger.log(4, {"reward/accuracy": 0.5})
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (
        '{"step": 3, "rollout/kept_groups": 16.0, "reward/accuracy": 0.4375, "vppo/selected_fraction": 0.4, '
        '"actor/grad_norm": 1.5, "actor/loss": -0.012341, "sync/buckets": 3.0, "val/accuracy": 0.5, '
        '"time/step_s": 12.3456, "custom/thing": 2.0}\n'
        '{"step": 4, "reward/accuracy": 0.5}\n'
    )
    assert [row["step"] for row in logger.history()] == [3, 4]
    assert logger.history()[0] == {"step": 3, **STEP_METRICS}


def test_console_line_shows_the_headline_metrics_at_4_significant_digits(tmp_path, capsys):
    _logger(tmp_path).log(3, STEP_METRICS)
    assert capsys.readouterr().out == (
        "step 3: reward/accuracy=0.4375  val/accuracy=0.5  actor/loss=-0.01234  actor/grad_norm=1.5  "
        "vppo/selected_fraction=0.4  time/step_s=12.35\n"
    )


def test_switched_off_outputs_write_nothing(tmp_path, capsys):
    logger = _logger(tmp_path, "logging.jsonl=false", "logging.console=false")
    logger.log(1, STEP_METRICS)
    assert capsys.readouterr().out == "" and not logger.path.exists() and logger.history() == []


def test_tensorboard_gets_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(load(None, ["logging.console=false"]), tmp_path / "run")
    logger.log(2, {"reward/accuracy": 0.25, "time/step_s": 1.5})
    logger.log(3, {"reward/accuracy": 0.75})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["reward/accuracy", "time/step_s"]
    assert [(e.step, e.value) for e in events.Scalars("reward/accuracy")] == [(2, 0.25), (3, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("time/step_s")] == [(2, 1.5)]


def _pixel(image, x, y):
    return image.getpixel((x, y))


def test_plot_draws_each_curve_point_where_its_step_and_value_put_it(tmp_path):
    logger = _logger(tmp_path, "logging.console=false")
    for step, train, val in [(0, 0.25, 0.5), (5, 0.5, None), (10, 0.75, 1.0)]:
        logger.log(step, {"reward/accuracy": train, **({"val/accuracy": val} if val is not None else {})})
    path = logger.plot(tmp_path / "accuracy.png")
    image = Image.open(path).convert("RGB")
    assert image.size == (640, 360)
    # x = 50 + 554 * step / 10, y = 324 - 288 * value (left 50, margin 36, 640 x 360)
    for x, y in [(50, 252), (327, 180), (604, 108)]:
        assert _pixel(image, x, y) == (0, 0, 255), (x, y)  # reward/accuracy in blue
    for x, y in [(50, 180), (604, 36)]:
        assert _pixel(image, x, y) == (255, 0, 0), (x, y)  # val/accuracy in red
    assert _pixel(image, 200, 300) == (255, 255, 255)  # inside the frame, off every curve and grid line
    assert _pixel(image, 300, 36) == (0, 0, 0)  # the frame's top edge (value 1.0)


def test_plot_of_a_run_without_rows_is_an_empty_frame(tmp_path):
    logger = _logger(tmp_path, "logging.console=false")
    image = Image.open(logger.plot(tmp_path / "empty.png")).convert("RGB")
    # below the two labels the frame holds only the background and the light grey grid lines: no point, no line
    plot_area = image.crop((51, 100, 603, 323))
    assert {colour for _, colour in plot_area.getcolors()} == {(255, 255, 255), (225, 225, 225)}


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_counts_steps_and_names_the_phase(enabled, capsys):
    progress = Progress(total=10, initial=3, desc="vppo", enabled=enabled)
    progress.phase("rollout")
    if enabled:
        assert progress.bar.postfix == "rollout" and progress.bar.n == 3
    progress.advance({"reward/accuracy": 0.4375, "actor/loss": -0.012345, "time/step_s": 9.0})
    if enabled:
        assert progress.bar.postfix == "reward_accuracy=0.438, actor_loss=-0.0123" and progress.bar.n == 4
    progress.close()
    err = capsys.readouterr().err
    if enabled:
        assert "vppo:  40%" in err and "4/10" in err and "reward_accuracy=0.438" in err
    else:
        assert progress.bar is None and err == ""
