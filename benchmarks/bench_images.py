"""LFM against global flow matching (FM) on images, at equal total parameters and equal wall-clock.

Both models are trained by ``localfm.fit(x, cfg, time_budget=B)`` with the same budget ``B`` (the
LFM pushforwards count against it) and a step count too large to bind, so the budget decides where
training stops. LFM: 4 blocks (h = 0.1, 0.15, 0.225 + the free block), each UNet with about a quarter
of the FM UNet's parameters. Scores on the test split:

- bits per dimension of uniformly dequantised test images, Hutchinson's divergence estimator,
  with its standard error over the images;
- the **classifier Frechet distance** (not FID: the features are those of a small CNN localfm
  trains on the same dataset, :mod:`localfm.classifier`) of several independent sample sets against
  the test images, reported as mean and standard deviation over the sets, next to its floor
  (held-out real images against the same test images).

Each configuration runs for every seed; the summary gives the mean and standard deviation over
seeds. Runs alternate LFM / FM so both see the same background load.

    python benchmarks/bench_images.py --quick                # CI smoke run on 8x8 digits, < 90 s
    python benchmarks/bench_images.py                        # Fashion-MNIST, 3 seeds x 2 x 1 h
    python benchmarks/bench_images.py --budget 600 --seeds 0 --name images_short  # a shorter run
    python benchmarks/bench_images.py --models LFM --name images_lfm  # one model only
    python benchmarks/bench_images.py --study 1 2 4 --bpd-points 100  # re-score the saved models: bits/dim vs ODE steps
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _common first: it sets the OpenMP wait policy before torch loads.
import _common  # noqa: E402, I001
from _common import ROOT, command_line, metadata, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import localfm  # noqa: E402
from localfm.classifier import ClassifierConfig, classifier_for, frechet_distance, train_classifier  # noqa: E402
from localfm.datasets import bits_per_dim, dequantize, load  # noqa: E402
from localfm.metrics import nll_summary  # noqa: E402
from localfm.plots import plot_image_grids  # noqa: E402
from localfm.runs import solver_check  # noqa: E402

UNBOUNDED_STEPS = 1_000_000  # the time budget decides


def configs(quick: bool) -> dict[str, dict]:
    """The LFM config and its FM twin (equal total parameters), from configs/ or, quick, for digits."""
    if quick:
        net = {"kind": "unet", "channel_mult": [1, 2], "blocks_per_level": 1, "attention_resolutions": [4], "heads": 2}
        train = {"batch_size": 32, "lr": 2e-3, "warmup": 5, "grad_clip": 1.0, "ema": 0.99, "interpolant": "linear"}
        base = {
            "data": "digits",
            "data_limit": 300,
            "train": {**train, "push_batch_size": 100},
            "solver": {"method": "rk4", "steps": 1},
        }
        lfm = {**base, "net": {**net, "channels": 8}, "blocks": {"schedule": "list", "h": [0.1, 0.15, 0.225]}}
        fm = {**base, "net": {**net, "channels": 16}, "blocks": {"schedule": "list", "h": []}}
    else:
        lfm = yaml.safe_load((ROOT / "configs" / "fashion_mnist_cpu.yaml").read_text())
        fm = yaml.safe_load((ROOT / "configs" / "fashion_mnist_cpu_fm.yaml").read_text())
    out = {}
    for name, cfg in (("LFM", lfm), ("FM", fm)):
        cfg = copy.deepcopy(cfg)
        cfg["train"]["steps"] = UNBOUNDED_STEPS
        cfg["train"]["log_every"] = 10
        out[name] = cfg
    return out


def score(flow, ds, clf, args, seed: int) -> dict:
    """Bits/dim (with SE) on dequantised test images; classifier Frechet distance over sample sets."""
    levels = ds.levels or 256
    x = dequantize(ds.test[: args.bpd_points], np.random.default_rng([seed, 1]), levels=levels)
    t0 = time.perf_counter()
    lp = flow.log_prob(torch.from_numpy(x), batch_size=256, generator=torch.Generator().manual_seed(seed))
    s = nll_summary(lp)
    bpd_s = time.perf_counter() - t0
    ref = ds.test[: args.samples]
    fds, t0 = [], time.perf_counter()
    for k in range(args.sample_sets):
        g = torch.Generator().manual_seed(10_000 * (seed + 1) + k)
        fds.append(frechet_distance(flow.sample(args.samples, generator=g, batch_size=256), ref, clf))
    # the bits/dim are only exact once the ODE solves have converged: the same check as `localfm eval`
    check = solver_check(flow, torch.from_numpy(x[: args.check_points]), batch_size=256)
    to_bpd = 1.0 / (flow.dim * math.log(2))
    return {
        "bits_per_dim": float(bits_per_dim(s["nll"], flow.dim, levels)),
        "bpd_se": s["nll_se"] / (flow.dim * math.log(2)),
        "bpd_points": s["n"],
        "cfd_mean": statistics.fmean(fds),
        "cfd_sd": statistics.stdev(fds) if len(fds) > 1 else math.nan,
        "cfd_sets": fds,
        "bpd_s": bpd_s,
        "sample_s": time.perf_counter() - t0,
        "check_bpd_diff": check["difference"] * to_bpd,
        "check_bpd_se": check["difference_se"] * to_bpd,
        "check_solver": check["finer_solver"],
    }


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in ("LFM", "FM"):
        rs = [r for r in rows if r["model"] == name]
        if not rs:
            continue

        def ms(key: str, rs=rs) -> str:
            v = [r[key] for r in rs]
            sd = f" ± {statistics.stdev(v):.3g}" if len(v) > 1 else ""
            return f"{statistics.fmean(v):.4g}{sd}"

        out.append(
            {
                "model": name,
                "seeds": len(rs),
                "parameters": rs[0]["parameters"],
                "blocks": rs[0]["blocks"],
                "bits/dim (mean ± sd over seeds)": ms("bits_per_dim"),
                "classifier Frechet distance (mean ± sd over seeds)": ms("cfd_mean"),
                "fit wall s": ms("fit_wall_s"),
                "train steps (total)": ms("total_steps"),
            }
        )
    return out


def solver_study(args, name: str, work: Path) -> None:
    """Bits/dim of the models saved by a run of this script (runs/bench_images/<name>) at several
    solver step counts, on the same dequantised test images: how far each likelihood is from
    converged at its config's solver. Writes results/<name>_study, keeping the rows already there
    for other models and step counts."""
    import dataclasses
    import json

    out = f"{name}_study"
    old = _common.RESULTS / f"{out}.json"
    rows = []  # this invocation's; merged with the file's when writing (another study may run meanwhile)
    ds = load(configs(args.quick)["LFM"]["data"])
    levels = ds.levels or 256
    clf = classifier_for(ds) if args.fd and not args.quick else None
    grid = args.grid_power[0] if len(args.grid_power) == 1 else tuple(args.grid_power)
    grid_name = grid if len(args.grid_power) == 1 else ",".join(f"{p:g}" for p in grid)
    if args.fd and clf is None:
        raise SystemExit("--fd needs the Fashion-MNIST classifier: not with --quick")
    seeds = set()
    for folder in sorted(work.glob("*_seed*")):
        model, seed = folder.name.split("_seed")
        if model.upper() not in args.models or int(seed) not in args.seeds:
            continue
        flow, seed = localfm.load(folder), int(seed)
        seeds.add(seed)
        x = dequantize(ds.test[: args.bpd_points], np.random.default_rng([seed, 1]), levels=levels)
        for factor in args.study:
            solver = dataclasses.replace(flow.solver, steps=flow.solver.steps * factor, grid_power=grid)
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(seed)
            s = nll_summary(flow.log_prob(torch.from_numpy(x), solver=solver, batch_size=256, generator=g))
            fds = []
            for k in range(args.sample_sets if args.fd else 0):  # the sample sets of the run itself
                g = torch.Generator().manual_seed(10_000 * (seed + 1) + k)
                xs = flow.sample(args.samples, generator=g, batch_size=256, solver=solver)
                fds.append(frechet_distance(xs, ds.test[: args.samples], clf))
            rows.append(
                {
                    "model": model.upper(),
                    "seed": seed,
                    "rk4 steps per block": solver.steps,
                    "grid": grid_name,
                    "network evaluations": 4 * solver.steps * len(flow),
                    "bits_per_dim": float(bits_per_dim(s["nll"], flow.dim, levels)),
                    "bpd_se": s["nll_se"] / (flow.dim * math.log(2)),
                    "test images": s["n"],
                    "classifier FD": statistics.fmean(fds) if fds else None,
                    "FD sd": statistics.stdev(fds) if len(fds) > 1 else None,
                    "FD sets": len(fds),
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(rows[-1], flush=True)
    raw = json.loads(old.read_text())["raw"] if old.exists() else {"rows": [], "commands": []}

    def key(r: dict) -> tuple:
        return r["model"], r["seed"], r["rk4 steps per block"], r["grid"]

    mine = {key(r) for r in rows}
    rows += [r for r in raw["rows"] if key(r) not in mine]
    commands = [c for c in raw["commands"] if c != command_line()] + [command_line()]
    columns = list(dict.fromkeys(k for r in rows for k in r))  # rows of earlier runs may lack the FD columns
    rows = [{k: r.get(k) for k in columns} for r in rows]
    rows.sort(key=lambda r: (r["model"] != "LFM", r["seed"], str(r["grid"]), r["rk4 steps per block"]))
    path = write_results(
        out,
        f"Bits/dim against ODE solver steps: the models of results/{name}",
        metadata(sorted(seeds), dataset=ds.name, models=args.models),
        {"Bits/dim against solver steps": rows},
        notes=(
            f"The models saved by the run of results/{name}.md, re-scored on the first {args.bpd_points} "
            "test images (uniformly dequantised, the same images for every line) with more RK4 steps; "
            "`grid` p: steps at (k / steps)^p of each block's time (`solver.grid_power`; 1: equal steps). "
            "Hutchinson divergence: every line has its own probe noise, included in `bpd_se`. `classifier FD` "
            "(with `--fd`): mean and sd over the run's sample sets, drawn from the same noise as the run's own "
            "but with this solver. Bits/dim "
            "are only meaningful where they have stopped moving. Rows measured by: "
            + "; ".join(f"`{c}`" for c in commands)
            + "."
        ),
        raw={"rows": rows, "commands": commands},
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8x8 digits, tiny UNets, seconds of training (< 90 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--budget", type=float, default=None, help="fit seconds per model (default 3600; quick 8)")
    parser.add_argument("--data-limit", type=int, default=None, help="training images (default: the config's)")
    parser.add_argument("--bpd-points", type=int, default=None, help="test images for bits/dim (default 1000)")
    parser.add_argument("--samples", type=int, default=None, help="samples per set (default 1000)")
    parser.add_argument("--sample-sets", type=int, default=None, help="independent sample sets (default 3)")
    parser.add_argument("--check-points", type=int, default=None, help="test images for the solver check (default 100)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None, help="results file name (default images, quick: images_quick)")
    parser.add_argument(
        "--study",
        type=int,
        nargs="+",
        default=None,
        help="re-score the saved models of --name at these multiples of their solver steps (no training)",
    )
    parser.add_argument(
        "--models", nargs="+", default=["LFM", "FM"], help="which models to train (or, with --study, to re-score)"
    )
    parser.add_argument(
        "--grid-power", type=float, nargs="+", default=[1.0], help="with --study: solver.grid_power (one per block)"
    )
    parser.add_argument(
        "--fd", action="store_true", help="with --study: also the classifier Frechet distance of the run's sample sets"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder, models in OUT/models (default benchmarks/results)"
    )
    args = parser.parse_args()
    q = args.quick
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])
    args.budget = args.budget or (10.0 if q else 3600.0)
    args.bpd_points = args.bpd_points or (40 if q else 1000)
    args.samples = args.samples or (180 if q else 1000)
    args.sample_sets = args.sample_sets or (2 if q else 3)
    args.check_points = args.check_points or (10 if q else 100)
    name = args.name or ("images_quick" if q else "images")
    threads = _common.start(args.out, args.threads)
    work = (args.out / "models" if args.out is not None else ROOT / "runs" / "bench_images") / name
    if args.study:
        return solver_study(args, name, work)

    cfgs = configs(q)
    if args.data_limit is not None:
        for cfg in cfgs.values():
            cfg["data_limit"] = args.data_limit
    ds = load(cfgs["LFM"]["data"])
    t0 = time.perf_counter()
    if q:  # a small classifier, trained here (a second or two), not cached
        clf = train_classifier(
            ds.train,
            ds.labels.train,
            ClassifierConfig(channels=(16, 32), features=64, epochs=4),
            x_test=ds.test,
            y_test=ds.labels.test,
        )
    else:
        clf = classifier_for(ds)  # trained once (minutes), cached in the data folder
    classifier_s = time.perf_counter() - t0
    real = frechet_distance(ds.val[: args.samples], ds.test[: args.samples], clf)

    rows, grids = [], {"test images": ds.test[:64]}
    for seed in args.seeds:
        for model, cfg in cfgs.items():  # alternate, so both models see the same background load
            if model not in args.models:
                continue
            x = torch.from_numpy(ds.train[: cfg.get("data_limit")])
            t0, c0 = time.perf_counter(), time.process_time()
            flow = localfm.fit(x, cfg, time_budget=args.budget, seed=seed)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            log = flow.training_log
            row = {
                "model": model,
                "seed": seed,
                "parameters": sum(p.numel() for p in flow.parameters()),
                "blocks": len(flow),
                "train_points": len(x),
                "fit_wall_s": wall,
                "fit_cpu_s": cpu,
                "train_s": sum(b["train_seconds"] for b in log),
                "push_s": sum(b["push_seconds"] for b in log),
                "steps_per_block": ",".join(str(b["steps"]) for b in log),
                "total_steps": sum(b["steps"] for b in log),
                "final_losses": ",".join(f"{b['losses'][-1][1]:.4f}" if b["losses"] else "-" for b in log),
            }
            row.update(score(flow, ds, clf, args, seed))
            rows.append(row)
            localfm.save(flow, work / f"{model.lower()}_seed{seed}")
            g = torch.Generator().manual_seed(seed)
            grids[f"{model} samples, seed {seed}"] = flow.sample(64, generator=g).numpy()
            print(
                f"{model} seed {seed}: bpd {row['bits_per_dim']:.4f} ± {row['bpd_se']:.4f}, classifier FD "
                f"{row['cfd_mean']:.3f} ± {row['cfd_sd']:.3f}, {row['total_steps']} steps in {wall:.0f} s",
                flush=True,
            )

    per_run = [{k: v for k, v in r.items() if k != "cfd_sets"} for r in rows]
    grid_png = plot_image_grids(grids, _common.RESULTS / f"{name}_samples.png")
    kept = f"runs/bench_images/{name}" if args.out is None else f"models/{name} next to this file"
    path = write_results(
        name,
        "LFM vs FM on images: equal total parameters, equal wall-clock",
        metadata(
            args.seeds,
            dataset=ds.name,
            budget_s=args.budget,
            classifier={**clf.info, "seconds_to_get": classifier_s},
            threads=threads,
        ),
        {
            "Summary": summarise(rows),
            "Per run": per_run,
            "Reference": {
                "classifier Frechet distance, real held-out images vs test": real,
                "classifier test accuracy": clf.info.get("test_accuracy"),
                "samples per set / sets": f"{args.samples} / {args.sample_sets}",
                "test images for bits/dim": args.bpd_points,
            },
        },
        notes=(
            "Classifier Frechet distance: the Frechet distance between Gaussians fitted to the "
            "penultimate-layer features of localfm's own small CNN (never FID; not comparable with "
            "published FID values). Lower is better; the 'real held-out images' line is the floor at "
            "this sample size. Bits/dim: uniform dequantisation, Hutchinson divergence, standard error "
            "over test images (it includes the probe noise). Both models get the same wall-clock budget "
            "for `fit`, pushforwards included; on a shared machine wall-clock budgets are noisy "
            "(see `fit_cpu_s`). `check_bpd_diff ± check_bpd_se`: bits/dim of the first test images with "
            "twice the solver steps minus with the model's own (the solver check of `localfm eval`); "
            f"sample grids: {grid_png.name}; models saved in {kept}."
        ),
        section_notes={"Per run": "`cfd_mean ± cfd_sd` are over the independent sample sets of one model."},
        raw={"runs": rows, "configs": cfgs},
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
