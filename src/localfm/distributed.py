"""Several processes, one run: PyTorch's own distributed engine, with processes started by torchrun.

localfm never starts processes. ``torchrun`` starts one process per GPU (or per share of the CPU
cores) and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the CLI then calls :func:`init`, which
joins the process group (gloo on CPU, NCCL on GPU). Library code asks :func:`world` who it is.
Outside torchrun, or before :func:`init`, a process is rank 0 of 1 and every helper here is the
identity: single-process runs take exactly the code path and the random draws they always did.

What runs where (``K`` = world size):

- training a block: every rank holds the whole pool and a replica of the network, wrapped in
  ``DistributedDataParallel``; each step each rank draws ``batch_size / K`` pairs, and DDP averages
  the gradients, which is the gradient of the loss averaged over the global batch of ``batch_size``;
- the pushforward and evaluation: each rank maps its contiguous share of the points
  (:func:`map_sharded`) and every rank receives the whole result (``all_gather``);
- files (checkpoints, logs, the model, reports): rank 0 writes, the others wait on a barrier.

Random streams. Rank 0 draws from the run's generator (seeded by ``seed``), as a single process
does. Rank ``r > 0`` draws from a generator seeded with SHA-256(rank-0 generator state, ``r``),
derived again by :func:`resync` at fixed points of the run: its start (or resume), the end of every
block and every mid-block checkpoint. Checkpoints hold rank 0's state only, which therefore
determines every rank's stream from that point on. Resuming with the **same** number of ranks
continues bit-identically (same hardware, threads and library versions); with a **different**
number the global batch, the model and rank 0's stream are the same, the other ranks' draws are
not, so the run continues with the same statistics but not the same numbers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "World",
    "world",
    "from_env",
    "init",
    "destroy",
    "session",
    "local_batch_size",
    "wrap",
    "derive_seed",
    "rank_generator",
    "resync",
    "shard_bounds",
    "gather",
    "map_sharded",
    "all_mean",
    "from_main",
    "broadcast_object",
    "broadcast_module",
    "all_gather_object",
    "barrier",
    "main_first",
    "digest",
]


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and reports."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {raw!r}") from None


def from_env() -> World:
    """The world torchrun announces in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (rank 0 of 1 without them)."""
    if not os.environ.get("WORLD_SIZE"):
        return World()  # RANK alone (set by some schedulers) is no torchrun world
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={size} are not a valid rank of a world (0 <= RANK < WORLD_SIZE)")
    return World(rank, size, local)


def world() -> World:
    """The process group this process belongs to; rank 0 of 1 until :func:`init` joined one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))


def init(device: str = "auto") -> World:
    """Join the process group torchrun set up (gloo for ``device: cpu``, NCCL on GPUs); a no-op outside it.

    ``device`` is the config's ``device``: ``cpu`` uses gloo; ``cuda``, ``cuda:N`` and ``auto``
    (with CUDA available) use NCCL, each process on GPU ``LOCAL_RANK`` of its machine.
    """
    env = from_env()
    if env.size == 1 or dist.is_initialized():
        return world()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {env.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "start at most that many processes per machine (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return world()


def destroy() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device: str = "auto") -> Iterator[World]:
    """:func:`init` on entry, :func:`destroy` on exit."""
    w = init(device)
    try:
        yield w
    finally:
        destroy()


def local_batch_size(batch_size: int, w: World | None = None) -> int:
    """This rank's share of the global ``batch_size``; ValueError unless the world size divides it."""
    w = w or world()
    if batch_size % w.size:
        raise ValueError(
            f"train.batch_size ({batch_size}) must be divisible by the number of processes ({w.size}): "
            f"the global batch is split evenly; use e.g. train.batch_size={batch_size // w.size * w.size or w.size}"
        )
    return batch_size // w.size


def wrap(net: nn.Module) -> nn.Module:
    """``net`` in ``DistributedDataParallel`` when there are several ranks, else ``net`` itself."""
    if world().size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device = next(net.parameters()).device
    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


# --- random streams ----------------------------------------------------------------------------


def derive_seed(key: bytes | str | Tensor, index: int) -> int:
    """A 63-bit seed from SHA-256 of ``key`` (bytes, text or a generator state) and ``index``."""
    if isinstance(key, Tensor):
        key = key.cpu().contiguous().numpy().tobytes()
    elif isinstance(key, str):
        key = key.encode()
    return int.from_bytes(hashlib.sha256(key + b"|" + str(index).encode()).digest()[:8], "little") >> 1


def rank_generator(generator: torch.Generator) -> torch.Generator:
    """This rank's own generator, derived from ``generator``'s state (``generator`` itself on rank 0)."""
    w = world()
    if w.rank == 0:
        return generator
    return torch.Generator(generator.device).manual_seed(derive_seed(generator.get_state(), w.rank))


def resync(generator: torch.Generator) -> None:
    """Rank 0 keeps its state; rank r > 0 is reseeded from SHA-256(rank 0's state, r), in place."""
    w = world()
    if w.size == 1:
        return
    state = broadcast_object(generator.get_state() if w.is_main else None)
    if not w.is_main:
        generator.manual_seed(derive_seed(state, w.rank))


# --- sharded maps and collectives --------------------------------------------------------------


def shard_bounds(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most 1)."""
    w = world()
    rank = w.rank if rank is None else rank
    size = w.size if size is None else size
    return n * rank // size, n * (rank + 1) // size


def _comm_device(t: Tensor) -> torch.device:
    """Where a collective needs ``t``: NCCL works on the current GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(local: Tensor, n: int) -> Tensor:
    """Every rank's share (rows ``shard_bounds(n, r)``), concatenated in rank order, on every rank."""
    w = world()
    if w.size == 1:
        return local
    a, b = shard_bounds(n)
    if local.shape[0] != b - a:
        raise ValueError(f"rank {w.rank} holds {local.shape[0]} rows, its share of {n} is {b - a}")
    m = -(-n // w.size)
    dev = _comm_device(local)
    padded = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: b - a] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    sizes = [stop - start for start, stop in (shard_bounds(n, r) for r in range(w.size))]
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(local.device)


def map_sharded(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` over the rows of ``x``, each rank mapping its share, the result gathered on every rank.

    ``fn`` must map ``k`` rows to ``k`` rows. With one process this is ``fn(x)``.
    """
    w = world()
    if w.size == 1:
        return fn(x)
    a, b = shard_bounds(x.shape[0])
    # A rank with nothing to do (fewer rows than ranks) still learns the result's shape and dtype.
    local = fn(x[a:b]) if b > a else fn(x[:1])[:0]
    return gather(local, x.shape[0])


def all_mean(t: Tensor) -> Tensor:
    """The mean of ``t`` over the ranks (a new tensor; ``t`` itself with one process)."""
    w = world()
    if w.size == 1:
        return t
    dev = _comm_device(t)
    out = t.detach().to(dev, copy=True)
    dist.all_reduce(out)
    return (out / w.size).to(t.device)


def from_main(values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every rank (e.g. its clock, so that all ranks stop at the same step)."""
    if world().size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(torch.empty(0)))
    dist.broadcast(t, 0)
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def broadcast_module(module: nn.Module, src: int) -> None:
    """Overwrite ``module``'s parameters and buffers with rank ``src``'s, in place."""
    if world().size == 1:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dev = _comm_device(t)
            buf = t.to(dev, copy=True)
            dist.broadcast(buf, src)
            t.copy_(buf)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    w = world()
    if w.size == 1:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank gets here."""
    if world().size > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a dataset cache), then the other ranks."""
    main = world().is_main
    if not main:
        barrier()
    yield
    if main:
        barrier()


def digest(module: nn.Module) -> str:
    """SHA-256 of ``module``'s parameters and buffers (names, dtypes, shapes, bytes), for replica checks."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
