"""Overrides that make `vppo train` on the tiny model small, deterministic and checkpointing (shared by the trainer
tests: end to end, kill-and-resume, the multi-node launcher)."""


def tiny_overrides(tiny_model_dir, data, out, steps: int) -> list[str]:
    # a random model solves nothing: keep every group, and let the entropy term move the weights
    return [
        f"model.path={tiny_model_dir}",
        f"data.train_files=[{data / 'train.parquet'}]",
        f"data.val_files=[{data / 'validation.parquet'}]",
        f"trainer.total_steps={steps}",
        "trainer.prompts_per_step=2",
        "trainer.prompts_per_update=1",
        "trainer.micro_batch_size=4",
        "rollout.num_samples_per_prompt=4",
        "algorithm.tas_segment=4",  # one prompt's rollouts per rank and update
        "rollout.max_response_length=8",
        "trainer.val_every=0",
        "trainer.val_prompts=2",
        "rollout.val_num_samples=1",
        f"trainer.output_dir={out}",
        "algorithm.dynamic_sampling=false",
        "algorithm.entropy_coef=0.06",
        "checkpoint.save_every=2",
        "checkpoint.keep_last=1",
        "logging.tensorboard=false",
    ]


def torchrun_train(tiny_model_dir, data, out, steps: int, *extra: str) -> list[str]:
    """`vppo train` under torchrun (2 ranks, TP=2, examples/configs/tiny_cpu.yaml) with `tiny_overrides`."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "vppo_megatron.train",
        "--config",
        "examples/configs/tiny_cpu.yaml",
        *tiny_overrides(tiny_model_dir, data, out, steps),
        *extra,
    ]
