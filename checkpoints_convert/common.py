"""What both conversion directions share: launching the ranks, the parallel setup, and --verify's checks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TENSOR_TOLERANCE = 0.0  # conversion copies bits: any difference is a bug
PROBE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


LAUNCHER_PID = "VPPO_CONVERT_LAUNCHER_PID"


def relaunch_under_torchrun(world_size: int, module: str) -> None:
    """Re-executes this command under torchrun with `world_size` local ranks unless already distributed. The
    launcher keeps this process's pid; its workers die with it (`die_with_launcher`), and torchrun forwards
    SIGINT / SIGTERM to them."""
    if world_size > 1 and "WORLD_SIZE" not in os.environ:
        os.environ[LAUNCHER_PID] = str(os.getpid())
        os.execvp(
            sys.executable,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={world_size}",
                "-m",
                module,
                *sys.argv[1:],
            ],
        )


def die_with_launcher() -> None:
    """In a worker this tool's launcher started: the kernel kills it when the launcher dies (PR_SET_PDEATHSIG), so
    a SIGKILL of the launcher leaves no worker that finishes and publishes the output after the user believed
    the job dead."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or "WORLD_SIZE" not in os.environ:
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: a watchdog thread instead
        import threading
        import time

        def watch():
            while os.getppid() == int(launcher):
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != int(launcher):  # the launcher died before the death signal was armed
        os._exit(1)


def hf_family(hf_dir: str | Path) -> tuple[str, dict]:
    """The model family of an HF directory; a clear error for anything else."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    config = json.loads(path.read_text())
    from vppo_megatron import families

    model_type = config.get("model_type")
    try:
        families.get(model_type)
    except families.UnknownFamily as exc:
        raise ValueError(f"{hf_dir}: {exc}") from None
    return model_type, config


def weight_bytes(hf_dir: str | Path) -> int:
    """The size of an HF directory's safetensors files (what a conversion reads)."""
    return sum(p.stat().st_size for p in Path(hf_dir).glob("*.safetensors"))


def dtype_of(hf_config: dict) -> str:
    dtype = (
        hf_config.get("dtype")
        or hf_config.get("torch_dtype")
        or hf_config.get("text_config", {}).get("dtype")
        or "float32"
    )
    return "bfloat16" if dtype == "bfloat16" else "float32"


def add_layout_args(parser) -> None:
    """The Megatron split a conversion runs at (parallel.tp / pp / vpp / first_stage_layers / last_stage_layers)."""
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per rank (interleaved; pp > 1)")
    parser.add_argument(
        "--first-stage-layers", type=int, default=0, help="language-model layers on the first stage (0: even split)"
    )
    parser.add_argument(
        "--last-stage-layers", type=int, default=0, help="language-model layers on the last stage (0: even split)"
    )


def layout_of(args, hf_config: dict, world_size: int):
    """The layout the flags ask for on `world_size` ranks (DP fills the rest), validated against the model so an
    impossible split fails before any work."""
    from checkpoints_convert.inputs import as_flags
    from vppo_megatron.config import ConfigError
    from vppo_megatron.parallel.layout import ParallelLayout

    if world_size % (args.tp * args.pp):
        hint = ""
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # not torchrun: WORLD_SIZE came from the shell or a launcher
            hint = (
                f" (WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set in this environment, so the converter took the "
                "command for one launched rank of a job: unset WORLD_SIZE to let it start its own ranks)"
            )
        raise ValueError(f"--tp {args.tp} x --pp {args.pp} does not divide the {world_size} launched ranks{hint}")
    layout = ParallelLayout(
        tp=args.tp,
        pp=args.pp,
        dp=world_size // (args.tp * args.pp),
        vpp=args.vpp,
        first_stage_layers=args.first_stage_layers,
        last_stage_layers=args.last_stage_layers,
    )
    text = hf_config["text_config"]
    try:
        layout.validate(
            world_size,
            text["num_hidden_layers"],
            text["num_attention_heads"],
            text["num_key_value_heads"],
            text["vocab_size"],
        )
    except ConfigError as exc:
        raise ConfigError(as_flags(str(exc))) from None
    return layout


def setup(args, hf_config: dict, dtype: str):
    """torch.distributed + Megatron groups for a conversion at the flags' layout."""
    import torch.distributed as dist

    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import init_distributed, initialize

    init_distributed()
    _import_everything(hf_config["model_type"])
    layout = layout_of(args, hf_config, dist.get_world_size())
    # one probe sample per micro-batch: the interleaved schedule needs at least pp of them (verify)
    overrides = [f"model.dtype={dtype}", f"model.family={hf_config['model_type']}", "trainer.micro_batch_size=1"]
    cfg = load(None, overrides)
    return cfg, initialize(layout, seed=0)


def _import_everything(model_type: str) -> None:
    """Imports what the conversion's work will use (transformers' processors and the family's model code,
    megatron-core's checkpointing), so that the work's printed time is the work's, and start-up is start-up."""
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    from transformers import AutoConfig, AutoProcessor  # noqa: F401

    from vppo_megatron import families

    family = families.get(model_type)
    family.vision_tower(), family.model_class()


def probe_sample(model_dir: str | Path):
    """A fixed text + image sequence whose log-probs --verify compares."""
    import numpy as np
    from transformers import AutoProcessor

    from vppo_megatron.types import ActorSample

    processor = AutoProcessor.from_pretrained(model_dir)
    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    response = tokenizer.encode("I see two red squares.", add_special_tokens=False) + [tokenizer.eos_token_id]
    return ActorSample("probe", prompt_ids, response, [image])


def hf_probe_log_probs(hf_dir: str | Path, sample, dtype: str):
    """The probe's response log-probs under HF transformers (the reference side of --verify)."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from vppo_megatron import families

    processor = AutoProcessor.from_pretrained(hf_dir)
    model_class = families.get(AutoConfig.from_pretrained(hf_dir).model_type).model_class()
    model = model_class.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    pixels = processor.image_processor(images=sample.images, return_tensors="pt")
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    image_tokens = (ids == model.config.image_token_id).long()
    image_tokens[:, len(sample.prompt_ids) :] = 0
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=image_tokens,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
        ).logits[0]
    logp = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(sample.prompt_ids) - 1 :]


def report(rows: list[tuple[str, float]], probe_gap: float, dtype: str) -> bool:
    """Prints the per-tensor table and the probe result; returns whether everything matched."""
    worst = max((d for _, d in rows), default=0.0)
    width = max((len(n) for n, _ in rows), default=10)
    print(f"{'tensor':{width}s}  max |difference|")
    for name, diff in rows:
        flag = "" if diff <= TENSOR_TOLERANCE else "   MISMATCH"
        print(f"{name:{width}s}  {diff:.3e}{flag}")
    ok = worst <= TENSOR_TOLERANCE and probe_gap <= PROBE_TOLERANCE[dtype]
    print(
        f"{len(rows)} tensors, worst difference {worst:.3e}; probe log-prob gap {probe_gap:.3e} "
        f"(tolerance {PROBE_TOLERANCE[dtype]:g}, {dtype}): {'OK' if ok else 'MISMATCH'}"
    )
    return ok


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def verify(actor, hf_dir: str | Path, dtype: str) -> bool:
    """Every tensor of the (loaded) actor against the HF directory's safetensors, and the probe's log-probs
    against HF transformers on that directory; prints the report on rank 0; the verdict on every rank."""
    import torch
    import torch.distributed as dist

    from vppo_megatron.actor import weights

    reader = weights.SafetensorsReader(hf_dir)
    rows = [
        (name, (tensor.float() - reader.get(name).float()).abs().max().item()) for name, tensor in actor.hf_tensors()
    ]
    sample = probe_sample(hf_dir)
    copies = actor.groups.layout.pp  # the interleaved schedule needs at least pp micro-batches
    ours = actor.experience([sample] * copies, step=0, with_perception=False).old_logp_BT[0]
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, rows)
    ok = True
    if dist.get_rank() == 0:
        gap = (ours - hf_probe_log_probs(hf_dir, sample, dtype)).abs().max().item()
        merged = dict(row for part in everything for row in part)
        ok = report(sorted(merged.items()), gap, dtype) and set(merged) == reader.keys()
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_cli(module: str, args, precheck, work) -> int:
    """Checks inputs once, re-launches under torchrun if needed, runs `work(args, *prechecked)`; errors are one
    clear line and exit code 2."""
    from vppo_megatron.actor.integrity import remove_stale_temporaries
    from vppo_megatron.config import ConfigError

    die_with_launcher()
    try:
        prechecked = precheck(args)
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError) as exc:
        return fail(str(exc))
    if os.environ.get("RANK", "0") == "0" and LAUNCHER_PID not in os.environ:  # once, in the launcher
        remove_stale_temporaries(args.out)
    relaunch_under_torchrun(args.tp * args.pp, module)
    try:
        return work(args, *prechecked)
    except (KeyError, ValueError) as exc:
        return fail(str(exc))
