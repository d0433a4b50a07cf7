"""megatron-core on a host without CUDA: the compatibility patches, applied only when CUDA is absent.

megatron-core 0.19 assumes a CUDA device in a handful of places that are not about computation. Each patch below
says which code needs it and why; none changes any numerical result. `apply()` is idempotent and a no-op on a
CUDA host, so the same actor code runs unchanged on GPU.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # bare ints are CUDA ordinals in mcore


class _CudaToCpu(TorchFunctionMode):
    """P4: `device="cuda"`, integer device ordinals and `.cuda()` in schedules, p2p communication, DDP buffers,
    the optimizer and dist_checkpointing become CPU. P6: `tensor.type()` reports `torch.cuda.*Tensor`, because the
    distributed optimizer and grad clipping assert parameters are `torch.cuda.FloatTensor`. P8: pinned host
    memory (`pin_memory=True`, `.pin_memory()`, e.g. the CP slice of rotary embeddings) needs a CUDA driver."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]) and not isinstance(args[1], int):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """P7: DDP's grad sync waits on `torch.cuda.current_stream()`; on CPU every op is already complete."""

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


def _patch_rng_tracker() -> None:
    """P1: the tensor-parallel RNG tracker (dropout, TP weight init) saves and restores CUDA generator states."""
    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    mp_random.CudaRNGStatesTracker.add = add


def _patch_causal_mask() -> None:
    """P3: `get_default_causal_mask` builds its mask with device="cuda" (local attention without explicit mask)."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    @functools.cache
    def causal_mask(seq_len: int) -> torch.Tensor:
        return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask


def _patch_grad_clipping() -> None:
    """P5: `clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'` and uses apex/TE
    multi-tensor kernels; on CPU the same scaling is a foreach multiply."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        coefficient = max_norm / (total_norm + 1.0e-6)  # the same epsilon as megatron-core
        if coefficient < 1.0 and grads:
            torch._foreach_mul_(grads, coefficient)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


# P9: one gloo tag per direction (gloo matches a receive to its peer's sends by (peer, tag) in posting order)
_TO_NEXT_SHAPE, _TO_PREV_SHAPE, _TO_NEXT, _TO_PREV = 1, 2, 3, 4
_pending_sends: list = []  # P9: posted pipeline sends, waited for when the schedule returns


def _post(send_prev, recv_prev, send_next, recv_next, group, prev_rank, next_rank, tags) -> list:
    """P9: posts one call's sends and receives; returns the receives. The sends complete in the background
    (gloo's transport thread) and keep their tensors referenced in `_pending_sends`."""
    import torch.distributed as dist

    to_next, to_prev = tags
    receives = []
    if send_prev is not None:
        _pending_sends.append(dist.isend(send_prev, prev_rank, group, tag=to_prev))
    if recv_prev is not None:
        receives.append(dist.irecv(recv_prev, prev_rank, group, tag=to_next))
    if send_next is not None:
        _pending_sends.append(dist.isend(send_next, next_rank, group, tag=to_next))
    if recv_next is not None:
        receives.append(dist.irecv(recv_next, next_rank, group, tag=to_prev))
    return receives


def _batched_p2p_ops(
    *,
    tensor_send_prev,
    tensor_recv_prev,
    tensor_send_next,
    tensor_recv_next,
    group,
    prev_pipeline_rank,
    next_pipeline_rank,
):
    """P9: megatron-core's `_batched_p2p_ops` (the activations and gradients), tagged, sends not awaited."""
    tensors = (tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next)
    return _post(*tensors, group, prev_pipeline_rank, next_pipeline_rank, (_TO_NEXT, _TO_PREV))


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """P9: `P2PCommunicator._communicate_shapes` (variable sequence lengths), tagged, sends not awaited."""

    def shape(tensor):
        return None if tensor is None else torch.tensor(tensor.size(), dtype=torch.int64)

    recv_prev_shape = torch.empty(3, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.empty(3, dtype=torch.int64) if recv_next else None
    shapes = (shape(tensor_send_prev), recv_prev_shape, shape(tensor_send_next), recv_next_shape)
    for work in _post(*shapes, self.pp_group, self.prev_rank, self.next_rank, (_TO_NEXT_SHAPE, _TO_PREV_SHAPE)):
        work.wait()
    return tuple([0, 0, 0] if s is None else s.tolist() for s in (recv_prev_shape, recv_next_shape))


def _draining(schedule):
    """P9: the schedule, then a wait for its sends. Safe: the peers' matching receives need nothing more of
    this rank (every send of the schedule is posted), so they are posted or will be."""

    @functools.wraps(schedule)
    def run(*args, **kwargs):
        try:
            out = schedule(*args, **kwargs)
        except BaseException:
            _pending_sends.clear()
            raise
        while _pending_sends:
            _pending_sends.pop(0).wait()
        return out

    return run


def _patch_pipeline_p2p() -> None:
    """P9: pipeline point-to-point traffic on gloo needs CUDA's asynchrony and one queue per direction.

    On CUDA, `req.wait()` only orders streams and the host goes on; on gloo a send's wait blocks until the peer
    posts the matching receive. The interleaved schedule relies on the former: at PP2 x VPP2 the last stage
    sends a gradient's shape to a first stage that is still sending its last warm-up activation, each waiting
    for the other (deadlock). And with two stages the previous and the next rank are the same peer, so a call
    that sends both ways posts two messages that the peer's receives (previous first, next first) match
    crosswise. So here sends are only posted (awaited when the schedule returns) and every message carries a tag
    for its direction, as distinct peers separate the directions with more than two stages. Shapes and tensors
    keep megatron-core's order (shapes first, with `variable_seq_lengths`)."""
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    p2p_communication._batched_p2p_ops = _batched_p2p_ops
    p2p_communication.P2PCommunicator._communicate_shapes = _communicate_shapes
    for name in ("forward_backward_pipelining_with_interleaving", "forward_backward_pipelining_without_interleaving"):
        setattr(schedules, name, _draining(getattr(schedules, name)))


def apply() -> bool:
    """Applies every patch once when CUDA is absent; returns whether the patches are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    _patch_rng_tracker()
    # P2: torch.cuda.current_device() is called in RoPE buffers, p2p buffers and DDP buffers.
    torch.cuda.current_device = lambda: torch.device("cpu")
    _patch_causal_mask()
    _CudaToCpu().__enter__()  # stays active for the life of the process
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    _patch_grad_clipping()
    _patch_pipeline_p2p()
    _applied = True
    return True
