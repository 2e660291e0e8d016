"""Data-parallel training under PyTorch's own launcher (``torchrun``): nothing here schedules or
rendezvouses, torchrun (or Kubeflow Trainer's ``torch-distributed`` runtime, which starts torchrun
in every node with ``PET_*`` variables) does.

What this module adds to ``torch.distributed``:

- ``start`` / ``stop``: one process group per training (gloo on the CPU, NCCL on CUDA) when the
  process was started by torchrun (``WORLD_SIZE`` > 1), with a collective timeout, so a rank that
  dies makes the others fail within a bounded time instead of hanging.
- The global batch. N processes at batch B compute what one process at batch N x B computes:
  ``GlobalBatchSampler`` hands rank r its share of the single-process batches (the same shuffled
  order: it depends only on seed and epoch), the losses reduce over the global batch
  (``sum_across``, ``gather_flat``), and batch-norm statistics are synchronised (``SyncBatchNorm2d``
  on the CPU, where PyTorch's own ``SyncBatchNorm`` refuses to run; PyTorch's on CUDA).
- ``lead``: rank 0 does something (read a checkpoint, decide to stop) and every rank gets its
  result, or its error.

With one process (no torchrun) every function here is a cheap pass-through.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from segcore.devices import at_least_fp32
from segcore.errors import SegcoreError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # a collective that waits longer than this fails (a rank died)

_math_group = None  # the group the loss and batch-norm collectives use (apart from DDP's buckets)


@dataclass(frozen=True)
class World:
    """This process's place in the training: ``rank`` of ``size``, ``local_rank`` in its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world() -> World:
    """The world torchrun describes in this process's environment (one process without it)."""

    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value else default
        except ValueError:
            raise SegcoreError(f"environment variable {name}={value!r} is not an integer") from None

    size = number("WORLD_SIZE", 1)
    return World(number("RANK", 0), size, number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", size))


def world() -> World:
    """The world of the running process group (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    env = env_world()
    return World(dist.get_rank(), dist.get_world_size(), env.local_rank, env.local_size)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def device_for(device: torch.device, w: World) -> torch.device:
    """The device of this rank: on CUDA each process of a node takes ``cuda:LOCAL_RANK``."""
    if device.type != "cuda" or not w.distributed:
        return device
    if device.index is not None and w.local_size > 1 and device.index != w.local_rank:
        raise SegcoreError(
            f"--device {device} with {w.local_size} processes per node: give --device cuda (or auto); "
            "each process takes cuda:LOCAL_RANK"
        )
    count = torch.cuda.device_count()
    if w.local_rank >= count:
        raise SegcoreError(f"local rank {w.local_rank} has no GPU: only {count} CUDA device(s) visible")
    return torch.device("cuda", w.local_rank)


def start(device: torch.device, timeout_s: float | None = None) -> World:
    """Join the process group torchrun set up the environment for (gloo on CPU, NCCL on CUDA);
    a no-op for one process or when a group is running already. Returns this process's world."""
    global _math_group
    w = env_world()
    if not w.distributed or dist.is_initialized():
        return world() if dist.is_initialized() else w
    if "MASTER_ADDR" not in os.environ:
        raise SegcoreError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start distributed training with torchrun")
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timeout)
    _math_group = dist.new_group(backend=backend, timeout=timeout)
    log.info("rank %d of %d (%s, local rank %d)", w.rank, w.size, backend, w.local_rank)
    return w


@contextlib.contextmanager
def session(device: torch.device, timeout_s: float | None = None) -> Iterator[World]:
    """``start`` for the length of a block: a group this block started is left at its end."""
    started = env_world().distributed and not dist.is_initialized()
    w = start(device, timeout_s)
    try:
        yield w
    finally:
        if started:
            stop()


def stop() -> None:
    """Leave the process group (if this process is in one)."""
    global _math_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _math_group = None


def barrier() -> None:
    if distributed():
        dist.barrier()


def broadcast(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects; tensors travel on the CPU)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _LeaderFailed:
    def __init__(self, message: str):
        self.message = message


def lead(fn: Callable[[], object] | None, public: Callable[[object], object] | None = None):
    """Run ``fn`` on rank 0 only and return its result on every rank (``public(result)`` on the
    others, when rank 0's result holds more than they need or can receive). When ``fn`` raises,
    rank 0 re-raises the error and every other rank raises a SegcoreError with its message, so all
    stop. Ranks other than 0 may pass None (they never call ``fn``)."""
    if not distributed():
        return fn()
    result, shared, error = None, None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
            shared = public(result) if public else result
        except BaseException as exc:  # noqa: BLE001 - handed to the other ranks, then re-raised
            error = exc
            shared = _LeaderFailed(str(exc) or type(exc).__name__)
    shared = broadcast(shared)
    if error is not None:
        raise error
    if dist.get_rank() == 0:
        return result
    if isinstance(shared, _LeaderFailed):
        raise SegcoreError(f"rank 0 failed: {shared.message}")
    return shared


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (no gradient); returns it."""
    if distributed():
        dist.all_reduce(tensor, group=_math_group)
    return tensor


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, differentiable: the backward pass sums the gradients
    too. A loss built from such sums has the global batch's value on every rank, and DDP's
    gradient average then gives exactly the global batch's gradient."""
    if not distributed():
        return tensor
    from torch.distributed import _functional_collectives as collectives  # autograd-aware (torch >= 2.5)

    return collectives.wait_tensor(collectives.all_reduce(tensor, "sum", _math_group))


def gather_flat(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The 1-D tensors of all ranks, concatenated in rank order (no gradient), and where this
    rank's part starts. Ranks may hold different lengths."""
    if not distributed():
        return tensor, 0
    size, rank = dist.get_world_size(), dist.get_rank()
    lengths = torch.zeros(size, dtype=torch.int64, device=tensor.device)
    lengths[rank] = tensor.numel()
    dist.all_reduce(lengths, group=_math_group)
    longest = int(lengths.max())
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor.detach().reshape(-1)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=_math_group)
    counts = lengths.tolist()
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]), sum(counts[:rank])


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any device (gloo
    on the CPU; PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors). Each rank computes its mean
    and (biased) variance, the ranks exchange them with their pixel counts, and the global ones
    are combined exactly (Chan et al.'s parallel variance), so N ranks at batch B normalise as one
    process at batch N x B. Same parameters and buffers as BatchNorm2d: state dicts are interchangeable.
    Evaluation, and training outside a process group, are plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        size, rank = dist.get_world_size(), dist.get_rank()
        channels = x.shape[1]
        xf = at_least_fp32(x)
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        count = xf.numel() // channels
        rows = xf.new_zeros(size, 2 * channels + 1)
        rows[rank] = torch.cat([mean, var, xf.new_tensor([float(count)])])
        rows = sum_across(rows)  # every rank's statistics, differentiable
        counts = rows[:, -1:]
        total = counts.sum()
        means, variances = rows[:, :channels], rows[:, channels : 2 * channels]
        g_mean = (counts * means).sum(0) / total
        g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = g_var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(g_mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(g_var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -g_mean * scale
        if self.affine:
            shift = shift + self.bias
        out = xf * scale[None, :, None, None] + shift[None, :, None, None]
        return out.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm2d synchronised across the ranks: PyTorch's SyncBatchNorm on
    CUDA, ``SyncBatchNorm2d`` elsewhere. Parameters and buffers are kept (same objects)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if type(module) is nn.BatchNorm2d:
            synced = SyncBatchNorm2d(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            synced.weight, synced.bias = module.weight, module.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(synced, name, getattr(module, name))
            synced.train(module.training)
            return synced
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    return convert(model)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank: the single-process batches (a permutation from a generator
    seeded with ``seed``, cut into batches of ``batch_size x world``, the last incomplete one
    dropped), each split into ``world`` consecutive parts, of which rank r takes part r. With one
    rank these are exactly the batches of ``DataLoader(shuffle=True, drop_last=True, generator=G)``
    with G seeded with ``seed``."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.length // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        # The draw a DataLoader makes from its generator (its workers' base seed) before shuffling:
        # one process keeps exactly the batches of the loader trainings used before this sampler.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(self.length, generator=generator).tolist()
        step = self.batch_size * self.world_size
        for start in range(0, len(self) * step, step):
            mine = start + self.rank * self.batch_size
            yield order[mine : mine + self.batch_size]
