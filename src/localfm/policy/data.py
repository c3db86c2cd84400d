"""Demonstrations (episodes of observations and actions) and the policy's training windows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Demonstrations", "make_windows", "history"]


@dataclass
class Demonstrations:
    """Expert episodes: ``obs[i]`` (T_i, obs_dim) and ``actions[i]`` (T_i, action_dim).

    ``obs[i][t]`` is what the expert saw when it chose ``actions[i][t]``. ``tasks[i]`` names the
    task and ``seeds[i]`` the reset seed (object and goal placement) of episode i;
    ``success[i]`` whether the expert succeeded.
    """

    obs: list[np.ndarray]
    actions: list[np.ndarray]
    tasks: list[str]
    seeds: list[int]
    success: list[bool]

    def __post_init__(self) -> None:
        n = len(self.obs)
        if not n:
            raise ValueError("demonstrations hold no episodes")
        if not (len(self.actions) == len(self.tasks) == len(self.seeds) == len(self.success) == n):
            raise ValueError("demonstrations: obs, actions, tasks, seeds and success must have one entry per episode")
        for i, (o, a) in enumerate(zip(self.obs, self.actions, strict=True)):
            if o.ndim != 2 or a.ndim != 2 or o.shape[0] != a.shape[0] or o.shape[0] == 0:
                raise ValueError(
                    f"episode {i}: obs {o.shape} and actions {a.shape} must be (T, obs_dim) and (T, action_dim), T >= 1"
                )
            if not (np.isfinite(o).all() and np.isfinite(a).all()):
                raise ValueError(f"episode {i} holds non-finite observations or actions")

    def __len__(self) -> int:
        return len(self.obs)

    @property
    def obs_dim(self) -> int:
        return int(self.obs[0].shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions[0].shape[1])

    def select(self, index) -> Demonstrations:
        """The episodes at ``index`` (a list of positions)."""
        return Demonstrations(
            [self.obs[i] for i in index],
            [self.actions[i] for i in index],
            [self.tasks[i] for i in index],
            [self.seeds[i] for i in index],
            [self.success[i] for i in index],
        )

    def __add__(self, other: Demonstrations) -> Demonstrations:
        return Demonstrations(
            self.obs + other.obs,
            self.actions + other.actions,
            self.tasks + other.tasks,
            self.seeds + other.seeds,
            self.success + other.success,
        )

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (plain arrays: loading never unpickles), whole or not at all."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(o) for o in self.obs], dtype=np.int64)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                obs=np.concatenate(self.obs).astype(np.float32),
                actions=np.concatenate(self.actions).astype(np.float32),
                lengths=lengths,
                tasks=np.array(self.tasks, dtype=str),
                seeds=np.array(self.seeds, dtype=np.int64),
                success=np.array(self.success, dtype=bool),
            )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Demonstrations:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"demonstrations file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as f:
                obs, actions, lengths = f["obs"], f["actions"], f["lengths"]
                tasks, seeds, success = f["tasks"], f["seeds"], f["success"]
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a demonstrations file written by localfm policy collect: {err}") from None
        if lengths.sum() != len(obs) or len(obs) != len(actions):
            raise ValueError(f"{path}: episode lengths do not add up to the number of steps")
        cuts = np.cumsum(lengths)[:-1]
        return cls(
            list(np.split(obs, cuts)),
            list(np.split(actions, cuts)),
            [str(t) for t in tasks],
            [int(s) for s in seeds],
            [bool(s) for s in success],
        )


def history(obs: np.ndarray, t: np.ndarray, T_o: int) -> np.ndarray:
    """Observations ``t - T_o + 1 .. t`` of one episode ``obs`` (T, d) for each index in ``t``.

    Steps before the start repeat the first observation (as at the start of a rollout).
    Returns (len(t), T_o, d).
    """
    idx = np.clip(t[:, None] + np.arange(-T_o + 1, 1)[None, :], 0, None)
    return obs[idx]


def make_windows(demos: Demonstrations, T_o: int, T_p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training windows: for every step ``t`` of every episode, the history and the action chunk.

    Returns ``obs_hist`` (M, T_o, obs_dim), ``chunks`` (M, T_p, action_dim) (actions ``t .. t+T_p-1``,
    the last action repeated past the end of the episode) and ``episode`` (M,) the episode of each.
    """
    hs, cs, ep = [], [], []
    for i, (o, a) in enumerate(zip(demos.obs, demos.actions, strict=True)):
        t = np.arange(len(o))
        hs.append(history(o, t, T_o))
        idx = np.clip(t[:, None] + np.arange(T_p)[None, :], None, len(a) - 1)
        cs.append(a[idx])
        ep.append(np.full(len(o), i))
    return np.concatenate(hs), np.concatenate(cs), np.concatenate(ep)
