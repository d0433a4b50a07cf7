"""`vppo train --dry-run [--rehearse]`: validate a run for its target cluster from any machine, before anyone
books it. The layout against the model, the memory of each phase of a step per pipeline-stage role (memory.py),
and with --rehearse each rank role built with the actor's own model code on the meta device (actor/rehearsal.py),
which must agree with the estimate exactly.
"""

from __future__ import annotations


def dry_run(cfg, rehearse: bool = False) -> int:
    from vppo_megatron import memory
    from vppo_megatron.config import engine_context_length
    from vppo_megatron.parallel.layout import ParallelLayout

    world = cfg.parallel.world_size
    cfg.validate(world, check_host=False)
    layout = ParallelLayout.from_config(cfg.parallel, world)
    found = memory.resolve_arch(cfg.model.path)
    if found is not None:  # the stage split, heads and vocab against the model itself
        arch = found[0]
        layout.validate(world, arch.layers, arch.heads, arch.kv_heads, arch.vocab, arch.deepstack_layers)
    updates = cfg.trainer.prompts_per_step // cfg.trainer.prompts_per_update
    print(
        f"config OK for {world} ranks: TP={layout.tp} PP={layout.pp} CP={layout.cp} DP={layout.dp} "
        f"VPP={layout.vpp}; {cfg.trainer.prompts_per_step} prompts x {cfg.rollout.num_samples_per_prompt} "
        f"rollouts per step, {updates} optimizer steps per rollout step; {cfg.rollout.num_engines} vLLM "
        f"engines (TP {cfg.rollout.tensor_parallel_size}, {cfg.rollout.placement}), each holding "
        f"{engine_context_length(cfg)} tokens (max_model_len = data.max_prompt_length {cfg.data.max_prompt_length} "
        f"+ rollout.max_response_length {cfg.rollout.max_response_length})"
    )
    if found is not None:  # who feeds which engine, what crosses nodes, what a rank holds during a sync
        model_bytes = found[0].total_params() * 2
        print("\n".join(memory.sync_plan(cfg).describe(memory.sync_bucket_bytes(cfg, found[0]), model_bytes)))
    text, fits = memory.report(cfg)
    print(text)
    if rehearse and fits:
        from vppo_megatron.actor import rehearsal

        rows = rehearsal.rehearse(cfg)
        print(rehearsal.format_rehearsal(cfg, rows), flush=True)
        fits = all(r["matches"] for r in rows)
    return 0 if fits else 2
