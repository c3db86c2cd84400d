"""Meta-World tasks: scripted-expert demonstrations and batched policy evaluation.

Needs the ``robot`` extra (``pip install localfm[robot]``: metaworld 3.1.1, mujoco 3.3.0).
Environments are Meta-World's goal-observable v3 tasks with state observations (39 numbers:
hand, gripper, objects, the previous frame's, goal). An episode's seed fixes its object and goal
placement: the environment draws them from its own random state, which ``reset(env, seed)`` seeds.
Any task that has a scripted expert in ``metaworld.policies`` works (:func:`task_names`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import Demonstrations, history
from .model import Policy

__all__ = [
    "task_names",
    "canonical_task",
    "make_env",
    "reset",
    "collect",
    "evaluate",
    "EvalResult",
    "wilson_interval",
    "EVAL_SEED",
]

#: First reset seed of evaluation episodes; demonstrations use small seeds (0, 1, ...).
EVAL_SEED = 1_000_000
MAX_STEPS = 500


def _metaworld():
    try:
        import metaworld  # noqa: F401
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as err:
        raise ImportError(
            f"Meta-World is not installed ({err}); install the robot extra: pip install 'localfm[robot]'"
        ) from None
    return ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE, ENV_POLICY_MAP


def task_names() -> list[str]:
    """Meta-World v3 tasks that have a scripted expert, without the ``-v3`` suffix."""
    envs, experts = _metaworld()
    return sorted(k[: -len("-v3")] for k in experts if f"{k}-goal-observable" in envs)


def canonical_task(name: str) -> str:
    """``"push"`` or ``"push-v3"`` -> ``"push"``; an unknown name is a ValueError listing the tasks."""
    base = name[: -len("-v3")] if name.endswith("-v3") else name
    names = task_names()
    if base not in names:
        import difflib

        close = difflib.get_close_matches(base, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known tasks: {', '.join(names)}"
        raise ValueError(f"unknown Meta-World task {name!r}: {hint}")
    return base


def make_env(task: str, *, render: bool = False):
    """A goal-observable environment of ``task`` (with offscreen rendering when ``render``)."""
    envs, _ = _metaworld()
    task = canonical_task(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return envs[f"{task}-v3-goal-observable"](render_mode="rgb_array" if render else None)


def expert(task: str):
    """The scripted expert of ``task`` (``get_action(obs) -> action``)."""
    _, experts = _metaworld()
    return experts[f"{canonical_task(task)}-v3"]()


def reset(env, seed: int) -> np.ndarray:
    """Reset ``env`` to the object and goal placement of ``seed``; returns the first observation."""
    env._freeze_rand_vec = False  # draw a new placement at reset, from the env's seeded random state
    env.seeded_rand_vec = True
    env.seed(int(seed))
    obs, _ = env.reset()
    return obs


def collect(
    task: str, episodes: int, *, seed: int = 0, max_steps: int = MAX_STEPS, max_tries: int | None = None
) -> Demonstrations:
    """``episodes`` successful scripted-expert episodes of ``task`` on seeds ``seed, seed + 1, ...``.

    An episode ends at the expert's first success; seeds on which the expert fails are skipped
    (at most ``max_tries`` seeds are tried, default ``3 * episodes``). ``max_steps`` caps an episode.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    task = canonical_task(task)
    env, pi = make_env(task), expert(task)
    out: dict[str, list] = {"obs": [], "actions": [], "seeds": []}
    s = seed
    limit = seed + (max_tries or 3 * episodes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experts warn about actions they clip
        while len(out["seeds"]) < episodes and s < limit:
            obs, ok, o_list, a_list = reset(env, s), False, [], []
            for _ in range(max_steps):
                a = np.clip(pi.get_action(obs), -1, 1)
                o_list.append(obs)
                a_list.append(a)
                obs, _, _, truncated, info = env.step(a)
                if info["success"]:
                    ok = True
                    break
                if truncated:
                    break
            if ok:
                out["obs"].append(np.asarray(o_list, dtype=np.float32))
                out["actions"].append(np.asarray(a_list, dtype=np.float32))
                out["seeds"].append(s)
            s += 1
    env.close()
    if len(out["seeds"]) < episodes:
        raise RuntimeError(
            f"the scripted expert of {task} succeeded on only {len(out['seeds'])} of {s - seed} seeds "
            f"(needed {episodes}); raise max_tries"
        )
    n = len(out["seeds"])
    return Demonstrations(out["obs"], out["actions"], [task] * n, out["seeds"], [True] * n)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate ``successes / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # Clamped so that rounding never puts p itself outside (e.g. at p = 0 or 1).
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


@dataclass
class EvalResult:
    """Evaluation of a policy on one task.

    ``success_rate`` with its 95% Wilson ``interval``; ``mean_length`` in steps (successful episodes
    end at their first success, failed ones at the step limit); ``ms_per_action``: policy compute
    per executed action, with all live episodes planned in one batch; ``ms_per_plan_single``: one
    plan for one episode (batch of 1), what a single robot waits.
    """

    task: str
    episodes: int
    successes: int
    success_rate: float
    interval: tuple[float, float]
    mean_length: float
    ms_per_action: float
    ms_per_plan_single: float
    seeds: list[int]
    success: list[bool]
    lengths: list[int]
    trajectory: dict = field(default_factory=dict)
    frames: list = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready numbers (no trajectory, no frames)."""
        keys = ("task", "episodes", "successes", "success_rate", "interval", "mean_length")
        out = {k: getattr(self, k) for k in keys}
        out.update(
            ms_per_action=self.ms_per_action,
            ms_per_plan_single=self.ms_per_plan_single,
            seeds=[self.seeds[0], self.seeds[-1]],
            success=self.success,
            lengths=self.lengths,
        )
        return out


_ENVS: dict[str, list] = {}


def _envs(task: str, n: int) -> list:
    """``n`` environments of ``task``, kept between evaluations (building one takes ~0.25 s)."""
    pool = _ENVS.setdefault(task, [])
    while len(pool) < n:
        pool.append(make_env(task))
    return pool[:n]


def evaluate(
    policy: Policy,
    task: str,
    episodes: int = 50,
    *,
    seed: int = EVAL_SEED,
    max_steps: int = MAX_STEPS,
    batch: int = 25,
    generator: torch.Generator | None = None,
    frames: int = 0,
) -> EvalResult:
    """Run ``episodes`` episodes of ``policy`` on ``task`` with reset seeds ``seed, seed + 1, ...``.

    Up to ``batch`` episodes run side by side: environments step one by one, but every plan of
    the live episodes is one batched call of the policy. Seeds that the policy's demonstrations
    used are refused. ``frames > 0`` renders that many frames of the first episode (offscreen;
    skipped with a note in ``trajectory['render_error']`` where no renderer works).
    """
    task = canonical_task(task)
    seeds = list(range(seed, seed + episodes))
    used = set(policy.demo_seeds.get(task, [])) & set(seeds)
    if used:
        raise ValueError(f"evaluation seeds {sorted(used)[:5]} were used by the policy's demonstrations; pick --seed")
    if policy.tasks and task not in policy.tasks:
        raise ValueError(f"this policy was trained on {policy.tasks}, not on {task}")
    generator = generator or torch.Generator().manual_seed(0)
    cfg = policy.config
    success, lengths = [False] * episodes, [max_steps] * episodes
    policy_seconds, actions_done = 0.0, 0
    trajectory: dict = {"hand": [], "object": [], "goal": None}
    for lo in range(0, episodes, batch):
        idx = list(range(lo, min(lo + batch, episodes)))
        envs = _envs(task, len(idx))
        obs = [[reset(env, seeds[i])] for env, i in zip(envs, idx, strict=True)]
        live = list(range(len(idx)))
        plan: dict[int, np.ndarray] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(max_steps):
                if not live:
                    break
                if step % cfg.action_horizon == 0:
                    hist = np.stack(
                        [history(np.asarray(obs[j]), np.array([len(obs[j]) - 1]), cfg.obs_horizon)[0] for j in live]
                    )
                    t0 = time.perf_counter()
                    chunks = policy.act(hist, [task] * len(live), generator=generator)
                    policy_seconds += time.perf_counter() - t0
                    plan = {j: chunks[k] for k, j in enumerate(live)}
                still = []
                for j in live:
                    a = np.clip(plan[j][step % cfg.action_horizon], -1, 1)
                    o, _, _, truncated, info = envs[j].step(a)
                    actions_done += 1
                    obs[j].append(o)
                    if lo == 0 and j == 0:
                        trajectory["hand"].append(o[:3].tolist())
                        trajectory["object"].append(o[4:7].tolist())
                        trajectory["goal"] = o[-3:].tolist()
                    if info["success"]:
                        success[idx[j]], lengths[idx[j]] = True, step + 1
                    elif not truncated:
                        still.append(j)
                live = still
    rendered = _render_rollout(policy, task, seeds[0], frames, max_steps, trajectory) if frames > 0 else []
    single = _time_single(policy, task, generator)
    k = sum(success)
    return EvalResult(
        task,
        episodes,
        k,
        k / episodes,
        wilson_interval(k, episodes),
        float(np.mean(lengths)),
        1000 * policy_seconds / max(actions_done, 1),
        single,
        seeds,
        success,
        lengths,
        trajectory,
        rendered,
    )


def _time_single(policy: Policy, task: str, generator: torch.Generator, repeats: int = 20) -> float:
    """Milliseconds of one plan for one episode (median of ``repeats``)."""
    hist = np.repeat(policy.obs_norm.mean.numpy()[None, None, :], policy.config.obs_horizon, axis=1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.act(hist, [task], generator=generator)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def _rollout(env, policy: Policy, task: str, seed: int, max_steps: int, shoot=None) -> tuple[int, bool, list]:
    """One episode of ``policy`` (plans drawn from a fixed generator, so a rerun repeats it exactly).

    Returns its length, its success and ``env.render()`` at the steps in ``shoot`` (0 = the start).
    """
    cfg, gen = policy.config, torch.Generator().manual_seed(1)
    obs, images, plan, ok = [reset(env, seed)], [], None, False
    if shoot is not None and 0 in shoot:
        images.append(env.render().copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(max_steps):
            if step % cfg.action_horizon == 0:
                hist = history(np.asarray(obs), np.array([len(obs) - 1]), cfg.obs_horizon)
                plan = policy.act(hist, [task], generator=gen)[0]
            o, _, _, truncated, info = env.step(np.clip(plan[step % cfg.action_horizon], -1, 1))
            obs.append(o)
            if shoot is not None and step + 1 in shoot:
                images.append(env.render().copy())
            if info["success"] or truncated:
                ok = bool(info["success"])
                break
    return step + 1, ok, images


def _render_rollout(policy: Policy, task: str, seed: int, frames: int, max_steps: int, trajectory: dict) -> list:
    """``frames`` evenly spaced frames (H, W, 3) of one rollout, rendered offscreen (EGL, else OSMesa).

    The episode runs once unrendered to learn its length, then again rendering only those frames
    (software rendering costs far more than simulating).
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        env = make_env(task, render=True)
        reset(env, seed)
        env.render()
    except Exception as err:  # no OpenGL here: the trajectory plot stands in
        trajectory["render_error"] = f"{type(err).__name__}: {err}"
        return []
    length, ok, _ = _rollout(env, policy, task, seed, max_steps)
    shoot = set(np.linspace(0, length, frames).round().astype(int).tolist())
    _, _, images = _rollout(env, policy, task, seed, max_steps, shoot)
    trajectory["rendered_success"], trajectory["rendered_length"] = ok, length
    try:
        env.close()
    except Exception:  # noqa: BLE001 - the renderer's own cleanup can fail at shutdown; the frames are taken
        pass
    return images
