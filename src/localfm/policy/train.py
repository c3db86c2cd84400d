"""Training a policy: demonstrations -> windows -> normalised (context, action chunk) -> ``fit``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from ..training import Progress, fit
from .data import Demonstrations, make_windows
from .model import Normalizer, Policy, PolicyConfig

__all__ = ["train_policy", "distill_policy", "select_demos", "policy_data"]


def select_demos(demos: Demonstrations, max_demos: int | None) -> Demonstrations:
    """The first ``max_demos`` episodes of each task (all when ``None``), in file order."""
    if max_demos is None:
        return demos
    kept, seen = [], {}
    for i, task in enumerate(demos.tasks):
        if seen.get(task, 0) < max_demos:
            kept.append(i)
            seen[task] = seen.get(task, 0) + 1
    short = {t: n for t, n in seen.items() if n < max_demos}
    if short:
        raise ValueError(f"max_demos is {max_demos} but the demonstrations hold fewer episodes for {short}")
    return demos.select(kept)


def policy_data(policy: Policy, demos: Demonstrations) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow's training points: flattened normalised chunks (M, T_p * A) and contexts (M, c)."""
    cfg = policy.config
    hist, chunks, episode = make_windows(demos, cfg.obs_horizon, cfg.pred_horizon)
    tasks = [demos.tasks[e] for e in episode] if policy.multitask else None
    context = policy.context(hist, tasks)
    x = policy.action_norm(torch.as_tensor(chunks, dtype=torch.float64)).flatten(1)
    return x.float(), context.float()


def train_policy(
    demos: Demonstrations,
    config: PolicyConfig | dict | str,
    *,
    time_budget: float | None = None,
    seed: int | None = None,
    callback: Callable[[Progress], None] | None = None,
) -> Policy:
    """Train a policy on ``demos`` (one task, or several for a task-conditioned policy).

    ``time_budget`` (seconds, default ``config.time_budget``) bounds the flow's training;
    ``seed`` defaults to ``config.seed``. ``config.flow.net.context_dim`` is set here.
    """
    cfg = PolicyConfig.load(config)
    demos = select_demos(demos, cfg.max_demos)
    tasks = sorted(set(demos.tasks))
    context_dim = cfg.obs_horizon * demos.obs_dim + (len(tasks) if len(tasks) > 1 else 0)
    given = cfg.flow.net.context_dim
    if given not in (0, context_dim):
        raise ValueError(
            f"flow.net.context_dim is {given} but this policy's context has {context_dim} inputs "
            f"(obs_horizon {cfg.obs_horizon} x obs_dim {demos.obs_dim}"
            + (f" + {len(tasks)} tasks)" if len(tasks) > 1 else ")")
            + "; leave it at 0 to have it filled in"
        )
    flow_cfg = cfg.flow.replace(net=dataclasses.replace(cfg.flow.net, context_dim=context_dim))
    cfg = cfg.replace(flow=flow_cfg)
    seeds: dict[str, list[int]] = {}
    for task, s in zip(demos.tasks, demos.seeds, strict=True):
        seeds.setdefault(task, []).append(s)
    policy = Policy(
        cfg,
        None,
        Normalizer.fit(np.concatenate(demos.obs)),
        Normalizer.fit(np.concatenate(demos.actions)),
        tasks,
        demos.obs_dim,
        demos.action_dim,
        seeds,
    )
    x, context = policy_data(policy, demos)
    budget = time_budget if time_budget is not None else cfg.time_budget
    t0 = time.perf_counter()
    policy.flow = fit(
        x, flow_cfg, context=context, time_budget=budget, seed=cfg.seed if seed is None else seed, callback=callback
    )
    policy.info = {
        "episodes": len(demos),
        "windows": int(x.shape[0]),
        "train_seconds": time.perf_counter() - t0,
        "parameters": policy.n_parameters(),
        "steps_per_block": [r["steps"] for r in policy.flow.training_log],
    }
    return policy


def distill_policy(policy: Policy, demos: Demonstrations, config=None, *, generator=None, callback=None) -> Policy:
    """A policy whose flow is distilled (:func:`localfm.distill.distill`) into one-step students.

    ``demos`` are the policy's demonstrations: their windows give the teacher's data-side pairs and
    the contexts of its generation-side pairs.
    """
    from ..distill import DistillConfig, distill

    if policy.distilled:
        raise ValueError("this policy is already distilled")
    demos = select_demos(demos, policy.config.max_demos)
    x, context = policy_data(policy, demos)
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(dict(config or {}))
    t0 = time.perf_counter()
    fast = distill(policy.flow, cfg, x_train=x, context=context, generator=generator, callback=callback)
    info = dict(policy.info, distill_seconds=time.perf_counter() - t0, nfe=fast.nfe)
    return Policy(
        policy.config,
        fast,
        policy.obs_norm,
        policy.action_norm,
        policy.tasks,
        policy.obs_dim,
        policy.action_dim,
        policy.demo_seeds,
        info,
    )
