"""Gloo ranks that train the tiny model with the distributed optimizer, checkpoint it and resume it in a new
process (tests/actor/test_dist_optim_checkpoint.py): stages 2-6 of tests/actor/step_worker.py on its groups."""

from step_worker import make_groups, run_step


def _trainer(model_dir, out_dir, world_size, overrides):
    import torch.distributed as dist

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.lifecycle import Lifecycle
    from vppo_megatron.parallel.layout import ParallelLayout, initialize
    from vppo_megatron.trainer import Trainer

    cfg = load(
        "examples/configs/tiny_cpu.yaml",
        [
            f"model.path={model_dir}",
            f"trainer.output_dir={out_dir}",
            "trainer.prompts_per_step=4",
            "trainer.prompts_per_update=2",
            "trainer.micro_batch_size=2",
            "algorithm.tas_scope=global",  # layout-independent, so DP1 and DP2 runs compute the same step
            "parallel.tp=1",
            f"parallel.world_size={world_size}",
            *overrides,
        ],
    ).validate(world_size)
    groups = initialize(ParallelLayout.from_config(cfg.parallel, world_size), seed=1)
    lifecycle = Lifecycle(cfg, None, None, dist.barrier)
    actor, _ = lifecycle.start_up(lambda: MegatronActor(cfg, groups, model_dir), lambda actor: None)
    lifecycle.first_sync(dict)  # no engines: the transitions alone
    return Trainer(cfg, groups, actor, None, lifecycle, None)


def _step(trainer, groups):
    """Stages 2-6, then the phases a real step ends with (sync, rollout), so that another step can follow."""
    result = run_step(trainer, groups)
    trainer.lifecycle.enter("sync")
    trainer.lifecycle.enter("rollout")
    return {"metrics": result["metrics"], "params": result["params"]}


def train_and_save(rank, world_size, model_dir, out_dir, distributed):
    """A checkpoint before any optimizer step, step 0, a checkpoint, step 1 (the uninterrupted reference)."""
    from vppo_megatron.parallel.layout import destroy
    from vppo_megatron.resume import save

    overrides = ["checkpoint.keep_last=2", f"optimizer.distributed_optimizer={str(distributed).lower()}"]
    trainer = _trainer(model_dir, out_dir, world_size, overrides)
    groups = make_groups(model_dir)
    before = save(trainer.cfg, trainer.actor, step=-1, version=0, loader_state=None)  # no Adam state yet
    first = _step(trainer, groups)
    after = save(trainer.cfg, trainer.actor, step=0, version=1, loader_state=None)
    second = _step(trainer, groups)
    destroy()
    return {"before": str(before), "after": str(after), "first": first, "second": second}


def resume_and_step(rank, world_size, model_dir, out_dir, ckpt, overrides):
    """A new process: resume from `ckpt` and run the next step (or the error the resume raised)."""
    from vppo_megatron.parallel.layout import destroy
    from vppo_megatron.resume import resume

    trainer = _trainer(model_dir, out_dir, world_size, [f"checkpoint.resume={ckpt}", *overrides])
    try:
        resume(trainer.cfg, trainer.actor)
    except ValueError as exc:
        destroy()
        return {"error": str(exc)}
    step = _step(trainer, make_groups(model_dir))
    destroy()
    return step
