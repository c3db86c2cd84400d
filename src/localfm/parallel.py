"""OU blocks trained side by side against the exact OU marginals of the data (``train.parallel_blocks``).

Sequential LFM trains block n on ``p_{n-1}``, the data pushed through the trained blocks ``1..n-1``,
so each block waits for all blocks before it. If every block were exact, ``p_{n-1}`` would be the
OU marginal of the data at time ``t_{n-1} = h_1 + ... + h_{n-1}``, which can be sampled directly::

    x_l = e^{-t_{n-1}} x_0 + sqrt(1 - e^{-2 t_{n-1}}) z_1,    x_r = e^{-h_n} x_l + sqrt(1 - e^{-2 h_n}) z_2

so the OU blocks can be trained independently, at the same time. The price: block n learns the
flow from the exact marginal, but in the chain it acts on the points the learned blocks before it
produced, and the errors of those blocks are no longer corrected. ``train.finetune_steps`` trains
each block on the pushed pool afterwards (in order, as the sequential method does, from the
parallel weights). The free block always needs the pushed pool: it is trained after the push.

Under torchrun the OU blocks are dealt out round robin (block n on rank ``n mod K``); each rank
trains its blocks alone, on the whole batch, then every block is broadcast from the rank that
trained it. Block n draws from its own generator, seeded from ``(seed, n)``: the blocks are the same
for any number of ranks, and a resumed run trains the ones it still needs again, identically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .config import TrainConfig
from .schedules import ou_step
from .training import BlockState, new_block_state, train_block

__all__ = ["marginal_pairs", "train_parallel_blocks", "ParallelBlock"]


def marginal_pairs(
    data: Tensor, t_prev: float, h: float, tc: TrainConfig, generator: torch.Generator, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Pairs of block n from the data: ``x_l`` the OU marginal at ``t_prev``, ``x_r`` an OU step ``h`` on.

    ``tc.pairing`` chooses the source of ``x_r`` as in :func:`~localfm.training.draw_pairs`.
    """

    def marginal() -> Tensor:
        x_0 = data[torch.randint(data.shape[0], (batch_size,), generator=generator, device=data.device)]
        if t_prev == 0:
            return x_0
        return ou_step(x_0, t_prev, torch.randn(x_0.shape, generator=generator, device=data.device, dtype=data.dtype))

    x_l = marginal()
    z = torch.randn(x_l.shape, generator=generator, device=data.device, dtype=data.dtype)
    if tc.pairing == "dependent":
        src = x_l
    elif tc.pairing == "shuffled":
        src = x_l[torch.randperm(batch_size, generator=generator, device=data.device)]
    else:
        src = marginal()
    return x_l, ou_step(src, h, z)


@dataclass
class ParallelBlock:
    """An OU block trained on the exact marginals: its network and what its training recorded."""

    net: nn.Module
    record: dict[str, Any]

    def merged(self, record: dict[str, Any]) -> dict[str, Any]:
        """``fit``'s training record of the block (its fine-tuning) with the parallel training in front.

        ``steps``, ``train_seconds`` and ``losses`` then cover both; ``finetune_steps`` and the
        ``parallel_*`` entries keep them apart.
        """
        p = self.record
        return {
            **record,
            **p,
            "steps": p["parallel_steps"] + record["steps"],
            "finetune_steps": record["steps"],
            "train_seconds": p["parallel_seconds"] + record["train_seconds"],
            "losses": p["parallel_losses"] + [(p["parallel_steps"] + s, v) for s, v in record["losses"]],
        }


def train_parallel_blocks(
    data: Tensor,
    hs: Sequence[float | None],
    tc: TrainConfig,
    *,
    blocks: Sequence[int],
    seed: int,
    make_net: Callable[[int], nn.Module],
    report: Callable[[int], Callable[[BlockState, float, float], None]] | None = None,
) -> dict[int, ParallelBlock]:
    """Train the OU blocks ``blocks`` (indices into ``hs``) on the exact OU marginals of ``data``.

    Args:
        data: the standardised training points ``x_0`` (N, ...).
        hs: every block's step size (``None``: the free block, never trained here).
        tc: training settings; block n trains ``tc.steps_for(len(hs))[n]`` steps on ``tc.batch_size`` pairs.
        blocks: which blocks to train.
        seed: the run's seed (block n's generator is seeded from it and n).
        make_net: ``n -> network`` for block n, on the training device (called on every rank).
        report: ``n -> report`` callback of :func:`~localfm.training.train_block` for block n.

    Returns:
        ``{n: ParallelBlock}`` for every n in ``blocks``, the same on every rank.
    """
    w = distributed.world()
    steps = tc.steps_for(len(hs))
    out: dict[int, ParallelBlock] = {}
    for n in blocks:
        h = hs[n]
        if h is None:
            raise ValueError(f"block {n + 1} is the free block: it needs the pushed pool, not the OU marginals")
        out[n] = ParallelBlock(make_net(n), {})
        if n % w.size != w.rank:
            continue
        state = new_block_state(out[n].net, tc)
        g = torch.Generator(data.device).manual_seed(distributed.derive_seed(f"parallel blocks, seed {seed}", n))
        t_prev = float(sum(hs[:n]))
        train_block(
            state,
            data,
            h,
            tc,
            steps[n],
            generator=g,
            report=report(n) if report is not None else None,
            pairs=lambda b, g, t_prev=t_prev, h=h: marginal_pairs(data, t_prev, h, tc, g, b),
            data_parallel=False,
        )
        out[n].record = {
            "parallel_steps": state.step,
            "parallel_seconds": state.seconds,
            "parallel_losses": state.losses,
            "parallel_rank": w.rank,
        }
    for n in blocks:  # every rank gets every block from the rank that trained it
        distributed.broadcast_module(out[n].net, src=n % w.size)
        out[n].record = distributed.broadcast_object(out[n].record, src=n % w.size)
    return out
