"""Stages 1-2 on trainer rank 0: rollouts, rewards and dynamic sampling until the step's batch is full.

DAPO's dynamic sampling keeps a prompt group only if its mean accuracy is strictly inside
(accuracy_low, accuracy_high): all-correct and all-wrong groups have zero advantage. New prompts are drawn and
sampled until `trainer.prompts_per_step` groups are kept or `algorithm.max_sampling_tries` rounds have run; the
step then trains on what it has (counted in `rollout/kept_groups`). With `algorithm.dynamic_sampling` false one
round runs and every group is kept. Responses cut by rollout.max_response_length are kept (their reward grades
the text as it is) and counted in `rollout/truncated_fraction`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vppo_megatron.types import PromptSample, RolloutResult


@dataclass
class Group:
    """One prompt and its n scored rollouts."""

    prompt: PromptSample
    rollouts: list[RolloutResult]
    rewards: list[float]
    accuracies: list[float]


def score(groups_results, prompts: list[PromptSample], reward_fn) -> list[Group]:
    """Each rollout's reward, checked (a dict with finite float "overall" and "accuracy"; a bool, a NaN or another
    type is an error naming the function)."""
    from vppo_megatron.reward.loading import score_batch

    out = []
    for prompt, results in zip(prompts, groups_results):
        scores = score_batch(reward_fn, [r.text for r in results], [prompt.answer] * len(results))
        out.append(Group(prompt, results, [s["overall"] for s in scores], [s["accuracy"] for s in scores]))
    return out


# Fleet metrics that add up over the rounds of one step; every other fleet metric keeps its last round's value.
SUMMED_METRICS = ("rollout/num_responses", "rollout/response_tokens", "rollout/generate_s")
# The fleet's engine time per call; renamed because the trainer's `time/rollout_s` is the whole stage's wall time.
FLEET_TIME_KEY = "time/rollout_s"
LENGTH_LIMIT = "length"  # vLLM's finish_reason for a response cut at max_tokens (or at the engine's max_model_len)
MIN_SECONDS = 1e-9  # guards tokens / seconds when a (replayed) fleet reports no time


def _accumulate(totals: dict[str, float], round_metrics: dict[str, float]) -> None:
    for name, value in round_metrics.items():
        name = "rollout/generate_s" if name == FLEET_TIME_KEY else name
        totals[name] = totals.get(name, 0.0) + value if name in SUMMED_METRICS else value


def collect(fleet, loader, cfg, step: int, reward_fn) -> tuple[list[Group], dict[str, float]]:
    """Rounds of (next prompts, n rollouts each, rewards) until the batch is full; the rollout metrics cover every
    round: responses, tokens and engine seconds summed, tokens_per_s = summed tokens / summed engine seconds."""
    r, a = cfg.rollout, cfg.algorithm
    kept: list[Group] = []
    seen, tries, totals = 0, 0, {}
    accuracy_sum, responses, truncated, all_wrong, all_right = 0.0, 0, 0, 0, 0
    while len(kept) < cfg.trainer.prompts_per_step and tries < a.max_sampling_tries:
        prompts = loader.next_batch()
        seed = cfg.trainer.seed * 1_000_003 + step * 1_009 + tries * 101  # distinct per (seed, step, round)
        results, round_metrics = fleet.generate(
            prompts,
            n=r.num_samples_per_prompt,
            temperature=r.temperature,
            top_p=r.top_p,
            max_tokens=r.max_response_length,
            seed=seed,
        )
        _accumulate(totals, round_metrics)
        for group in score(results, prompts, reward_fn):
            mean = sum(group.accuracies) / len(group.accuracies)
            accuracy_sum += sum(group.accuracies)
            responses += len(group.accuracies)
            truncated += sum(r.finish_reason == LENGTH_LIMIT for r in group.rollouts)
            if not a.dynamic_sampling or a.accuracy_low < mean < a.accuracy_high:
                kept.append(group)
            else:
                all_wrong += mean <= a.accuracy_low
                all_right += mean >= a.accuracy_high
        seen += len(prompts)
        tries += 1
        if not a.dynamic_sampling:
            break
    kept = kept[: cfg.trainer.prompts_per_step]
    metrics = dict(
        totals,
        **{
            "rollout/tokens_per_s": totals.get("rollout/response_tokens", 0.0)
            / max(totals.get("rollout/generate_s", 0.0), MIN_SECONDS),
            "reward/accuracy": accuracy_sum / max(responses, 1),
            "rollout/truncated_fraction": truncated / max(responses, 1),
            "rollout/kept_groups": float(len(kept)),
            "rollout/filtered_wrong_groups": float(all_wrong),  # mean accuracy <= algorithm.accuracy_low
            "rollout/filtered_right_groups": float(all_right),  # mean accuracy >= algorithm.accuracy_high
            "rollout/sampled_prompts": float(seen),
            "rollout/sampling_rounds": float(tries),
        },
    )
    return kept, metrics


def validate(fleet, samples: list[PromptSample], cfg, reward_fn) -> dict[str, float]:
    """avg@k accuracy on validation prompts (rollout.val_num_samples samples at the validation temperature)."""
    r = cfg.rollout
    results, _ = fleet.generate(
        samples,
        n=r.val_num_samples,
        temperature=r.val_temperature,
        top_p=r.val_top_p,
        max_tokens=r.max_response_length,
        seed=cfg.trainer.seed,
    )
    groups = score(results, samples, reward_fn)
    accuracies = [acc for g in groups for acc in g.accuracies]
    return {"val/accuracy": sum(accuracies) / max(len(accuracies), 1), "val/prompts": float(len(samples))}
