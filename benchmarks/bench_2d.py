"""Suite 1 (issue 5): every 2-D density of the registry, all contenders at one equal budget.

For each 2-D dataset (``localfm datasets``: the ten with exact densities) every contender of
``contenders.py`` (LFM, global FM, torchcfm, zuko NSF and MAF) trains for the same wall-clock
budget, pushforward included, on the 100k training points; then: test NLL on the 20k test points
with its standard error, the gap to the true entropy (``NLL - H``, with H from
``datasets.true_entropy``) and the paired gap (mean of ``log p_true - log p_model`` over the same
test points: an estimate of KL(p || model) with a much smaller error), energy distance of 10k
samples to 10k test points, training and sampling time, network evaluations per sample.

Tuning: the same sweep of learning rate x batch size for every contender, on the validation split
of the sweep dataset(s) at the same budget; each contender's best setting (lowest validation NLL)
is then used on every dataset (``--per-dataset`` instead: every setting runs on every dataset at the
first training seed, each run is also scored on the validation split, each contender keeps per dataset
its setting with the lower score, and later training seeds run that setting only). The whole sweep is
in the results. ``--lfm-blocks 4 2 --lfm-depths 3 4
--fm-depths 3 4 5 6`` adds the architecture to the sweep, at the same total parameters: LFM's number
of blocks and their depth (every pair), FM's depth.

Contenders run one after another in an order that rotates from dataset to dataset, so that
changes in the machine's background load fall on all of them alike. Results are written after
every run; a rerun skips what is already there (``--fresh`` starts over).

    python benchmarks/bench_2d.py                       # the suite, about an hour on one core
    python benchmarks/bench_2d.py --budget 60           # another budget (a separate results file)
    python benchmarks/bench_2d.py --train-seeds 0 1 2 --datasets moons --contenders LFM FM  # more seeds
    python benchmarks/bench_2d.py --budget 300 --lfm-blocks 4 2 --lfm-depths 3 4 --fm-depths 3 4 5 6  # + architecture
    python benchmarks/bench_2d.py --budget 300 --sweep-data rings 8gaussians  # tune on a sharp and a smooth density
    python benchmarks/bench_2d.py --tiny --out DIR      # CI smoke run, seconds

Peers: ``pip install zuko`` (or the ``bench`` extra) and ``pip install --no-deps torchcfm`` (never
without ``--no-deps``: torchcfm's dependencies replace torch). A missing peer stops the script with
the command to install it (``--tiny`` skips it instead, and says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _common first: it sets the OpenMP wait policy before torch loads.
import _common  # noqa: E402, I001
from _common import metadata, write_results  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

import contenders as C  # noqa: E402
from localfm import datasets  # noqa: E402

DATASETS = [d.name for d in datasets.list_datasets() if d.kind == "2d"]
TARGETS = ("8gaussians", "rings", "moons")  # the gap <= 0.1 nats checks
SOLVER = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}
LFM_SOLVER = {"method": "rk4", "steps": 4}
# Every ODE model's likelihood (sweep and test) comes from this one solver, so that no contender's
# NLL carries its own solver's error; the solver check reports how far its own solver is from it.
NLL_SOLVER = C.SolverConfig(**SOLVER)

# LFM: 3 OU blocks (POWER's step sizes, total OU time 0.6) + the free block, each an MLP 64x3 with
# softplus(beta = 20) as in the authors' 2-D setting; FM: one MLP of the same total size (130 wide).
# LFM's blocks are close to the identity: rk4 with 4 steps per block serves its pushforward and its
# samples (dopri5 pushes of the 100k-point pool took up to half of a 40 s budget on the loaded
# machine). FM and torchcfm integrate their one global field with dopri5. Every likelihood comes
# from NLL_SOLVER; the solver check measures each ODE model's own solver against it.
SUITE = C.Suite(
    lfm={
        "net": {"width": 64, "depth": 3, "activation": "softplus", "beta": 20.0},
        "blocks": {"schedule": "list", "h": [0.15, 0.195, 0.2535], "free_block": True},
        "solver": LFM_SOLVER,
    },
    ode_solver=SOLVER,
    nsf={"transforms": 5, "hidden_features": [64, 64]},
    maf={"transforms": 5, "hidden_features": [80, 80]},
)

# `--lfm-recipe demo`: the LFM of `localfm demo` (src/localfm/demo.yaml: 8 OU blocks + the free
# block, 96x3 MLPs on random Fourier features of x, budget shares weighted to the data side, a
# 25,000-point pool, rk4 x8 per block) with its FM twin (same features, one wider MLP).
DEMO = yaml.safe_load((_common.ROOT / "src" / "localfm" / "demo.yaml").read_text())
DEMO_LFM = {
    "net": DEMO["net"],
    "blocks": DEMO["blocks"],
    "solver": DEMO["solver"],
    "train": {k: DEMO["train"][k] for k in ("steps", "warmup", "push_points", "interpolant")},
}

S_TABLE = "Gap to the true entropy per dataset (paired gap, nats; lower is better)"
S_CHECKS = "The issue's figures"
S_ROWS = "All runs (best setting of each contender)"
S_SWEEP = "Tuning sweep (validation NLL at the same budget)"
S_SETTINGS = "Every setting with test runs (paired gap, nats, mean over seeds)"
NOTES = {
    S_TABLE: "Paired gap = mean over the test points of `log p_true - log p_model`, an estimate of "
    "KL(data || model), averaged over the training seeds (`seeds`: how many each contender has); in "
    "brackets its standard error, between seeds where there are several (retraining moves a gap by more "
    "than the test points' error), else over the test points. `LFM<=FM`: the mean over the seeds both "
    "have of LFM's gap minus FM's (the same test points, so of LFM's test NLL minus FM's) is at most 0. "
    "`seeds for 2 SE`: how many paired training seeds would put that mean two standard errors from 0 if its "
    "mean and spread between seeds stayed as measured, `ceil((2 sd / |mean|)^2)` (from two seeds a rough "
    "guide: their spread is itself uncertain); where it runs to tens or hundreds, the sign is retraining noise.",
    S_ROWS: "`nll` ± `nll_se`: test NLL (nats) on the whole test split, with `nll_solver` (rows without it "
    "are older and used each model's own solver); `H`: true entropy (Monte Carlo, "
    "200k points); `nll-H` carries the test sample's noise, `paired_gap` much less. `train_s`: wall-clock "
    "of training (pushforward included, `push_s`); `nfe/sample`: network evaluations per sample (ODE "
    "models: over all blocks, dopri5; zuko: hyper-network passes); `ED`: energy distance of 10k samples "
    "to 10k test points (data units); `solver_diff`: on the first 5k test points, the NLL with the model's own "
    "solver minus the NLL with dopri5 at 1e-5 (ODE models; LFM integrates with its own fixed-step rk4). "
    "`train_gap` (runs with `--train-gap-points N`): the paired gap on the first N training points; well "
    "below `paired_gap`, the model has learnt its training points rather than the density.",
    S_SETTINGS: "Where a contender has test runs of more than one setting (one the sweep did not choose, run "
    "with a one-value grid such as `--lrs 0.003`, or every setting with `--per-dataset`): its gap per dataset "
    "for each, with the number of training seeds in brackets. Picking the better here would tune on the test "
    "points; `--per-dataset` picks on the validation split.",
    S_SWEEP: "Every contender gets the same grid; the setting with the lowest mean validation NLL over the "
    "sweep datasets is used everywhere (`best`). `arch` (where swept): LFM's number of blocks (its first OU "
    "steps + the free block) and hidden layers per block, FM's hidden layers, each at the same total "
    "parameters; `-`: the suite's own (LFM 4 blocks of 3 layers, FM 3 layers).",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=40.0, help="seconds per contender per dataset (default 40)")
    p.add_argument("--sweep-budget", type=float, default=None, help="seconds per sweep run (default: --budget)")
    p.add_argument(
        "--sweep-data",
        nargs="+",
        default=None,
        choices=DATASETS,
        help="dataset(s) of the tuning sweep (default rings; others: own results file, e.g. rings 8gaussians)",
    )
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--contenders", nargs="+", default=list(C.CONTENDERS), choices=C.CONTENDERS)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--batches", type=int, nargs="+", default=[512, 2048])
    p.add_argument(
        "--lfm-blocks", type=int, nargs="+", default=None, help="sweep LFM's number of blocks too (same parameters)"
    )
    p.add_argument(
        "--lfm-depths", type=int, nargs="+", default=None, help="sweep the depth of LFM's blocks too (same parameters)"
    )
    p.add_argument("--fm-depths", type=int, nargs="+", default=None, help="sweep FM's depth too (same parameters)")
    p.add_argument("--n-samples", type=int, default=10_000)
    p.add_argument("--n-check", type=int, default=5_000, help="test points of the solver check")
    p.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="training seeds (default: --seed); the data stay those of --seed, results average over seeds",
    )
    _common.add_suite_options(p, "CI smoke run: tiny data and budgets, seconds")
    p.add_argument("--lfm-pool", type=int, default=None, help="ablation: LFM trains on (and pushes) N points only")
    p.add_argument(
        "--lfm-push-points", type=int, default=None, help="LFM's block 1 trains on all points, N of them are pushed"
    )
    p.add_argument(
        "--lfm-h",
        type=float,
        nargs="+",
        default=None,
        help="ablation: LFM's OU step sizes (+ the free block), each block as wide as keeps the total parameters",
    )
    p.add_argument(
        "--lfm-recipe",
        choices=("plain", "demo"),
        default="plain",
        help="LFM's recipe: plain MLP blocks (default) or the demo's (Fourier features, 9 blocks); FM is its twin",
    )
    p.add_argument(
        "--lfm-solver", default=None, help="ablation: LFM's pushforward and sampling solver, e.g. rk4:8 or dopri5"
    )
    p.add_argument(
        "--train-gap-points",
        type=int,
        default=0,
        help="diagnostic: also the paired gap on the first N training points (`train_gap`: over-fitting shows as "
        "a train gap below the test gap)",
    )
    p.add_argument(
        "--per-dataset",
        action="store_true",
        help="no shared sweep: every grid setting runs on every dataset at the first training seed, each is also "
        "scored on the validation split, each contender's setting is chosen per dataset by that score, and later "
        "training seeds run the chosen setting only (own results file)",
    )
    p.add_argument("--sweep-from", default=None, help="reuse the sweep of results/NAME.json (e.g. 2d)")
    p.add_argument("--render", action="store_true", help="rewrite the results files from their rows, nothing else")
    a = p.parse_args()
    if a.tiny:
        a.budget, a.sweep_budget = 1.0, 0.5
        a.datasets = ["8gaussians", "moons"]
        a.lrs, a.batches, a.n_samples, a.n_check = [1e-3, 3e-3], [256], 500, 1_000
    own_sweep = ["8gaussians"] if a.tiny else ["rings"]
    a.sweep_data = a.sweep_data or own_sweep
    a.other_sweep = a.sweep_data != own_sweep
    a.sweep_budget = a.sweep_budget or a.budget
    a.train_seeds = a.train_seeds or [a.seed]
    a.sizes = (4_000, 500, 1_000) if a.tiny else None
    a.name = "2d_tiny" if a.tiny else "2d" + ("" if a.budget == 40.0 else f"_{a.budget:g}s")
    if a.lfm_pool:
        a.name += f"_lfmpool{a.lfm_pool}"
    if a.lfm_push_points:
        a.name += f"_lfmpush{a.lfm_push_points}"
    if a.lfm_h:
        a.name += f"_lfmh{len(a.lfm_h)}"
    if a.lfm_recipe != "plain":
        a.name += f"_{a.lfm_recipe}"
    if a.lfm_solver:
        a.name += "_lfm-" + a.lfm_solver.replace(":", "")
    if a.lfm_blocks or a.lfm_depths or a.fm_depths:
        a.name += "_arch"
    if a.other_sweep:
        a.name += "_sweep-" + "-".join(a.sweep_data)
    if a.per_dataset:
        a.name += "_per-dataset"
    return a


def grids(a) -> dict[str, list[C.Setting]]:
    """Each contender's sweep: lr x batch, and for LFM and FM the architectures asked for (LFM:
    blocks x depth; the suite's own values as ``None``, so that its rows and those of a plain
    sweep are the same)."""
    own = {"blocks": C.n_blocks(SUITE.lfm), "depth": SUITE.lfm["net"]["depth"]}

    def archs(key: str, values: list[int] | None) -> list[dict]:
        return [{} if v == own[key] else {key: v} for v in values or [own[key]]]

    lfm = [{**b, **d} for d in archs("depth", a.lfm_depths) for b in archs("blocks", a.lfm_blocks)]
    extra = {"LFM": lfm, "FM": archs("depth", a.fm_depths)}
    return {n: C.sweep_grid(a.lrs, a.batches, extra.get(n, ({},))) for n in C.CONTENDERS}


def rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def sweep_key(data: str, name: str, s: C.Setting, budget: float) -> dict:
    """What identifies a sweep row (``arch`` None: the suite's own architecture)."""
    return {"dataset": data, "contender": name, "lr": s.lr, "batch": s.batch_size, "budget": budget, "arch": s.arch}


def run_sweep(a, rows: dict, publish) -> dict[str, C.Setting]:
    grid = grids(a)
    sweep = rows.setdefault("sweep", [])
    for i, data in enumerate(a.sweep_data):
        ds = datasets.load(data, seed=a.seed, sizes=a.sizes)
        x_val = torch.from_numpy(ds.val)
        for j in range(max(len(grid[n]) for n in a.contenders)):
            for name in rotated(a.contenders, i + j):
                if j >= len(grid[name]):
                    continue
                s = grid[name][j]
                key = sweep_key(data, name, s, a.sweep_budget)
                if C.find(sweep, **key):
                    continue
                tr = C.train(name, SUITE, torch.from_numpy(ds.train), s, a.sweep_budget, seed=a.seed)
                summary = validation(tr, x_val)
                sweep.append({**key, "val_nll": summary["nll"], "val_se": summary["nll_se"], "steps": tr.steps})
                print(f"[2d sweep] {data} {name} {s.label}: val NLL {summary['nll']:.4f}", flush=True)
                publish()
    return choose_best(a, sweep, a.contenders)


def validation(tr: C.Trained, x_val: torch.Tensor) -> dict:
    """A trained contender's NLL summary on the validation split, with the reference solver: the score
    that chooses settings (the shared sweep's and ``--per-dataset``'s alike)."""
    return C.metrics.nll_summary(C.nll_log_prob(tr, NLL_SOLVER)(x_val).double())


def score(vals: list[float]) -> float:
    """Mean validation NLL of a setting's runs; inf when there are none or one diverged."""
    return sum(vals) / len(vals) if vals and all(map(math.isfinite, vals)) else math.inf


def choose_best(a, sweep: list[dict], names) -> dict[str, C.Setting]:
    """Each contender's setting with the lowest mean validation NLL over the sweep datasets."""
    grid = grids(a)
    best = {}
    for name in names:
        scores = {}
        for s in grid[name]:
            found = [C.find(sweep, **sweep_key(d, name, s, a.sweep_budget)) for d in a.sweep_data]
            vals = [r["val_nll"] for r in found if r is not None]
            scores[s] = score(vals)
        best[name] = min(scores, key=scores.get)
    return best


def run_main(a, rows: dict, best: dict[str, C.Setting], entropies: dict, publish) -> None:
    runs = rows.setdefault("runs", [])
    for i, data in enumerate(a.datasets):
        ds = datasets.load(data, seed=a.seed, sizes=a.sizes)
        if data not in entropies:
            h = datasets.true_entropy(ds, n=20_000 if a.tiny else 200_000)
            entropies[data] = {"H": h.value, "H_se": h.stderr}
        H = entropies[data]["H"]
        x_test, x_val = torch.from_numpy(ds.test), torch.from_numpy(ds.val)

        def true_lp(x, ds=ds):
            return torch.as_tensor(ds.log_prob(x.double().numpy()))

        def settings(seed: int, name: str, data=data) -> list[C.Setting]:
            """What runs at this seed: the shared sweep's choice; with ``--per-dataset`` the whole grid at
            the first training seed (the tuning seed), then the setting its validation scores chose."""
            if not a.per_dataset:
                return [best[name]]
            grid = grids(a)[name]
            if seed == a.train_seeds[0]:
                return grid
            labels = {s.label for s in grid}
            mine = [r for r in runs if r["dataset"] == data and r["contender"] == name and r["setting"] in labels]
            _, choice = chosen_per_dataset(mine, a.budget)
            return [s for s in grid if s.label == choice[data, name]]

        order = (  # a generator: a later seed's setting is chosen once the tuning seed's runs are in
            (seed, name, s)
            for j, seed in enumerate(a.train_seeds)
            for name in rotated(a.contenders, i + j)
            for s in settings(seed, name)
        )
        for seed, name, s in order:
            key = {"dataset": data, "contender": name, "budget": a.budget, "seed": seed, "setting": s.label}
            if C.find(runs, **key):
                continue
            tr = C.train(name, SUITE, torch.from_numpy(ds.train), s, a.budget, seed=seed)
            ev = C.evaluate(tr, x_test, n_samples=a.n_samples, seed=seed + 1, true_log_prob=true_lp, solver=NLL_SOLVER)
            check = C.solver_check(tr, x_test[: a.n_check])
            row = {
                **key,
                "params": tr.n_params,
                "nll": ev["nll"],
                "nll_se": ev["nll_se"],
                "nll_solver": "dopri5 1e-5" if tr.flow is not None else "exact",
                "H": H,
                "nll-H": ev["nll"] - H,
                "paired_gap": ev["paired_gap"],
                "paired_gap_se": ev["paired_gap_se"],
                "ED": ev["energy_distance"],
                "train_s": tr.train_s,
                "push_s": tr.push_s,
                "steps": tr.steps,
                "sample_s": ev["sample_s"],
                "nfe/sample": ev["nfe_per_sample"],
                "nll_eval_s": ev["nll_eval_s"],
                "n_test": ev["n"],
                "load_1min": round(os.getloadavg()[0], 2),
                "solver_diff": check.get("solver_diff"),
                "solver_diff_se": check.get("solver_diff_se"),
                "dopri5_nll": check.get("dopri5_nll"),
                "own_solver_nll": check.get("own_solver_nll"),
            }
            if a.per_dataset:  # the score that chooses among this dataset's settings
                row["val_nll"] = validation(tr, x_val)["nll"]
            if a.train_gap_points and tr.flow is not None:
                x_fit = torch.from_numpy(ds.train[: a.train_gap_points])
                lp_fit = C.nll_log_prob(tr, NLL_SOLVER)(x_fit).double()
                row["train_gap"], row["train_gap_se"] = C.paired_gap(true_lp, x_fit, lp_fit)
                print(f"[2d] {data} {name} seed {seed}: gap on {len(x_fit)} training points {row['train_gap']:+.4f}")
            runs.append(row)
            print(
                f"[2d] {data} {name} seed {seed}: NLL {ev['nll']:.4f} ± {ev['nll_se']:.4f}, "
                f"gap {ev['paired_gap']:+.4f} ± {ev['paired_gap_se']:.4f}, ED {ev['energy_distance']:.2e}, "
                f"train {tr.train_s:.1f} s (push {tr.push_s:.1f}), {tr.steps} steps",
                flush=True,
            )
            publish()


def seed_mean(rows: list[dict]) -> tuple[float, float]:
    """Mean paired gap over training seeds and its standard error: between seeds when there are
    several (training noise, larger than the test points' here), else the run's own."""
    gaps = [r["paired_gap"] for r in rows]
    if len(gaps) == 1:
        return gaps[0], rows[0]["paired_gap_se"]
    return statistics.fmean(gaps), statistics.stdev(gaps) / math.sqrt(len(gaps))


def by_seed(runs: list[dict], data: str) -> dict[str, dict[int, dict]]:
    """``{contender: {training seed: row}}`` of one dataset."""
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        if r["dataset"] == data:
            out.setdefault(r["contender"], {})[r["seed"]] = r
    return out


def seeds_to_settle(diffs: list[float]) -> int | str:
    """How many paired training seeds would put the mean of ``diffs`` (LFM's gap minus FM's, one per
    seed) two standard errors away from 0, were its mean and spread between seeds what they are now:
    ``ceil((2 sd / |mean|)^2)``. A small number says the sign is settled; hundreds say the two differ by
    less than retraining moves either. ``-`` with fewer than two seeds."""
    if len(diffs) < 2:
        return "-"
    d, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    return max(len(diffs), math.ceil((2 * sd / abs(d)) ** 2)) if d else "inf"


def chosen_per_dataset(runs: list[dict], budget: float) -> tuple[list[dict], dict[tuple[str, str], str]]:
    """``--per-dataset``: for each dataset and contender, the runs (every seed) of the setting with the
    lowest mean validation NLL over the training seeds that all its settings have (the tuning seed, when
    later seeds ran the chosen setting only: a setting's luck at a seed the others lack cannot move the
    choice); also ``{(dataset, contender): setting}``."""
    scored = [r for r in runs if r["budget"] == budget and "val_nll" in r]
    val: dict[tuple[str, str], dict[str, dict[int, float]]] = {}  # (dataset, contender) -> setting -> seed -> NLL
    for r in scored:
        val.setdefault((r["dataset"], r["contender"]), {}).setdefault(r["setting"], {})[r["seed"]] = r["val_nll"]
    choice = {}
    for key, by_setting in val.items():
        seeds = [set(got) for got in by_setting.values()]
        common = set.intersection(*seeds) or set.union(*seeds)
        scores = {label: score([v for k, v in got.items() if k in common]) for label, got in by_setting.items()}
        choice[key] = min(scores, key=scores.get)
    return [r for r in scored if choice[r["dataset"], r["contender"]] == r["setting"]], choice


def measured(runs: list[dict]) -> list[str]:
    """The datasets with runs, in the registry's order (a pass over some of them rewrites all)."""
    return [d for d in DATASETS if any(r["dataset"] == d for r in runs)]


def chosen_runs(a, rows: dict) -> tuple[list[dict], dict[str, C.Setting], dict[tuple[str, str], str]]:
    """The runs the tables and the plot show: those of each contender's chosen setting (a file may also
    hold runs of other settings: outswept ones, ablations); with the sweep's choices and, for
    ``--per-dataset``, the choice per (dataset, contender)."""
    swept = [n for n in C.CONTENDERS if any(r["contender"] == n for r in rows.get("sweep", []))]
    best = choose_best(a, rows.get("sweep", []), swept)
    if a.per_dataset:
        runs, per_data = chosen_per_dataset(rows.get("runs", []), a.budget)
        return runs, best, per_data
    runs = [
        r
        for r in rows.get("runs", [])
        if r["budget"] == a.budget
        and (r["contender"] not in best or r.get("setting", best[r["contender"]].label) == best[r["contender"]].label)
    ]
    return runs, best, {}


def sections(a, rows: dict, missing: dict) -> dict:
    runs, best, per_data = chosen_runs(a, rows)
    out: dict = {}
    table, wins, compared, lfm_gap, worse = [], 0, 0, {}, []
    for data in measured(runs):
        line = {"dataset": data}
        got = by_seed(runs, data)
        if not got:
            continue
        line["H"] = next(iter(next(iter(got.values())).values()))["H"]
        means = {name: seed_mean(list(got[name].values())) for name in got}
        for name in C.CONTENDERS:
            line[name] = f"{means[name][0]:.3f} ({means[name][1]:.3f})" if name in means else "-"
        line["seeds"] = ", ".join(f"{n}: {len(got[n])}" for n in C.CONTENDERS if n in got)
        if "LFM" in got and "FM" in got:
            # the difference over the training seeds both have (paired by seed), or the two runs'
            seeds = sorted(set(got["LFM"]) & set(got["FM"]))
            diffs = [got["LFM"][k]["paired_gap"] - got["FM"][k]["paired_gap"] for k in seeds]
            d = statistics.fmean(diffs)
            if len(diffs) > 1:
                se = statistics.stdev(diffs) / math.sqrt(len(diffs))
            else:
                se = math.hypot(*(got[n][seeds[0]]["paired_gap_se"] for n in ("LFM", "FM")))
            line["LFM<=FM"] = d <= 0
            compared += 1
            wins += d <= 0
            if d > 2 * se:
                worse.append(data)
            line["LFM-FM"] = f"{d:+.4f} ± {se:.4f} ({len(diffs)} seed{'s' if len(diffs) > 1 else ''})"
            line["seeds for 2 SE"] = seeds_to_settle(diffs)
        if "LFM" in means:
            lfm_gap[data] = means["LFM"]
        line["best"] = min(means, key=lambda n: means[n][0])
        if a.per_dataset:
            line["settings"] = "; ".join(f"{n}: {per_data[data, n]}" for n in C.CONTENDERS if n in got)
        table.append(line)
    out[S_TABLE] = table
    checks = {
        "LFM gap <= FM gap (datasets)": f"{wins} of {compared} (issue: at least 8 of 10)",
        "LFM gap above FM's by more than 2 SE": f"{len(worse)} of {compared}"
        + (f" ({', '.join(worse)})" if worse else ""),
    }
    for data in TARGETS:
        if data in lfm_gap:
            g, se = lfm_gap[data]
            checks[f"LFM gap on {data} <= 0.1"] = f"{g:.3f} ± {se:.3f}: " + ("yes" if g <= 0.1 else "no")
    lfm = [r for r in runs if r["contender"] == "LFM"]
    fm = [r for r in runs if r["contender"] == "FM"]
    if lfm and fm:
        checks["parameters LFM / FM"] = f"{lfm[0]['params']:,} / {fm[0]['params']:,}"
    checks["settings used"] = (
        "per dataset, the lowest validation NLL of each contender's runs at the seeds all its settings have "
        "(`settings` above)"
        if a.per_dataset
        else "; ".join(f"{n}: {s.label}" for n, s in best.items())
    )
    if missing:
        checks["skipped (package not installed)"] = ", ".join(missing)
    out[S_CHECKS] = checks
    cols = ["dataset", "contender", "seed", "setting", "params", "nll", "nll_se", "nll_solver", "H", "nll-H"]
    cols += ["paired_gap", "paired_gap_se"] + (["train_gap"] if any("train_gap" in r for r in runs) else [])
    cols += ["val_nll"] if a.per_dataset else []
    cols += ["ED", "train_s", "push_s", "steps", "sample_s", "nfe/sample", "solver_diff", "load_1min"]
    out[S_ROWS] = [{c: r.get(c) for c in cols} for r in runs]
    every = [r for r in rows.get("runs", []) if r["budget"] == a.budget]
    settings = list(dict.fromkeys((r["contender"], r["setting"]) for r in every))
    if len(settings) > len({c for c, _ in settings}):  # some contender has more than one
        out[S_SETTINGS] = []
        for data in measured(every):
            line = {"dataset": data}
            for c, label in settings:
                gaps = [
                    r["paired_gap"] for r in every if (r["dataset"], r["contender"], r["setting"]) == (data, c, label)
                ]
                line[f"{c} {label}"] = f"{statistics.fmean(gaps):.4f} ({len(gaps)})" if gaps else "-"
            out[S_SETTINGS].append(line)
    sweep = []
    for r in rows.get("sweep", []):
        b = best.get(r["contender"])
        chosen = b is not None and (r["lr"], r["batch"], r.get("arch")) == (b.lr, b.batch_size, b.arch)
        line = {k: r[k] for k in ("dataset", "contender", "lr", "batch")}
        if a.lfm_blocks or a.lfm_depths or a.fm_depths:
            line["arch"] = r.get("arch") or "-"
        sweep.append({**line, "val_nll": f"{r['val_nll']:.4f}", "steps": r["steps"], "best": chosen})
    out[S_SWEEP] = sweep
    return out


def plot(a, rows: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    runs = chosen_runs(a, rows)[0]
    data = measured(runs)
    if not data:
        return
    fig, ax = plt.subplots(figsize=(11, 4))
    names = [n for n in C.CONTENDERS if any(r["contender"] == n for r in runs)]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        got = [by_seed(runs, d).get(name) for d in data]
        ys = [seed_mean(list(g.values()))[0] if g else math.nan for g in got]
        es = [seed_mean(list(g.values()))[1] if g else 0.0 for g in got]
        ax.bar([i + k * width for i in range(len(data))], ys, width, yerr=es, label=name)
    ax.axhline(0.1, color="k", lw=0.7, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(data))], data, rotation=20)
    ax.set_ylabel("KL estimate (paired gap, nats)")
    ax.set_yscale("symlog", linthresh=0.05)
    chosen = "; settings chosen per dataset on validation" if a.per_dataset else ""
    ax.set_title(f"2-D densities, {a.budget:g} s per contender{chosen} (dashed: 0.1 nats)")
    ax.legend(ncol=5, fontsize=8)
    _common.save_figure(fig, a.name)


def main() -> None:
    a = parse_args()
    threads = _common.start(a.out, a.threads)
    missing = C.check_peers(a, "2d")
    rows = {} if a.fresh else C.load_rows(a.name)
    for r in rows.get("runs", []):
        r.setdefault("seed", 0)  # rows from before training seeds were recorded: the default seed
    if a.sweep_from:
        rows["sweep"] = C.load_rows(a.sweep_from).get("sweep", [])
    global SUITE
    if a.lfm_pool:
        SUITE = dataclasses.replace(SUITE, lfm_pool=a.lfm_pool)
    if a.lfm_recipe == "demo":
        SUITE = dataclasses.replace(SUITE, lfm=DEMO_LFM)
    if a.lfm_h:  # other OU steps at the same total parameter count (FM's twin keeps its width)
        SUITE = dataclasses.replace(SUITE, lfm=C.with_steps(SUITE.lfm, 2, a.lfm_h), fm_width=SUITE.fm_net(2)["width"])
    if a.lfm_solver:
        SUITE = dataclasses.replace(SUITE, lfm={**SUITE.lfm, "solver": C.solver_spec(a.lfm_solver)})
    if a.lfm_push_points:  # train.push_points; FM, the twin, has nothing to push
        train = {**SUITE.lfm.get("train", {}), "push_points": a.lfm_push_points}
        SUITE = dataclasses.replace(SUITE, lfm={**SUITE.lfm, "train": train})
    entropies = rows.setdefault("entropies", {})
    best: dict[str, C.Setting] = {}
    t_start = time.perf_counter()
    meta = metadata({"data": a.seed, "training": a.train_seeds, "sampling": "training seed + 1"}, threads=threads)

    def publish() -> None:
        meta["hardware"] = _common.hardware()  # the load average at the time of writing
        suite = {"lfm": SUITE.lfm, "fm_net": SUITE.fm_net(2), "nsf": SUITE.nsf, "maf": SUITE.maf, "ode_solver": SOLVER}
        suite["lfm_pool"] = SUITE.lfm_pool
        commands = rows.setdefault("commands", [])  # each pass (more datasets, more seeds) adds its command
        if not a.render and _common.command_line() not in commands:
            commands.append(_common.command_line())
        meta["command"] = commands[0] if commands else _common.command_line()
        meta["all_commands"] = commands
        meta["seeds"]["training"] = sorted({r["seed"] for r in rows.get("runs", [])} | set(a.train_seeds))
        tuning = (
            "no shared sweep, each contender's setting chosen per dataset on the validation split at the tuning "
            "seed (every setting ran there; later seeds ran the chosen one)"
            if a.per_dataset
            else f"sweep at {a.sweep_budget:g} s on {', '.join(a.sweep_data)} (validation split)"
        )
        notes = (
            f"Budget {a.budget:g} s of wall-clock per contender per dataset (pushforward included), {tuning}; "
            f"{threads} torch thread(s), 2 shared cores. Commands: "
            + "; ".join(f"`{c}`" for c in commands)
            + "."
            + ("" if a.render else f" Run time of the last so far {time.perf_counter() - t_start:.0f} s.")
        )
        write_results(
            a.name,
            "Suite 1: 2-D densities, all contenders at an equal budget (issue 5)"
            + (f"; ablation: LFM on a {a.lfm_pool:,}-point pool" if a.lfm_pool else "")
            + (f"; LFM pushes {a.lfm_push_points:,} of the training points" if a.lfm_push_points else "")
            + (f"; ablation: LFM's OU steps h = {a.lfm_h} at the same total parameters" if a.lfm_h else "")
            + (f"; ablation: LFM's solver {a.lfm_solver}" if a.lfm_solver else "")
            + (f"; tuned on {' and '.join(a.sweep_data)}" if a.other_sweep else "")
            + ("; settings chosen per dataset" if a.per_dataset else ""),
            meta,
            sections(a, rows, missing),
            notes=notes,
            section_notes=NOTES,
            raw={"rows": rows, "suite": suite, "budget": a.budget, "sweep_budget": a.sweep_budget},
        )

    if a.render:
        publish()
        plot(a, rows)
        return
    if not a.per_dataset:
        best.update(run_sweep(a, rows, publish))
        print("[2d] best settings: " + "; ".join(f"{n}: {s.label}" for n, s in best.items()), flush=True)
    run_main(a, rows, best, entropies, publish)
    publish()
    plot(a, rows)
    print(f"[2d] done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
