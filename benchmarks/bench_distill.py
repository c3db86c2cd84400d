"""Distillation (issue 6): sample quality against network evaluations, and sampling speed.

Two teachers are trained by ``localfm.fit`` on the same data with the same wall-clock budget
(pushforward included) and the same total parameter count: the LFM chain and the global FM baseline
(the same code with one block, its network widened). ``localfm.distill`` then makes students: LFM
with k = 1, 2 steps per block, LFM with merged blocks, and FM with k = 1, 2, 4, 8 steps. Every
student trains the same number of optimiser steps (an LFM student is one block's network, a share
of the FM network's size) on its teacher's pairs (the pushed training data and dopri5 decodes of
fresh noise, made once per teacher).

Quality: energy distance and Gaussian MMD (the U-statistics of ``localfm.metrics``; computed here
with the test set's own terms cached, checked equal to ``localfm.metrics`` on the first model)
between ``n`` samples and ``n`` test points, mean and standard deviation over seeds. Speed:
samples/s of the teacher (dopri5) and the students at the same batch, timed alternately in one run.

    python benchmarks/bench_distill.py                 # tree density (the demo's LFM), ~30 minutes
    python benchmarks/bench_distill.py --data power    # POWER (d = 6), configs/power_cpu.yaml
    python benchmarks/bench_distill.py --quick --out DIR  # CI smoke run, under a minute
    python benchmarks/bench_distill.py --cache DIR     # keep trained teachers in DIR between runs
    python benchmarks/bench_distill.py --teachers-only # the two teachers alone (minutes; own results file)
    python benchmarks/bench_distill.py --precise 80000 # the ED figures at 80k samples per seed (own file)
    python benchmarks/bench_distill.py --teacher-seed 1  # teachers trained with seed 1 (files end _t1)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _common first: it sets the OpenMP wait policy before torch loads.
import _common  # noqa: E402, I001
from _common import ROOT, interleaved, median, metadata, write_results  # noqa: E402
from contenders import BIG, fm_twin, fm_width  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import localfm  # noqa: E402
from localfm import datasets, metrics  # noqa: E402
from localfm.config import to_dict  # noqa: E402
from localfm.distill import DistillConfig, distill, teacher_pairs  # noqa: E402
from localfm.ode import SolverConfig  # noqa: E402

# ---------------------------------------------------------------------------------------------
# settings


TEACHER_SOLVER = SolverConfig("dopri5", rtol=1e-5, atol=1e-5)  # the issue's teacher; also the pairs' decodes


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: data, teachers, distillation budget, evaluation size.

    The teachers: ``lfm`` (a flow config) and its global-FM twin (one block, the MLP width that
    gives the same total parameter count), each trained by ``localfm.fit`` for ``budget`` seconds of
    wall-clock, pushforward included. Every student trains ``student_steps`` optimiser steps: the
    LFM chain has one student per block, each with a block's share of the parameters, so its
    students together cost about what one FM student does.
    """

    data: str
    n_train: int | None  # training points given to fit (None: the whole train split)
    lfm: dict
    budget: float
    student_steps: int
    distill_batch: int
    distill_lr: float
    data_pairs: int
    generation_pairs: int
    n_eval: int
    seeds: tuple[int, ...]
    rk4_steps: tuple[int, ...]
    lfm_students: tuple[tuple, ...]  # (k, group size), or (k, group size, "wide"): fresh, FM's width
    fm_students: tuple[int, ...]
    speed_rounds: int

    def flow_config(self, fm: bool, dim: int) -> dict:
        cfg = copy.deepcopy(self.lfm)
        cfg["data"] = self.data
        shares = cfg["train"].get("steps")  # a list: the blocks' shares of the budget, kept
        cfg["train"]["steps"] = [BIG // 10_000 * n for n in shares] if isinstance(shares, list) else BIG
        return fm_twin(cfg, dim) if fm else cfg


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


SETTINGS = {
    # The demo's LFM (src/localfm/demo.yaml: 9 blocks of 96x3 MLPs with Fourier features) and its
    # FM twin, 120 s each, as `localfm demo` trains it.
    "tree": lambda: Setting(
        data="tree",
        n_train=None,
        lfm=_config(ROOT / "src" / "localfm" / "demo.yaml"),
        budget=120.0,
        student_steps=3000,
        distill_batch=1024,
        distill_lr=1e-3,
        data_pairs=25_000,
        generation_pairs=30_000,
        n_eval=10_000,
        seeds=(0, 1, 2, 3, 4),
        rk4_steps=(1, 2, 4, 8),
        lfm_students=((1, 1), (2, 1), (1, 3), (1, 9), (1, 9, "wide")),
        fm_students=(1, 2, 4, 8),
        speed_rounds=3,
    ),
    # configs/power_cpu.yaml (4 blocks of 128x3 MLPs) and its FM twin, 5 minutes each.
    "power": lambda: Setting(
        data="power",
        n_train=100_000,
        lfm=_config(ROOT / "configs" / "power_cpu.yaml"),
        budget=300.0,
        student_steps=2000,
        distill_batch=1024,
        distill_lr=1e-3,
        data_pairs=20_000,
        generation_pairs=30_000,
        n_eval=10_000,
        seeds=(0, 1, 2, 3, 4),
        rk4_steps=(1, 2, 4, 8),
        lfm_students=((1, 1), (2, 1), (1, 2), (1, 4), (1, 4, "wide")),
        fm_students=(1, 2, 4),
        speed_rounds=3,
    ),
    "quick": lambda: Setting(
        data="tree",
        n_train=5_000,
        lfm={
            "net": {"width": 32, "depth": 2, "activation": "softplus", "beta": 20.0},
            "blocks": {"schedule": "geometric", "c": 0.1, "rho": 1.5, "L": 2},
            "train": {"batch_size": 512, "lr": 3e-3, "lr_schedule": "cosine", "log_every": 50},
            "solver": {"method": "rk4", "steps": 4},
        },
        budget=6.0,
        student_steps=50,
        distill_batch=512,
        distill_lr=1e-3,
        data_pairs=2_000,
        generation_pairs=2_000,
        n_eval=2_000,
        seeds=(0, 1),
        rk4_steps=(1, 4),
        lfm_students=((1, 1), (1, 3), (1, 3, "wide")),
        fm_students=(1, 3),
        speed_rounds=1,
    ),
}


# ---------------------------------------------------------------------------------------------
# metrics with the reference set's own terms cached


class Reference:
    """Energy distance and Gaussian-kernel MMD of samples against fixed reference points ``y``.

    The same unbiased U-statistics as :func:`localfm.metrics.energy_distance` and
    :func:`localfm.metrics.mmd` (default bandwidth: median distance within ``y[:2000]``), in float64;
    the y-y terms are computed once and each block of distances serves every statistic. ``mmd_fine``
    is the same MMD at a tenth of that bandwidth: it sees the fine structure (the tree's twigs) that
    the other two average away.
    """

    FINE = 0.1

    def __init__(self, y, block: int = 1024, kernels: bool = True) -> None:
        self.y = torch.as_tensor(y).double().flatten(1)
        self.block, self.kernels = block, kernels  # kernels=False: energy distance alone (3x cheaper)
        sub = self.y[:2000]
        d = torch.cdist(sub, sub)
        self.bandwidth = float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)].median())
        self.yy = self._terms(self.y, self.y, same=True)

    def _terms(self, a: torch.Tensor, b: torch.Tensor, same: bool) -> tuple[float, ...]:
        sums = [0.0, 0.0, 0.0] if self.kernels else [0.0]
        c, c_fine, B = 2 * self.bandwidth**2, 2 * (self.FINE * self.bandwidth) ** 2, self.block
        for i in range(0, a.shape[0], B):
            for j in range(i if same else 0, b.shape[0], B):
                d = torch.cdist(a[i : i + B], b[j : j + B])
                values = [d]
                if self.kernels:
                    d2 = d * d
                    values += [torch.exp(-d2 / c), torch.exp(-d2 / c_fine)]
                    if same and i == j:
                        values[1].diagonal().zero_()
                        values[2].diagonal().zero_()
                w = 2.0 if same and j != i else 1.0  # off-diagonal blocks stand for their mirror too
                for n, v in enumerate(values):
                    sums[n] += w * float(v.sum())
        count = a.shape[0] * b.shape[0] - (a.shape[0] if same else 0)
        return tuple(v / count for v in sums)

    def __call__(self, x) -> dict[str, float]:
        x = torch.as_tensor(x).double().flatten(1)
        xy, xx = self._terms(x, self.y, same=False), self._terms(x, x, same=True)
        out = {"energy_distance": 2 * xy[0] - xx[0] - self.yy[0]}
        if self.kernels:
            out["mmd"] = xx[1] + self.yy[1] - 2 * xy[1]
            out["mmd_fine"] = xx[2] + self.yy[2] - 2 * xy[2]
        return out


# ---------------------------------------------------------------------------------------------
# steps


def load_data(s: Setting) -> tuple[torch.Tensor, torch.Tensor, object]:
    ds = datasets.load(s.data)
    x = torch.from_numpy(ds.train)
    if s.n_train is not None and x.shape[0] > s.n_train:
        x = x[: s.n_train]  # the splits are shuffled when made
    return x, torch.from_numpy(ds.test[: s.n_eval]), ds


def results_name(s: Setting, args, kind: str = "") -> str:
    """``distill_<data><kind>``, ``_t<seed>`` added for teachers trained with another seed."""
    seed = f"_t{args.teacher_seed}" if args.teacher_seed else ""
    return f"distill_{'quick' if args.quick else s.data}{kind}{seed}"


def run_metadata(s: Setting, args, threads: int) -> dict:
    """The ``meta`` record of a run: its teacher, distillation and sampling seeds."""
    return metadata(
        {"teacher fit": args.teacher_seed, "distillation": 0, "sampling": [1000 + k for k in s.seeds]}, threads=threads
    )


def without_per_seed(rows: list[dict]) -> list[dict]:
    """Rows as tabled: the per-seed lists live in the results' raw section."""
    return [{k: v for k, v in r.items() if not k.startswith("per_seed")} for r in rows]


def train_teacher(
    s: Setting, x: torch.Tensor, fm: bool, cache: Path | None, seed: int = 0
) -> tuple[localfm.LocalFlow, float]:
    cfg = s.flow_config(fm, x.shape[1])
    # the resolved config, defaults included: a changed library default must not reuse an old teacher
    resolved = to_dict(localfm.load_config(cfg))
    what = [resolved, s.n_train, s.budget] + ([seed] if seed else [])  # seed 0 keeps the keys made before seeds
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"{s.data}-{'fm' if fm else 'lfm'}-{key}" if cache is not None else None
    if path is not None and path.is_dir():
        flow = localfm.load(path)
        return flow, sum(e["train_seconds"] + e["push_seconds"] for e in flow.training_log)
    t0 = time.perf_counter()
    flow = localfm.fit(x, cfg, time_budget=s.budget, seed=seed)
    seconds = time.perf_counter() - t0
    if path is not None:
        flow.save(path)
    return flow, seconds


SHORT = {"energy_distance": "ed", "mmd": "mmd", "mmd_fine": "mmd_fine"}  # metric -> its per-seed key


def evaluate(name: str, sampler, nfe, s: Setting, ref: Reference, check: list, n: int | None = None) -> dict:
    """Mean and spread over seeds of the metrics ``ref`` computes; ``sampler(n, generator)`` draws
    ``n`` samples (default ``s.n_eval``)."""
    per_seed: dict[str, list[float]] = {}
    secs = []
    for seed in s.seeds:
        t0 = time.perf_counter()
        xs = sampler(n or s.n_eval, torch.Generator().manual_seed(1000 + seed))
        secs.append(time.perf_counter() - t0)
        m = ref(xs)
        if not check:  # the cached statistics against localfm.metrics, once per run, on 3000 points
            small, xs3 = Reference(ref.y[:3000], kernels=ref.kernels), xs[:3000]
            ours = small(xs3)
            theirs = {"energy_distance": metrics.energy_distance(xs3, small.y)}
            if ref.kernels:
                theirs["mmd"] = metrics.mmd(xs3, small.y)
                theirs["mmd_fine"] = metrics.mmd(xs3, small.y, bandwidth=small.FINE * small.bandwidth)
            check.append({k: [ours[k], v] for k, v in theirs.items()})
            if not all(math.isclose(ours[k], v, rel_tol=1e-6, abs_tol=1e-12) for k, v in theirs.items()):
                raise RuntimeError(f"cached metrics disagree with localfm.metrics: {check[-1]}")
        for k, v in m.items():
            per_seed.setdefault(k, []).append(v)
    row: dict = {"model": name, "nfe": nfe}
    for key, v in per_seed.items():
        row |= {key: statistics.fmean(v), f"{SHORT[key]}_std": statistics.stdev(v) if len(v) > 1 else math.nan}
    row["sample_s"] = median(secs)
    print(
        f"  {name:38s} nfe {nfe:>7} "
        + "  ".join(f"{k} {row[k]:.3g}" for k in ("energy_distance", "mmd", "mmd_fine") if k in row)
        + f" (sd ED {row['ed_std']:.2g})",
        flush=True,
    )
    return row | {f"per_seed_{SHORT[k]}": v for k, v in per_seed.items()}


def paired(a: dict, b: dict, key: str) -> str:
    """Mean ± sd over seeds of ``a - b`` for the metric ``key`` (``ed``, ``mmd``, ``mmd_fine``).

    Every model samples from the same noise seeds against the same test points, so per-seed
    differences are paired: far less noisy than either model's own spread.
    """
    d = [p - q for p, q in zip(a[f"per_seed_{key}"], b[f"per_seed_{key}"], strict=True)]
    return f"{statistics.fmean(d):+.2g} ± {statistics.stdev(d) if len(d) > 1 else math.nan:.1g}"


def teacher_nfe(flow: localfm.LocalFlow, solver: SolverConfig, n: int) -> float:
    """Network evaluations per sample of one decode of ``n`` codes (adaptive steps vary per batch)."""
    out = flow.decode(torch.randn(n, *flow.event_shape, generator=torch.Generator().manual_seed(99)), solver=solver)
    return float(sum(out.nfe))


COST_NOTE = (
    "`cost`: parameter-evaluations per sample (`nfe` times the evaluated network's parameters; an LFM "
    "network is a block's share of the parameters, so at equal `nfe` LFM samples with less compute)."
)


def network_cost(row: dict, log: dict) -> float:
    """Parameter-evaluations per sample: network evaluations times the size of the network evaluated
    (an MLP's multiply-adds per point are about its parameter count). A student or an rk4 solve
    evaluates networks of its teacher's block size; at equal evaluations LFM's (a block's share of
    the parameters) cost less than FM's, so this is the measure of equal sampling compute."""
    if row["kind"] == "data":
        return 0.0
    if "net_params" in row:  # a student: the network it evaluates (teachers' rows, and older files, lack it)
        return row["nfe"] * row["net_params"]
    t = log["teachers"][row["model"].split()[0]]
    return row["nfe"] * t["parameters"] / t["blocks"]


def issue_figures(rows: list[dict], speed: list[dict], lfm1: str) -> list[dict]:
    """The figures the issue asks for, with paired differences over seeds (see `paired`); ``rows``
    carry ``per_seed_*`` and ``cost``, ``lfm1`` names the one-step-per-block LFM student."""
    by = {r["model"]: r for r in rows}
    teacher = next(r for r in rows if r["kind"] == "LFM teacher dopri5")
    figures = []
    for name in [lfm1] + [n for n in by if by[n]["kind"] == "LFM merged student"]:
        r = by[name]
        s_ed, t_ed = r["energy_distance"], teacher["energy_distance"]
        if t_ed > 0:
            measured, reached = f"{s_ed / t_ed:.3g} ({s_ed:.3g} / {t_ed:.3g})", bool(s_ed <= 1.5 * t_ed)
        else:  # an estimate at or below 0: as close to the test set as fresh data; no ratio to take
            measured, reached = f"undefined: teacher {t_ed:.3g} <= 0, student {s_ed:.3g}", None
        figures.append(
            {
                "figure": f"ED({name}, {r['nfe']} NFE) / ED(LFM teacher dopri5)",
                "target": "<= 1.5" if name == lfm1 else "(extra)",
                "measured": measured,
                "reached": reached,
                "note": f"paired difference over seeds: ED {paired(r, teacher, 'ed')}, "
                f"fine MMD {paired(r, teacher, 'mmd_fine')}",
            }
        )
    figures.append(
        {
            "figure": "samples/s LFM k=1 / teacher dopri5",
            "target": ">= 20",
            "measured": f"{speed[1]['speed-up vs teacher (wall)']:.3g} (wall clock), "
            f"{speed[1]['speed-up vs teacher (cpu)']:.3g} (CPU time)",
            "reached": bool(speed[1]["speed-up vs teacher (wall)"] >= 20),
            "note": f"batch {speed[0]['batch']}",
        }
    )
    fm_rows = sorted((r for r in rows if r["kind"] == "FM student"), key=lambda r: r["nfe"])
    lfm_rows = [r for r in rows if r["kind"] in ("LFM student", "LFM merged student")]
    # The strict comparisons: the FM student with at least as many evaluations (else the largest), then
    # the one with at least the same network cost (parameter-evaluations per sample).
    for measure, unit, target in (("nfe", "NFE", "LFM lower ED"), ("cost", "param-evals", "(context) LFM lower ED")):
        for r in lfm_rows if fm_rows else []:
            f = next((f for f in fm_rows if f[measure] >= r[measure]), fm_rows[-1])
            figures.append(
                {
                    "figure": f"{r['model']} ({r[measure]:,.0f} {unit}) vs {f['model']} ({f[measure]:,.0f} {unit})",
                    "target": target,
                    "measured": f"ED {r['energy_distance']:.3g} vs {f['energy_distance']:.3g}",
                    "reached": r["energy_distance"] < f["energy_distance"],
                    "note": f"paired LFM - FM: ED {paired(r, f, 'ed')}, MMD {paired(r, f, 'mmd')}, "
                    f"fine MMD {paired(r, f, 'mmd_fine')}",
                }
            )
    teachers = [teacher, next(r for r in rows if r["kind"] == "FM teacher dopri5")]
    figures.append(
        {
            "figure": "LFM teacher vs FM teacher (dopri5)",
            "target": "(context)",
            "measured": f"ED {teachers[0]['energy_distance']:.3g} vs {teachers[1]['energy_distance']:.3g}",
            "reached": teachers[0]["energy_distance"] < teachers[1]["energy_distance"],
            "note": f"paired LFM - FM: ED {paired(*teachers, 'ed')}, fine MMD {paired(*teachers, 'mmd_fine')}",
        }
    )
    return figures


def distil_config(s: Setting, k: int, m: int, **changes) -> DistillConfig:
    """The benchmark's distillation settings: ``s.student_steps`` optimiser steps for every student."""
    return DistillConfig(
        steps_per_block=k,
        group_size=m,
        train_steps=s.student_steps,
        batch_size=s.distill_batch,
        lr=s.distill_lr,
        data_pairs=s.data_pairs,
        generation_pairs=s.generation_pairs,
        solver=TEACHER_SOLVER,
    ).replace(**changes)


def distil_all(flow, pairs, specs, s: Setting, label: str, rows: list, ref, check, models: dict, log: dict) -> None:
    """Distil ``flow`` once per spec (k, m) or (k, m, "wide"), evaluate, add rows. A wide student is
    fresh and as wide as the FM twin's network: merging every block, it matches FM's k=1 student in
    evaluations and in parameters."""
    for k, m, *wide in specs:
        changes = {}
        if wide:
            changes = {"init": "fresh", "width": fm_width(flow.event_shape[0], s.lfm)}
        cfg = distil_config(s, k, m, **changes)
        t0 = time.perf_counter()
        model = distill(flow, cfg, pairs=pairs, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - t0
        name = f"{label} student k={k}" + (f", {m} blocks merged" if m > 1 and len(flow) > 1 else "")
        name += f", fresh at FM's width {cfg.width}" if wide else ""
        models[name] = model
        log[name] = {"distill_s": seconds, "config": cfg.__dict__ | {"solver": None}, "students": model.log[:-1]}
        row = evaluate(name, lambda n, g, model=model: model.sample(n, generator=g), model.nfe, s, ref, check)
        net_params = localfm.nets.count_parameters(model.students[0].net)
        rows.append(row | {"kind": f"{label} student", "distill_s": seconds, "net_params": net_params})


# ---------------------------------------------------------------------------------------------
# figure


def plot(rows: list[dict], path: Path, title: str, samples: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "LFM teacher rk4": ("C0", "o-"),
        "LFM teacher dopri5": ("C0", "*"),
        "LFM student": ("C1", "s-"),
        "LFM merged student": ("C2", "D-"),
        "FM teacher dopri5": ("C3", "*"),
        "FM teacher rk4": ("C3", "o:"),
        "FM student": ("C4", "^-"),
    }
    fig = plt.figure(figsize=(16, 10 if samples else 5))
    grid = fig.add_gridspec(2 if samples else 1, 12)
    metrics_ = (("energy_distance", "ed_std"), ("mmd", "mmd_std"), ("mmd_fine", "mmd_fine_std"))
    for col, (metric, err) in enumerate(metrics_):
        ax = fig.add_subplot(grid[0, 4 * col : 4 * col + 4])
        for kind, (color, style) in styles.items():
            pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["nfe"])
            if pts:
                ax.errorbar(
                    [r["nfe"] for r in pts],
                    [r[metric] for r in pts],
                    yerr=[r[err] if math.isfinite(r[err]) else 0 for r in pts],
                    fmt=style,
                    color=color,
                    label=kind,
                    capsize=3,
                    ms=8 if "dopri5" in kind else 5,
                )
        # The statistics are unbiased, so they scatter around 0 for a perfect sampler: a symmetric log
        # scale, linear within the seed-to-seed spread of fresh data (the grey band, mean ± 2 sd).
        floor = [r for r in rows if r["kind"] == "data"]
        spread = floor[0][err] if floor and math.isfinite(floor[0][err]) else 1e-5
        if floor:
            f = floor[0]
            ax.axhspan(f[metric] - 2 * spread, f[metric] + 2 * spread, color="gray", alpha=0.25, label="fresh data")
        ax.set_xscale("log")
        top = max((r[metric] + (r[err] if math.isfinite(r[err]) else 0) for r in rows), default=1.0)
        lin = max(2 * spread, top / 300)  # at most a few decades above the linear part
        ax.set_yscale("symlog", linthresh=lin)
        ax.set_ylim(-2 * lin, max(top, 2 * lin) * 2)
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(metric.replace("_", " ") + " to test set")
        ax.grid(alpha=0.3, which="both")
        if col == 0:
            ax.legend(fontsize=8)
    lims = None
    for i, (name, xs) in enumerate(samples.items()):
        ax = fig.add_subplot(grid[1, 3 * i : 3 * i + 3])
        ax.scatter(xs[:, 0], xs[:, 1], s=0.2, alpha=0.5)
        lims = lims or (ax.get_xlim(), ax.get_ylim())  # the same window for every panel
        ax.set_xlim(*lims[0])
        ax.set_ylim(*lims[1])
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ablations


ABLATIONS = (
    ("LFM k=1, defaults (chained, init identity)", "LFM", {}),
    ("LFM k=1, not chained", "LFM", {"chained": False}),
    ("LFM k=1, init teacher (its Euler step)", "LFM", {"init": "teacher"}),
    ("LFM k=1, init fresh network", "LFM", {"init": "fresh"}),
    ("LFM k=1, generation-side pairs only", "LFM", {"generation_fraction": 1.0}),
    ("LFM k=1, 1/N of the steps per student (N students: the FM student's steps in all)", "LFM", {"split": True}),
    ("FM k=1, defaults", "FM", {}),
    ("FM k=1, init teacher (its Euler step)", "FM", {"init": "teacher"}),
)


def ablate(s: Setting, args, threads: int) -> None:
    """One change at a time to the LFM k=1 student (and FM k=1 for reference), same teachers and pairs."""
    t_start = time.perf_counter()
    x, x_test, _ = load_data(s)
    ref, check, rows = Reference(x_test), [], []
    teachers = {label: train_teacher(s, x, label == "FM", args.cache, args.teacher_seed)[0] for label in ("LFM", "FM")}
    pairs = {
        label: teacher_pairs(
            flow,
            DistillConfig(data_pairs=s.data_pairs, generation_pairs=s.generation_pairs, solver=TEACHER_SOLVER),
            x_train=x,
            generator=torch.Generator().manual_seed(0),
        )
        for label, flow in teachers.items()
    }
    extra = ("paired ΔED vs teacher", "paired Δfine MMD vs teacher", "steps_per_student", "distill_s")
    extra += ("val_rms_error_data_side", "val_relative_error_per_student")
    teacher_rows = {}
    for label, flow in teachers.items():
        row = evaluate(
            f"{label} teacher dopri5",
            lambda n, g, f=flow: f.sample(n, generator=g, solver=TEACHER_SOLVER),
            math.nan,
            s,
            ref,
            check,
        )
        teacher_rows[label] = row
        rows.append(row | dict.fromkeys(extra, ""))
    for name, label, changes in ABLATIONS:
        flow, changes = teachers[label], dict(changes)
        m = min(changes.pop("group_size", 1), len(flow))
        cfg = distil_config(s, 1, m)
        n_students = math.ceil(len(flow) / m)
        steps = max(1, s.student_steps // n_students) if changes.pop("split", False) else s.student_steps
        cfg = cfg.replace(train_steps=steps, **changes)
        t0 = time.perf_counter()
        model = distill(flow, cfg, pairs=pairs[label], generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - t0
        row = evaluate(name, lambda n, g, model=model: model.sample(n, generator=g), model.nfe, s, ref, check)
        end = model.log[0]  # the data-side student: its error is the whole chain's when chained
        rows.append(
            row
            | {
                "paired ΔED vs teacher": paired(row, teacher_rows[label], "ed"),
                "paired Δfine MMD vs teacher": paired(row, teacher_rows[label], "mmd_fine"),
                "steps_per_student": cfg.train_steps,
                "distill_s": seconds,
                "val_rms_error_data_side": end.get("val_rms_error", math.nan)
                if cfg.chained or m == len(flow)
                else math.nan,
                "val_relative_error_per_student": [
                    round(e.get("val_relative_error", math.nan), 3) for e in model.log[:-1]
                ],
            }
        )
    total = time.perf_counter() - t_start
    name = results_name(s, args, "_ablation")
    table = without_per_seed(rows)
    notes = (
        f"Total run time {total:.0f} s. Same teachers, pairs and evaluation as `distill_{s.data}` "
        f"({s.n_eval} samples vs {s.n_eval} test points, mean ± sd over seeds {list(s.seeds)}); each row changes one "
        f"setting of the LFM k=1 student (defaults: {s.student_steps} optimiser steps in all, lr {s.distill_lr}). "
        "`val_rms_error_data_side`: rms distance, in standardised units, between the student chain's output and "
        "the teacher's on held-out noise (chained or merged students only); `val_relative_error_per_student`: each "
        "student's held-out error over the teacher's displacement, data side first. `paired Δ...`: mean ± sd over "
        "seeds of the per-seed difference to the row's own teacher (same noise seeds, same test points)."
    )
    meta = run_metadata(s, args, threads)
    write_results(
        name,
        f"Distillation ablations: {s.data}",
        meta,
        {"Ablations": table},
        notes=notes,
        raw={
            "per_seed": {
                r["model"]: {"ed": r["per_seed_ed"], "mmd": r["per_seed_mmd"], "mmd_fine": r["per_seed_mmd_fine"]}
                for r in rows
            },
            "metric_check": check,
        },
    )
    print(f"total {total:.0f} s", flush=True)


def precise(s: Setting, args, threads: int) -> None:
    """``--precise N``: the issue's energy-distance figures at a resolution that can decide them.

    At ``s.n_eval`` samples against as many test points, the estimate's spread over seeds is larger
    than the teachers' own energy distances, so a ratio to the teacher's is noise. Here each seed
    scores N samples against N reference points (tree: fresh draws of the true density; POWER: the
    first N test points), energy distance alone. A noise-floor row scores exact draws the same way
    (tree: fresh draws; POWER: a new random N of the test points outside the reference per seed).
    Models: the LFM teacher (dopri5), its student with one step per block, and the FM student with
    the same number of network evaluations; teachers, pairs and students as in the main run.
    """
    t_start, n = time.perf_counter(), args.precise
    x, _, ds = load_data(s)
    if ds.sampler is not None:
        y = torch.from_numpy(ds.sampler(n, np.random.default_rng(12345)))

        def floor(m, g):
            return torch.from_numpy(ds.sampler(m, np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))))

        floor_name, reference = "data (fresh draws of the density)", f"{n:,} fresh draws of the density"
    else:
        test = torch.from_numpy(ds.test)
        if 2 * n > test.shape[0]:
            raise SystemExit(f"--precise {n}: needs 2N <= {test.shape[0]:,} test points (reference and noise floor)")
        y, rest = test[:n], test[n:]

        def floor(m, g):
            return rest[torch.randperm(rest.shape[0], generator=g)[:m]]

        floor_name = f"test points outside the reference ({rest.shape[0]:,}, a random {n:,} per seed)"
        reference = f"the first {n:,} test points"
    ref, check, rows = Reference(y, kernels=False), [], []
    print(f"reference: {reference}; {n:,} samples per seed, seeds {list(s.seeds)}", flush=True)
    rows.append(evaluate(floor_name, floor, 0, s, ref, check, n=n) | {"kind": "data"})
    flows = {label: train_teacher(s, x, label == "FM", args.cache, args.teacher_seed)[0] for label in ("LFM", "FM")}
    lfm_flow = flows["LFM"]
    teacher = evaluate(
        f"LFM teacher dopri5 tol {TEACHER_SOLVER.rtol:g}",
        lambda m, g: lfm_flow.sample(m, generator=g, solver=TEACHER_SOLVER),
        teacher_nfe(lfm_flow, TEACHER_SOLVER, s.n_eval),
        s,
        ref,
        check,
        n=n,
    )
    rows.append(teacher | {"kind": "LFM teacher dopri5"})
    students = {}
    for label, k in (("LFM", 1), ("FM", len(lfm_flow))):  # FM: as many evaluations as LFM's k=1 chain
        flow = flows[label]
        pair_cfg = DistillConfig(data_pairs=s.data_pairs, generation_pairs=s.generation_pairs, solver=TEACHER_SOLVER)
        pairs = teacher_pairs(flow, pair_cfg, x_train=x, generator=torch.Generator().manual_seed(0))
        model = distill(flow, distil_config(s, k, 1), pairs=pairs, generator=torch.Generator().manual_seed(0))
        name = f"{label} student k={k}"
        students[label] = evaluate(
            name, lambda m, g, model=model: model.sample(m, generator=g), model.nfe, s, ref, check, n=n
        )
        rows.append(students[label] | {"kind": f"{label} student"})
    figures = precise_figures(rows[0], teacher, students["LFM"], students["FM"])
    for f in figures:
        print(f"  {f['figure']}: {f['measured']} ({f['note']})", flush=True)
    total = time.perf_counter() - t_start
    name = results_name(s, args, "_precise")
    notes = (
        f"The energy-distance figures of `distill_{s.data}` at higher resolution: per seed, {n:,} samples "
        f"against {reference} (energy distance alone, float64), seeds {list(s.seeds)}; teacher training seed "
        f"{args.teacher_seed}. Noise floor: {floor_name}. `se`: standard error over seeds; paired differences "
        "use the same noise seeds and reference points for both models, so the teacher's and student's shared "
        f"noise cancels. Run time {total:.0f} s."
    )
    table = without_per_seed(rows)
    meta = run_metadata(s, args, threads)
    write_results(
        name,
        f"Distillation (issue 6), energy distance at {n:,} points: {s.data}",
        meta,
        {"Figures": figures, "Energy distance": table},
        notes=notes,
        raw={"per_seed": {r["model"]: r["per_seed_ed"] for r in rows}, "metric_check": check},
    )
    print(f"total {total:.0f} s", flush=True)


def precise_figures(floor: dict, teacher: dict, lfm: dict, fm: dict) -> list[dict]:
    """The ratio to the teacher and the equal-NFE comparison, each with its standard errors.

    Against a fixed reference every estimate carries the same offset (the reference's own
    fluctuation, of the order of the noise); the floor row, exact draws scored against the same
    reference, measures it, so a model's energy distance is its estimate minus the floor's. Paired
    differences between models (same noise seeds) carry no offset and little noise.
    """

    def mean_se(values: list[float]) -> tuple[float, float]:
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        return statistics.fmean(values), se

    f, f_se = mean_se(floor["per_seed_ed"])
    t_raw, t_raw_se = mean_se(teacher["per_seed_ed"])
    t, t_se = t_raw - f, math.hypot(t_raw_se, f_se)  # the teacher's ED over exact draws'
    d, d_se = mean_se([a - b for a, b in zip(lfm["per_seed_ed"], teacher["per_seed_ed"], strict=True)])
    e, e_se = mean_se([a - b for a, b in zip(lfm["per_seed_ed"], fm["per_seed_ed"], strict=True)])
    resolved = t > 2 * t_se
    # ratio = 1 + d / t; its pessimistic end: the difference 2 SE higher over the teacher's ED 2 SE lower
    bound = 1 + (d + 2 * d_se) / (t - 2 * t_se) if resolved else math.inf
    return [
        {
            "figure": "noise floor: ED of exact draws against the reference",
            "target": "(resolution)",
            "measured": f"{f:.3g} ± {f_se:.2g}",
            "reached": None,
            "note": "the offset every estimate shares (subtracted below) and the noise of one model's mean",
        },
        {
            "figure": "ED(LFM teacher dopri5), over the floor",
            "target": "(context) above 0",
            "measured": f"{t:.3g} ± {t_se:.2g}",
            "reached": bool(resolved) if abs(t) > 2 * t_se else None,
            "note": f"estimate {t_raw:.3g} ± {t_raw_se:.2g} minus the floor",
        },
        {
            "figure": f"ED({lfm['model']}, {lfm['nfe']} NFE) / ED(LFM teacher dopri5)",
            "target": "<= 1.5",
            "measured": f"{(t + d) / t:.3g}" if resolved else "undefined: the teacher's ED is not above 0 at 2 SE",
            "reached": bool((t + d) / t <= 1.5) if resolved else None,
            "note": f"paired student - teacher {d:+.3g} ± {d_se:.2g}; ratio with both 2 SE against it: {bound:.3g}",
        },
        {
            "figure": f"{lfm['model']} vs {fm['model']} ({fm['nfe']} NFE each)",
            "target": "LFM lower ED",
            "measured": f"paired LFM - FM {e:+.3g} ± {e_se:.2g}",
            "reached": bool(e < 0) if abs(e) > 2 * e_se else None,
            "note": f"ED over the floor {lfm['energy_distance'] - f:.3g} vs {fm['energy_distance'] - f:.3g}",
        },
    ]


def render_precise(name: str) -> None:
    """``--precise N --render``: the figures of a saved precise run again, from its per-seed estimates."""
    payload = json.loads((_common.RESULTS / f"{name}.json").read_text())
    rows = [r | {"per_seed_ed": payload["raw"]["per_seed"][r["model"]]} for r in payload["sections"]["Energy distance"]]
    by = {r["kind"]: r for r in rows}
    payload["sections"]["Figures"] = precise_figures(
        by["data"], by["LFM teacher dopri5"], by["LFM student"], by["FM student"]
    )
    meta = payload["meta"]
    meta["rendered"] = f"{metadata({})['date']} at {_common.git_revision()} by `{_common.command_line()}`"
    write_results(name, payload["title"], meta, payload["sections"], notes=payload["notes"], raw=payload["raw"])


def write_teachers(
    name: str, s: Setting, rows: list[dict], log: dict, check: list, threads: int, total: float, seed: int
) -> None:
    """``--teachers-only``: the two teachers' sample quality and test NLL, paired LFM - FM."""
    lfm, fm = (next(r for r in rows if r["kind"] == f"{label} teacher dopri5") for label in ("LFM", "FM"))
    nll_se = math.hypot(lfm["test_nll_se"], fm["test_nll_se"])
    comparison = {
        "energy distance, LFM - FM (paired over seeds)": paired(lfm, fm, "ed"),
        "MMD, LFM - FM": paired(lfm, fm, "mmd"),
        "fine MMD, LFM - FM": paired(lfm, fm, "mmd_fine"),
        "test NLL, LFM - FM (own solvers)": f"{lfm['test_nll'] - fm['test_nll']:+.4f} ± {nll_se:.4f}",
    }
    t = log["teachers"]
    notes = (
        f"The teachers of `bench_distill.py --data {s.data}` alone, {s.budget:g} s each (pushforward included): "
        f"LFM, {t['LFM']['blocks']} blocks, {t['LFM']['parameters']:,} parameters, steps per block "
        f"{t['LFM']['steps']}; FM, {t['FM']['parameters']:,} parameters, {sum(t['FM']['steps']):,} steps. "
        f"Samples by dopri5 (1e-5): {s.n_eval} against {s.n_eval} test points, seeds {list(s.seeds)}; "
        f"`test_nll` on those test points with each model's own solver. Run time {total:.0f} s."
    )
    table = without_per_seed(rows)
    meta = metadata({"teacher fit": seed, "sampling": [1000 + k for k in s.seeds]}, threads=threads)
    write_results(
        name,
        f"Distillation teachers (issue 6): {s.data}",
        meta,
        {"Teachers": table, "LFM against FM": comparison},
        notes=notes,
        raw={"log": log, "metric_check": check},
    )
    print(f"wrote results/{name}.md", flush=True)


def render_saved(name: str) -> None:
    """Recompute the figures of ``results/<name>.json`` from its measurements (rows, per-seed metrics,
    speed, the teachers' sizes): a newer script's figures for a run already made, nothing retrained."""
    payload = json.loads((_common.RESULTS / f"{name}.json").read_text())
    sec, raw = payload["sections"], payload["raw"]
    rows = []
    for r in sec["Quality vs network evaluations"]:
        row = r | {f"per_seed_{k}": v for k, v in raw["per_seed"][r["model"]].items()}
        rows.append(row | {"cost": network_cost(row, raw["log"])})
    lfm1 = next(r["model"] for r in rows if r["kind"] == "LFM student" and r["model"].startswith("LFM student k=1"))
    sec["Figures"] = issue_figures(rows, sec["Sampling speed"], lfm1)
    sec["Quality vs network evaluations"] = without_per_seed(rows)
    meta = payload["meta"]
    meta["rendered"] = f"{metadata({})['date']} at {_common.git_revision()} by `{_common.command_line()}`"
    notes = payload["notes"] if COST_NOTE in payload["notes"] else f"{payload['notes']}\n\n{COST_NOTE}"
    write_results(name, payload["title"], meta, sec, notes=notes, section_notes=payload["section_notes"], raw=raw)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget for a CI smoke run (< 60 s)")
    parser.add_argument("--data", choices=("tree", "power"), default="tree")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep trained teachers in between runs")
    parser.add_argument("--ablate", action="store_true", help="ablations of the LFM k=1 student (own results file)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--render", action="store_true", help="recompute the figures of the saved results, no runs")
    parser.add_argument("--teachers-only", action="store_true", help="train (or load) and score the teachers only")
    parser.add_argument(
        "--precise", type=int, default=None, metavar="N", help="the ED figures at N samples per seed (own results file)"
    )
    parser.add_argument("--teacher-seed", type=int, default=0, help="training seed of both teachers (default 0)")
    args = parser.parse_args()
    s = SETTINGS["quick" if args.quick else args.data]()
    threads = _common.start(args.out, args.threads)
    if args.render and args.precise:
        return render_precise(results_name(s, args, "_precise"))
    if args.render:
        return render_saved(results_name(s, args))
    if args.ablate:
        return ablate(s, args, threads)
    if args.precise:
        return precise(s, args, threads)
    t_start = time.perf_counter()
    x, x_test, ds = load_data(s)
    ref = Reference(x_test)
    check: list = []
    rows: list[dict] = []
    models: dict = {}
    log: dict = {"teachers": {}}
    cpu_start = time.process_time()
    print(f"data {s.data}: train {tuple(x.shape)}, test {tuple(x_test.shape)}", flush=True)

    if ds.sampler is not None:  # fresh draws of the true density: the metrics' noise floor

        def draw(n, g):
            return torch.from_numpy(ds.sampler(n, np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))))

        rows.append(evaluate("data (fresh draws of the density)", draw, 0, s, ref, check) | {"kind": "data"})

    for label, fm in (("LFM", False), ("FM", True)):
        flow, fit_s = train_teacher(s, x, fm, args.cache, args.teacher_seed)
        params = sum(p.numel() for p in flow.parameters())
        steps = [e["steps"] for e in flow.training_log]
        log["teachers"][label] = {
            "config": s.flow_config(fm, x.shape[1]),
            "blocks": len(flow),
            "parameters": params,
            "steps": steps,
            "fit_s": fit_s,
        }
        print(f"{label} teacher: {len(flow)} blocks, {params} parameters, {steps} steps, fit {fit_s:.0f} s", flush=True)
        models[f"{label} teacher"] = flow
        nfe = teacher_nfe(flow, TEACHER_SOLVER, s.n_eval)
        row = evaluate(
            f"{label} teacher dopri5 tol {TEACHER_SOLVER.rtol:g}",
            lambda n, g, f=flow: f.sample(n, generator=g, solver=TEACHER_SOLVER),
            nfe,
            s,
            ref,
            check,
        )
        rows.append(row | {"kind": f"{label} teacher dopri5"})
        if args.teachers_only:
            nll = metrics.nll_summary(flow.log_prob(x_test).double())  # the teacher's own solver
            rows[-1] |= {"test_nll": nll["nll"], "test_nll_se": nll["nll_se"], "fit_s": fit_s}
            continue
        for k in s.rk4_steps if not fm else s.rk4_steps[-1:]:
            solver = SolverConfig("rk4", steps=k)
            row = evaluate(
                f"{label} teacher rk4 {k} step(s)/block",
                lambda n, g, f=flow, sv=solver: f.sample(n, generator=g, solver=sv),
                4 * k * len(flow),
                s,
                ref,
                check,
            )
            rows.append(row | {"kind": f"{label} teacher rk4"})
        t0 = time.perf_counter()
        pair_cfg = DistillConfig(data_pairs=s.data_pairs, generation_pairs=s.generation_pairs, solver=TEACHER_SOLVER)
        pairs = teacher_pairs(flow, pair_cfg, x_train=x, generator=torch.Generator().manual_seed(0))
        log["teachers"][label]["pairs_s"] = time.perf_counter() - t0
        specs = s.lfm_students if not fm else tuple((k, 1) for k in s.fm_students)
        distil_all(flow, pairs, specs, s, label, rows, ref, check, models, log)
    if args.teachers_only:
        name = results_name(s, args, "_teachers")
        return write_teachers(name, s, rows, log, check, threads, time.perf_counter() - t_start, args.teacher_seed)
    for r in rows:
        if r["kind"] == "LFM student" and "merged" in r["model"]:
            r["kind"] = "LFM merged student"

    # Speed: teacher (dopri5) against students, same batch, alternating in one process.
    lfm1 = next(n for n in models if n.startswith("LFM student k=1") and "merged" not in n)
    fm1 = next(n for n in models if n.startswith("FM student k=1"))
    fns = {
        "LFM teacher dopri5": lambda: models["LFM teacher"].sample(
            s.n_eval, generator=torch.Generator().manual_seed(5), solver=TEACHER_SOLVER
        ),
        lfm1: lambda: models[lfm1].sample(s.n_eval, generator=torch.Generator().manual_seed(5)),
        fm1: lambda: models[fm1].sample(s.n_eval, generator=torch.Generator().manual_seed(5)),
    }
    timing = interleaved(fns, rounds=s.speed_rounds, warmup=1)
    speed = [
        {
            "model": name,
            "batch": s.n_eval,
            "samples_per_s": s.n_eval / timing.median(name),
            "samples_per_cpu_s": s.n_eval / timing.median(name, "cpu"),
            "speed-up vs teacher (wall)": timing.median("LFM teacher dopri5") / timing.median(name),
            "speed-up vs teacher (cpu)": timing.median("LFM teacher dopri5", "cpu") / timing.median(name, "cpu"),
        }
        for name in fns
    ]
    for r in speed:
        print(
            f"  {r['model']:38s} {r['samples_per_s']:.0f} samples/s, x{r['speed-up vs teacher (wall)']:.1f}", flush=True
        )

    for r in rows:
        r["cost"] = network_cost(r, log)
    figures = issue_figures(rows, speed, lfm1)
    verdict = {True: "reached", False: "NOT reached", None: "undecided"}
    for f in figures:
        print(f"  {f['figure']}: {f['measured']} (target {f['target']}): {verdict[f['reached']]}")

    total = time.perf_counter() - t_start
    name = results_name(s, args)
    table = without_per_seed(rows)
    t = log["teachers"]
    lfm_t, fm_t = t["LFM"], t["FM"]
    notes = (
        f"Total run time {total:.0f} s ({time.process_time() - cpu_start:.0f} s of CPU time; teachers from "
        f"the cache are not retrained). Teachers, trained by `localfm.fit` on {x.shape[0]} {s.data} "
        f"training points with the same wall-clock budget, {s.budget:g} s each (pushforward included): "
        f"LFM, {lfm_t['blocks']} blocks, {lfm_t['parameters']:,} parameters, {sum(lfm_t['steps']):,} "
        f"optimiser steps in all ({lfm_t['fit_s']:.0f} s); global FM (the same code with one block, its "
        f"network widened to the same parameter count), {fm_t['parameters']:,} parameters, "
        f"{sum(fm_t['steps']):,} steps ({fm_t['fit_s']:.0f} s). LFM network: {s.lfm['net']}. Every "
        f"student: {s.student_steps} optimiser steps, batch {s.distill_batch}, lr {s.distill_lr} (an LFM "
        "student is one block's network, so the LFM chain's students cost about what one FM student "
        f"does), pairs from {s.data_pairs} pushed training points and {s.generation_pairs} teacher decodes "
        f"(dopri5, 1e-5) of fresh noise, half of each minibatch each. Metrics: {s.n_eval} samples against "
        f"{s.n_eval} test points, mean and standard deviation over seeds {list(s.seeds)}; `nfe` is network "
        f"evaluations per sample (dopri5: measured on one batch). {COST_NOTE} The machine is shared with other "
        "jobs: speed ratios come from variants timed alternately (medians)."
    )
    meta = run_metadata(s, args, threads)
    png = _common.RESULTS / f"{name}.png"
    n_plot, g_plot = 10_000 if not args.quick else 2000, 3
    samples = {"test data": x_test[:n_plot].numpy()}
    samples["LFM teacher (dopri5)"] = models["LFM teacher"].sample(
        n_plot, generator=torch.Generator().manual_seed(g_plot), solver=TEACHER_SOLVER
    )
    for n in (lfm1, fm1):
        samples[f"{n} ({models[n].nfe} NFE)"] = models[n].sample(
            n_plot, generator=torch.Generator().manual_seed(g_plot)
        )
    samples = {k: np.asarray(v) for k, v in samples.items()}
    if s.data == "tree":
        plot(rows, png, f"Distillation on {s.data}: quality vs network evaluations", samples)
    else:
        plot(rows, png, f"Distillation on {s.data}: quality vs network evaluations", {})
    write_results(
        name,
        f"Distillation (issue 6): {s.data}",
        meta,
        {"Figures": figures, "Quality vs network evaluations": table, "Sampling speed": speed},
        notes=notes + f"\n\n![quality vs NFE]({png.name})",
        raw={
            "per_seed": {
                r["model"]: {"ed": r["per_seed_ed"], "mmd": r["per_seed_mmd"], "mmd_fine": r["per_seed_mmd_fine"]}
                for r in rows
            },
            "metric_check": check,
            "log": log,
        },
    )
    print(f"total {total:.0f} s", flush=True)


if __name__ == "__main__":
    main()
