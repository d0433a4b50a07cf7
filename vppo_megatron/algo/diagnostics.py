"""Perception diagnostics: where VPPO's spotlight lands, per step.

- Histograms (summed over data-parallel ranks): token dependency s_t over every valid response token, trajectory
  dependency S_bar per response, and TAS's alpha per response. Dependency spans decades, so its bins are
  log-spaced (4 per decade, 1e-6 .. 10, with under- and overflow bins); alpha's are linear.
- Scalars (metrics, `vppo/`): how concentrated dependency is (the share of the step's total carried by its 10% most
  dependent tokens: 0.1 if every token depended on the image alike, near 1 if a few carry it all; the median over
  the mean), the fraction of tokens that are answer tokens (inside the response's last \\boxed{...}), the fraction
  of TGF's selected tokens that are answer tokens and of answer tokens that TGF selects, and alpha's mean and std.
  Concentration statistics are per rank, averaged over data-parallel ranks (each rank holds a random share of
  the prompts).

Legend: B rollouts on this rank, T response positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEPENDENCY_EDGES = [10.0 ** (e / 4) for e in range(-24, 5)]  # 1e-6 .. 10, 4 bins per decade
ALPHA_EDGES = [0.5 + 0.025 * i for i in range(41)]  # 0.5 .. 1.5
TOP_SHARE = 0.1
BOXED = "\\boxed{"


def answer_span(tokenizer, response_ids: list[int]) -> tuple[int, int] | None:
    """Token positions [a, b) of the content of the response's last \\boxed{...} (the graded answer); None when
    there is none or it is not closed."""
    pieces = tokenizer.batch_decode([[t] for t in response_ids])
    text = "".join(pieces)
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, end = 1, None
    for i in range(start + len(BOXED), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            end = i
            break
    if end is None:
        return None
    first, last, offset = None, None, 0
    for t, piece in enumerate(pieces):  # tokens overlapping the characters [start + len(BOXED), end)
        if offset + len(piece) > start + len(BOXED) and offset < end:
            first = t if first is None else first
            last = t + 1
        offset += len(piece)
    return (first, last) if first is not None else None


def answer_mask(spans: list[tuple[int, int] | None], shape: torch.Size) -> torch.Tensor:
    """[B, T] 1.0 on each rollout's answer tokens."""
    mask = torch.zeros(shape)
    for b, span in enumerate(spans):
        if span is not None:
            mask[b, span[0] : min(span[1], shape[1])] = 1.0
    return mask


def histogram(values: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """Counts per bin: [underflow, (edges[i], edges[i+1]] ..., overflow], float64 (summed across ranks)."""
    index = torch.bucketize(values.double(), torch.tensor(edges, dtype=torch.float64))
    return torch.bincount(index, minlength=len(edges) + 1).double()


def _concentration(dependency: torch.Tensor) -> tuple[float, float]:
    """(share of the total carried by the top TOP_SHARE of the tokens, median / mean) of one rank's values."""
    if dependency.numel() == 0 or dependency.sum() <= 0:
        return 0.0, 0.0
    ordered = dependency.double().sort(descending=True).values
    top = max(1, round(TOP_SHARE * len(ordered)))
    return (ordered[:top].sum() / ordered.sum()).item(), (ordered.median() / ordered.mean()).item()


def perception_diagnostics(
    dependency_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    gradient_mask_BT: torch.Tensor,
    alpha_B: torch.Tensor,
    answer_BT: torch.Tensor,
    dp_group=None,
) -> tuple[dict[str, float], dict[str, dict]]:
    """(scalar metrics, histograms {name: {"edges", "counts", "sum", "sum_squares", "min", "max"}}) of one step
    over every data-parallel rank; a collective on `dp_group` when it is given (every rank calls it)."""
    from vppo_megatron.algo.perception import trajectory_dependency

    valid = response_mask_BT > 0
    rows = valid.any(-1)
    token = dependency_BT[valid].double()
    trajectory = trajectory_dependency(dependency_BT, response_mask_BT)[rows].double()
    alpha = alpha_B[rows].double()
    answer = answer_BT * response_mask_BT
    weight = gradient_mask_BT * response_mask_BT
    top, median_ratio = _concentration(token)
    sums = torch.tensor(
        [
            float(valid.sum()),
            answer.sum().item(),
            weight.sum().item(),
            (weight * answer).sum().item(),
            alpha.sum().item(),
            (alpha**2).sum().item(),
            float(len(alpha)),
            top,
            median_ratio,
            1.0,
        ],
        dtype=torch.float64,
    )
    series = {"token_dependency": token, "trajectory_dependency": trajectory, "tas_alpha": alpha}
    edges = {"token_dependency": DEPENDENCY_EDGES, "trajectory_dependency": DEPENDENCY_EDGES, "tas_alpha": ALPHA_EDGES}
    counts = {name: histogram(v, edges[name]) for name, v in series.items()}
    moments = torch.tensor([[v.sum().item(), (v**2).sum().item()] for v in series.values()], dtype=torch.float64)
    lows = torch.tensor([v.min().item() if v.numel() else float("inf") for v in series.values()], dtype=torch.float64)
    highs = torch.tensor([v.max().item() if v.numel() else -float("inf") for v in series.values()])
    highs = highs.double()
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        for tensor in (sums, moments, *counts.values()):
            dist.all_reduce(tensor, group=dp_group)
        dist.all_reduce(lows, op=dist.ReduceOp.MIN, group=dp_group)
        dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=dp_group)
    tokens, answers, selected, selected_answers, a_sum, a_sq, a_n, top, median_ratio, ranks = sums.tolist()
    alpha_mean = a_sum / max(a_n, 1)
    metrics = {
        "vppo/dependency_top10_share": top / ranks,
        "vppo/dependency_median_over_mean": median_ratio / ranks,
        "vppo/answer_token_fraction": answers / max(tokens, 1),
        "vppo/selected_answer_fraction": selected_answers / max(selected, 1e-12),
        "vppo/answer_tokens_selected": selected_answers / max(answers, 1e-12) if answers else 0.0,
        "vppo/tas_alpha_mean": alpha_mean,
        "vppo/tas_alpha_std": max(a_sq / max(a_n, 1) - alpha_mean**2, 0.0) ** 0.5,
    }
    histograms = {
        name: {
            "edges": edges[name],
            "counts": counts[name].tolist(),
            "sum": moments[i, 0].item(),
            "sum_squares": moments[i, 1].item(),
            "min": lows[i].item(),
            "max": highs[i].item(),
        }
        for i, name in enumerate(series)
    }
    return metrics, histograms
