"""`vppo sft`, the supervised warm start on the Megatron actor: it learns, TP=2 equals TP=1, the export loads."""

import json
import subprocess
import sys

import pytest
import torch

from vppo_megatron.config import load
from vppo_megatron.sft import supervised_samples
from vppo_megatron.testing import run_distributed


def test_supervised_samples_cache_token_ids_and_keep_the_rows(tiny_processor, tmp_path):
    from vppo_megatron.data.dataset import PromptDataset, PromptLoader
    from vppo_megatron.data.synthetic import write_dataset

    write_dataset(tmp_path, ["largest_color"], num_train=4, num_val=1, seed=0)
    cfg = load("examples/configs/tiny_cpu.yaml", [f"data.train_files=[{tmp_path / 'train.parquet'}]"])
    ip = tiny_processor.image_processor
    dataset = PromptDataset(cfg.data.train_files, cfg.data, tiny_processor.tokenizer, ip.patch_size, ip.merge_size)
    calls = []

    def counting_processor(**kwargs):
        calls.append(1)
        return tiny_processor(**kwargs)

    wrapped = type("CountingProcessor", (), {"__call__": lambda self, **kw: counting_processor(**kw)})()
    wrapped.tokenizer = tiny_processor.tokenizer
    cache = {}
    first = supervised_samples(cfg, PromptLoader(dataset, 4, seed=0, shuffle=False), wrapped, cache)
    again = supervised_samples(cfg, PromptLoader(dataset, 4, seed=0, shuffle=False), wrapped, cache)
    distinct = {(s.prompt_text, s.answer) for s in dataset.samples(list(range(len(dataset))))}
    assert len(calls) == len(distinct)  # once per distinct question and answer, not per visit
    fresh = supervised_samples(cfg, PromptLoader(dataset, 4, seed=0, shuffle=False), wrapped, {})
    for a, b, c in zip(first, again, fresh, strict=True):
        assert a[:3] == b[:3] == c[:3]
        answer = tiny_processor.tokenizer.decode(a[2])
        assert answer.startswith("<think>") and answer.endswith("}<|im_end|>")


def test_a_rows_worked_solution_is_its_target_with_sft_target_field(tiny_processor, tmp_path):
    from vppo_megatron.data.dataset import PromptDataset, PromptLoader
    from vppo_megatron.data.synthetic import write_dataset

    write_dataset(tmp_path, ["largest_value", "largest_color"], num_train=4, num_val=1, seed=0)
    cfg = load("examples/configs/tiny_cpu.yaml", [f"data.train_files=[{tmp_path / 'train.parquet'}]"])
    ip = tiny_processor.image_processor
    dataset = PromptDataset(cfg.data.train_files, cfg.data, tiny_processor.tokenizer, ip.patch_size, ip.merge_size)
    solutions = load("examples/configs/tiny_cpu.yaml", ["sft.target_field=solution"])
    rows = supervised_samples(solutions, PromptLoader(dataset, 1, seed=0, shuffle=False), tiny_processor, {})
    target = tiny_processor.tokenizer.decode(rows[0][2])
    assert target.startswith("<think> The largest shape is ") and " + " in target and target.endswith("}<|im_end|>")
    plain = supervised_samples(cfg, PromptLoader(dataset, 1, seed=0, shuffle=False), tiny_processor, {})
    assert tiny_processor.tokenizer.decode(plain[0][2]).startswith("<think> I look at the image carefully.")
    second = PromptLoader(dataset, 2, seed=0, shuffle=False)  # the second row (largest_color) has no solution
    with pytest.raises(ValueError, match="has no string 'solution' column value"):
        supervised_samples(solutions, second, tiny_processor, {})


def _sft_rank(rank, world_size, argv):
    from vppo_megatron.sft import main

    return main(argv)


def _sft(tiny_model_dir, data, out, world):
    """`vppo sft` at TP=world: the real command (torchrun ranks) at TP=2; at TP=1 the module's main on one forked
    rank (the single rank torchrun would start, without importing the stack again)."""
    overrides = [
        f"model.path={tiny_model_dir}",
        f"data.train_files=[{data / 'train.parquet'}]",
        f"sft.output_dir={out}",
        "sft.steps=6",
        "sft.lr=3e-3",
        "sft.warmup_steps=0",
        "sft.batch_size=8",
        "trainer.micro_batch_size=4",
        f"parallel.tp={world}",
        f"parallel.world_size={world}",
        "logging.tensorboard=false",
    ]
    argv = ["--config", "examples/configs/tiny_cpu.yaml", *overrides]
    if world == 1:
        assert run_distributed(_sft_rank, 1, argv, timeout_s=600) == [0]
    else:
        command = [sys.executable, "-m", "vppo_megatron.cli", "sft", *argv]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out.parent / f"{out.name}.logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["sft/nll"] for r in rows]


@pytest.mark.slow
def test_sft_learns_and_tp2_equals_tp1(tiny_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vppo_megatron.data.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, ["largest_color"], num_train=8, num_val=1, seed=0)
    nll_tp2 = _sft(tiny_model_dir, data, tmp_path / "tp2", world=2)
    nll_tp1 = _sft(tiny_model_dir, data, tmp_path / "tp1", world=1)
    assert nll_tp2[-1] < 0.75 * nll_tp2[0]  # 6 steps on the same 8 rows: the answer format is being learned
    assert nll_tp2 == pytest.approx(nll_tp1, rel=1e-4)

    def weights(path):  # the export is a working HF model directory
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(path).state_dict()

    tp1, tp2, base = weights(tmp_path / "tp1"), weights(tmp_path / "tp2"), weights(tiny_model_dir)
    assert tp1.keys() == tp2.keys() == base.keys()
    assert max((tp1[k] - tp2[k]).abs().max().item() for k in tp1) < 1e-4
    assert any(not torch.equal(tp1[k], base[k]) for k in tp1)
