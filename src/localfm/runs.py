"""Run folders: train a config into a folder, then evaluate, plot and report from it.

A run folder holds ``config.yaml`` (the resolved config), ``run.json`` (package version, git
revision, command, dataset), ``checkpoints/``, ``model/`` (the final flow), ``log.jsonl``
(progress events), ``metrics.json``, ``plots/`` and ``report.md`` / ``report.html``.

Under torchrun (after :func:`localfm.distributed.init`) :func:`train_run` and :func:`evaluate_run`
run on every rank: the work is shared out, rank 0 alone writes into the run folder.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import __version__, distributed
from .checkpoint import atomic_write_bytes, load, read_json, save, write_json
from .config import FlowConfig, load_config, to_dict
from .flow import LocalFlow
from .metrics import energy_distance, mmd, nll_summary
from .ode import SolverConfig
from .training import Progress, fit

__all__ = ["train_run", "evaluate_run", "plot_run", "write_report", "sample_run", "load_run_data", "git_revision"]

log = logging.getLogger(__name__)


def git_revision() -> str | None:
    """The git revision of the source tree localfm runs from, or None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_run_data(cfg: FlowConfig):
    """The dataset a config names (``cfg.data``), loaded with ``cfg.data_root``."""
    from . import datasets

    if not cfg.data:
        raise ValueError("the config names no data: set data: <dataset name or file path>")
    return datasets.load(cfg.data, root=cfg.data_root, seed=cfg.seed)


def train_run(
    config: FlowConfig | str | Path | dict | None,
    out: str | Path,
    *,
    overrides: tuple[str, ...] = (),
    resume: bool = False,
    time_budget: float | None = None,
    callback: Callable[[Progress], None] | None = None,
) -> tuple[LocalFlow, Path]:
    """Train the config into the run folder ``out`` and save the final model in ``out/model``.

    Under torchrun every rank calls this; ``callback`` is called on rank 0 only, and ``run.json``
    records the world size and every rank's parameter digest (all equal, else an error is logged).
    """
    cfg = load_config(config, overrides)
    out = Path(out)
    world = distributed.world()
    distributed.local_batch_size(cfg.train.batch_size, world)
    if out.exists() and (out / "model").exists() and not resume:
        raise ValueError(f"run folder {out} already holds a trained model; choose another --out or pass --resume")
    # With --resume, the checkpoint itself decides which changes are allowed (the learning rate, say).
    with distributed.main_first():  # rank 0 builds a missing dataset cache, the others read it
        ds = load_run_data(cfg)
    info = {
        "localfm_version": __version__,
        "git_revision": git_revision(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {"name": ds.name, "kind": ds.kind, "source": ds.source, "sizes": list(ds.sizes)},
        "time_budget": time_budget,
        "world_size": world.size,
    }
    log_file = None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
        write_json(out / "run.json", info)
        log_file = open_log(out / "log.jsonl")

    def on_progress(p: Progress) -> None:
        if p.phase != "push" or p.step == p.steps:
            log_file.write(json.dumps(p.__dict__) + "\n")
            log_file.flush()
        if callback is not None:
            callback(p)

    t0 = time.perf_counter()
    try:
        flow = fit(
            torch.from_numpy(ds.train[: cfg.data_limit]),
            cfg,
            time_budget=time_budget,
            callback=on_progress if world.is_main else None,
            run_dir=out,
            resume=resume,
        )
    finally:
        if log_file is not None:
            log_file.close()
    info["train_seconds"] = time.perf_counter() - t0
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if world.size > 1:  # DDP keeps the replicas equal; check that they ended equal
        info["rank_digests"] = distributed.all_gather_object(distributed.digest(flow))
        info["replicas_identical"] = len(set(info["rank_digests"])) == 1
        if not info["replicas_identical"]:
            log.error("the ranks ended with different parameters: %s", info["rank_digests"])
    if world.is_main:
        save(flow, out / "model")
        write_json(out / "run.json", info)
    distributed.barrier()  # the model is on disk before any rank goes on to use the folder
    return flow, out


def _flow_of(run: Path) -> LocalFlow:
    run = Path(run)
    if not (run / "model").is_dir():
        raise FileNotFoundError(f"{run} is not a finished run: no model/ folder (train it with localfm train)")
    return load(run / "model")


def _model_of(path: Path):
    """The model behind ``path``: a run folder's flow, or a distilled model's folder.

    Returns ``(model, data_config)``; the data config names the dataset the model was trained on.
    """
    from .distill import is_distilled, load_distilled

    path = Path(path)
    if is_distilled(path):
        model = load_distilled(path)
        return model, model.teacher_config
    flow = _flow_of(path)
    return flow, flow.config


def distill_run_cli(
    run: str | Path,
    steps: int = 1,
    *,
    group_size: int | None = None,
    train_steps: int | None = None,
    width: int | None = None,
    callback=None,
) -> Path:
    """Distil a run's model into ``run/distilled-k{steps}`` (see :mod:`localfm.distill`); ``width``
    builds fresh students of that MLP width instead of starting them from the teacher's weights."""
    from .distill import distill_run

    config: dict[str, Any] = {"train_steps": train_steps} if train_steps is not None else {}
    if width is not None:
        config |= {"width": width, "init": "fresh"}
    return distill_run(
        run,
        steps,
        load_data=lambda cfg: torch.from_numpy(load_run_data(cfg).train),
        config=config,
        group_size=group_size,
        callback=callback,
    )


def evaluate_run(
    run: str | Path,
    *,
    split: str = "test",
    max_points: int | None = None,
    n_samples: int = 10_000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    fid_weights: str | Path | None = None,
) -> dict[str, Any]:
    """Test NLL (nats, with standard error), bits/dim for images, and sample metrics; writes metrics.json.

    ``fid_weights``: for image runs, also FID proper with pytorch-fid and this Inception weights
    file (:mod:`localfm.fid`; checked before the slow work starts).

    Under torchrun the likelihood and the samples are shared out over the ranks (each rank draws
    from its own generator, derived from ``seed``); every rank returns the metrics, rank 0 writes them.
    """
    run = Path(run)
    flow, cfg = _model_of(run)
    ds = load_run_data(cfg)
    fid_net = None
    if fid_weights is not None:
        if ds.kind != "image":
            raise ValueError(f"FID is for images; this run's data ({ds.name}) are not images: drop --fid-weights")
        from .fid import inception_network

        fid_net = inception_network(fid_weights)
    x = ds.split(split)
    if max_points is not None and max_points < len(x):
        x = x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
    batch = 4096
    if ds.kind == "image":  # a density of uniformly dequantised pixels: bits/dim bound the discrete NLL
        from .datasets import dequantize

        x, batch = dequantize(x, np.random.default_rng([seed, 1]), levels=ds.levels or 256), 256
        n_samples = min(n_samples, len(ds.test))  # as many samples as reference images
    g = torch.Generator().manual_seed(seed)
    metrics: dict[str, Any] = {"split": split}
    if isinstance(flow, LocalFlow):  # a distilled model has samples, not an exact likelihood
        t0 = time.perf_counter()
        lp = distributed.map_sharded(
            lambda xs: flow.log_prob(xs, generator=distributed.rank_generator(g), progress=progress, batch_size=batch),
            torch.from_numpy(x),
        )
        metrics.update(nll_summary(lp), log_prob_seconds=time.perf_counter() - t0)
        if ds.kind == "image":
            metrics.update(_bits_per_dim(metrics, flow.dim, ds.levels or 256))
        else:
            metrics["solver_check"] = solver_check(flow, torch.from_numpy(x[:1000]), batch)
        if ds.log_prob is not None and ds.sampler is not None:
            from .datasets import true_entropy

            h = true_entropy(ds, n=100_000, seed=seed)
            metrics.update(true_entropy=h.value, true_entropy_se=h.stderr, gap=metrics["nll"] - h.value)
        if "drawing" in ds.meta:  # a drawing with forks: how many of their levels the model shows
            metrics["branching"] = tree_branching(flow, ds)
    else:
        metrics["network_evaluations_per_sample"] = flow.nfe
    t0 = time.perf_counter()
    samples = _sample(flow, n_samples, torch.Generator().manual_seed(seed + 1), batch)
    metrics["sample_seconds"] = time.perf_counter() - t0
    ref = torch.from_numpy(ds.test[:n_samples]).double()
    if ds.kind != "image":
        metrics["energy_distance"] = energy_distance(samples[: len(ref)], ref)
        metrics["mmd"] = mmd(samples[: len(ref)], ref)
    elif ds.labels is not None:
        metrics.update(_classifier_frechet(ds, samples, ds.test[:n_samples]))
    if fid_net is not None:
        from .fid import fid

        metrics.update(fid=fid(samples, ds.test[:n_samples], fid_net), fid_points=[len(samples), n_samples])
    metrics["parameters"] = sum(p.numel() for p in flow.parameters())
    metrics["blocks"] = len(flow)
    metrics["dataset"] = ds.name
    metrics["world_size"] = distributed.world().size
    if distributed.world().is_main:
        write_json(run / "metrics.json", metrics)
    distributed.barrier()
    return metrics


def open_log(path: Path):
    """``path`` opened for appending JSON lines; a partial last line (a run killed mid-write) is cut
    off first, so that a resumed run's lines stay one JSON object each."""
    if path.exists() and path.stat().st_size:
        with path.open("r+b") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # only a cut log is read whole
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
    return path.open("a")


def tree_branching(flow: LocalFlow, ds) -> dict[str, Any]:
    """How many levels of the tree's forks the learned density shows, next to the true density's
    (:func:`localfm.datasets.drawings.branching_levels`; the true one is the ceiling: the deepest
    forks of the drawing lie closer together than its one-pixel blur)."""
    from .datasets.drawings import branching_levels

    drawing, pixel = ds.meta["drawing"], ds.meta["pixel"]

    def model(pts: np.ndarray) -> np.ndarray:
        return flow.log_prob(torch.from_numpy(pts).float()).double().numpy()

    return {"model": branching_levels(model, drawing, pixel), "target": branching_levels(ds.log_prob, drawing, pixel)}


def branching_text(b: dict[str, Any]) -> str:
    """One line for reports: fork levels shown by the model and by the target."""
    return f"{b['model']['levels']} of {b['model']['of']} (the target density: {b['target']['levels']})"


SOLVER_TOLERANCE = 0.02  # nats: a larger change of the NLL under a finer solver is reported as unconverged


def solver_check(
    flow: LocalFlow, x: torch.Tensor, batch_size: int = 4096, finer: SolverConfig | None = None
) -> dict[str, Any]:
    """Mean NLL of ``x`` with the flow's solver and with a finer one (default: twice the steps, or
    tolerances / 100): an exact likelihood is only exact once the ODE solves have converged.

    Fields whose velocity varies quickly in x (random Fourier features, long training) can need many
    more steps than smooth ones; a likelihood from an unconverged solve is not a bound on anything.
    ``difference`` (finer minus own, nats) has its standard error over the points; ``finer_seconds``
    is the time of the finer solve.
    """
    solver = flow.solver
    if finer is None:
        finer = (
            dataclasses.replace(solver, rtol=solver.rtol / 100, atol=solver.atol / 100)
            if solver.adaptive
            else dataclasses.replace(solver, steps=2 * solver.steps)
        )
    own = flow.log_prob(x, batch_size=batch_size).double()
    t0 = time.perf_counter()
    fine = flow.log_prob(x, solver=finer, batch_size=batch_size).double()
    seconds = time.perf_counter() - t0
    gaps = own - fine  # NLL with the finer solver minus NLL with the own one, per point
    diff = float(gaps.mean())
    converged = abs(diff) <= SOLVER_TOLERANCE
    if not converged:
        log.warning(
            "the likelihood has not converged in the ODE solver: the mean NLL of %d test points moves by "
            "%+.3f nats from %s to %s. Raise solver.steps (or lower the tolerances) for training and evaluation",
            len(x),
            diff,
            _solver_name(solver),
            _solver_name(finer),
        )
    return {
        "points": len(x),
        "solver": _solver_name(solver),
        "finer_solver": _solver_name(finer),
        "nll": float(-own.mean()),
        "nll_finer": float(-fine.mean()),
        "difference": diff,
        "difference_se": float(gaps.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0,
        "finer_seconds": seconds,
        "converged": converged,
    }


def _solver_name(s) -> str:
    if s.adaptive:
        return f"{s.method} rtol {s.rtol:g} atol {s.atol:g}"
    if isinstance(s.grid_power, tuple):
        return f"{s.method} x{s.steps} on t^p grids, p = {', '.join(f'{p:g}' for p in s.grid_power)} by block"
    return f"{s.method} x{s.steps}" + (f" on a t^{s.grid_power:g} grid" if s.grid_power != 1 else "")


def _sample(flow: LocalFlow, n: int, generator: torch.Generator, batch_size: int = 65536) -> torch.Tensor:
    """``flow.sample(n)``, each rank drawing its share from its own generator (``generator`` on rank 0)."""
    a, b = distributed.shard_bounds(n)
    local = flow.sample(max(b - a, 1), generator=distributed.rank_generator(generator), batch_size=batch_size)[: b - a]
    return distributed.gather(local, n)


def _bits_per_dim(m: dict[str, Any], dim: int, levels: int) -> dict[str, Any]:
    """Bits/dim of the dequantised test images (``datasets.bits_per_dim``) with the standard error of
    the mean. Each point's log-density carries its own Hutchinson probe noise, so the standard error
    over points includes the estimator's variance."""
    from .datasets import bits_per_dim

    return {
        "bits_per_dim": float(bits_per_dim(m["nll"], dim, levels)),
        "bits_per_dim_se": m["nll_se"] / (dim * math.log(2)),
        "levels": levels,
        "likelihood": "uniform dequantisation, Hutchinson divergence (Rademacher probes)",
    }


def _classifier_frechet(ds, samples: torch.Tensor, reference: np.ndarray) -> dict[str, Any]:
    """Classifier Frechet distance (:mod:`localfm.classifier`, not FID) of samples to test images, and
    its floor: the same distance from held-out real images (the validation split) at the same size."""
    from .classifier import classifier_for, frechet_distance

    clf = classifier_for(ds)
    n = min(len(samples), len(ds.val), len(reference))
    return {
        "classifier_frechet_distance": frechet_distance(samples, reference, clf),
        "classifier_frechet_floor": frechet_distance(ds.val[:n], reference[:n], clf),
        "classifier_frechet_points": [len(samples), len(reference)],
        "classifier_test_accuracy": clf.info.get("test_accuracy"),
    }


def sample_run(run: str | Path, n: int, out: str | Path | None = None, *, seed: int = 0) -> tuple[np.ndarray, Path]:
    """``n`` samples in data units from a run or a distilled model, written to ``out`` (.npy or .csv;
    default ``run/samples.npy``)."""
    run = Path(run)
    flow, _ = _model_of(run)
    out = Path(out) if out is not None else run / "samples.npy"
    if out.suffix not in (".npy", ".csv"):
        raise ValueError(f"--out must end in .npy or .csv, got {out.name}")
    batch = 256 if len(flow.event_shape) == 3 else 65536  # UNet activations of a batch of images add up
    x = flow.sample(n, generator=torch.Generator().manual_seed(seed), batch_size=batch).double().numpy()
    if out.suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, x)
        atomic_write_bytes(out, buf.getvalue())
    else:
        lines = [",".join(f"x{i}" for i in range(math.prod(flow.event_shape)))] + [  # images: C*H*W values a row
            ",".join(f"{v:.9g}" for v in row) for row in x.reshape(len(x), -1)
        ]
        atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return x, out


def plot_run(run: str | Path, *, n_samples: int | None = None, seed: int = 0) -> list[Path]:
    """All figures of a run into ``run/plots``; returns their paths.

    ``n_samples`` defaults to 40,000 for 2-D data (thin structures need many points to show; the
    target then comes from the dataset's sampler when it has one) and 20,000 otherwise.
    """
    from . import plots

    run = Path(run)
    flow = _flow_of(run)
    ds = load_run_data(flow.config)
    folder = run / "plots"
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    made = [plots.plot_losses(flow.training_log, folder / "losses.png")]
    if ds.kind == "image":
        return made + _image_figures(flow, ds, folder, g, min(n_samples or 64, 64))
    n = n_samples or (40_000 if flow.dim == 2 else 20_000)
    samples = flow.sample(n, generator=g).double().numpy()
    test = ds.test[:n].astype(np.float64)
    if flow.dim == 2:
        box = plots.box_2d(test)
        target = ds.sampler(n, np.random.default_rng([seed, 2])) if ds.sampler is not None else test
        made.append(plots.plot_samples_2d(samples, target, folder / "samples.png", box))
        m = min(len(test), 5_000)
        enc = flow.encode(torch.from_numpy(test[:m]), return_path=True)
        dec = flow.decode(torch.randn(m, 2, generator=g), return_path=True)
        # Paths are in the standardised coordinates where the blocks act; the data ends in data units.
        enc_path = [test[:m]] + [p.double().numpy() for p in enc.path[1:]]
        dec_path = [p.double().numpy() for p in dec.path[:-1]] + [dec.x.double().numpy()]
        made.append(plots.plot_block_paths(enc_path, dec_path, folder / "blocks.png", box))
        made.append(
            plots.plot_density_2d(
                lambda grid: flow.log_prob(torch.from_numpy(grid)).double().numpy(),
                folder / "density.png",
                box,
                ds.log_prob,
            )
        )
    else:
        made.append(plots.plot_marginals(samples, test, folder / "marginals.png"))
    return made


def _image_figures(flow: LocalFlow, ds, folder: Path, g: torch.Generator, n: int) -> list[Path]:
    """A grid of samples beside test images, and one test image carried to noise and back."""
    from . import plots

    samples = flow.sample(n, generator=g, batch_size=256).double().numpy()
    made = [plots.plot_image_grids({"test images": ds.test[:n], "samples": samples}, folder / "samples.png")]
    x = torch.from_numpy(ds.test[:1])
    enc = flow.encode(x, return_path=True)
    # The blocks act on standardised images: show every stage in data units.
    forward = [x.double()] + [flow.standardizer.inverse(p).double() for p in enc.path[1:]]
    back = [flow.standardizer.inverse(p).double() for p in flow.decode(enc.x, return_path=True).path]
    made.append(
        plots.plot_image_blocks(
            [p[0].numpy() for p in forward], [p[0].double().numpy() for p in back], folder / "blocks.png"
        )
    )
    return made


def write_report(run: str | Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` with the figures and numbers of a run."""
    run = Path(run)
    info = read_json(run / "run.json") if (run / "run.json").exists() else {}
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").exists() else {}
    flow = _flow_of(run)
    rows = [("dataset", metrics.get("dataset", info.get("dataset", {}).get("name")))]
    if "nll" in metrics:
        rows.append(("test NLL (nats)", f"{metrics['nll']:.4f} ± {metrics['nll_se']:.4f} ({metrics['n']:,} points)"))
    if "true_entropy" in metrics:
        rows.append(("true entropy (nats)", f"{metrics['true_entropy']:.4f} ± {metrics['true_entropy_se']:.4f}"))
        rows.append(("gap NLL − entropy (≈ KL)", f"{metrics['gap']:.4f}"))
    if "solver_check" in metrics:
        sc = metrics["solver_check"]
        verdict = "converged" if sc["converged"] else "NOT converged: raise solver.steps"
        rows.append(
            (
                "solver check (mean NLL)",
                f"{sc['nll']:.4f} with {sc['solver']}, {sc['nll_finer']:.4f} with {sc['finer_solver']} "
                f"({sc['points']:,} points): {verdict}",
            )
        )
    if "branching" in metrics:
        rows.append(("fork levels shown (branches ≥ 2x as dense as the gap)", branching_text(metrics["branching"])))
    if "bits_per_dim" in metrics:
        se = f" ± {metrics['bits_per_dim_se']:.4f}" if "bits_per_dim_se" in metrics else ""
        rows.append(("bits/dim (dequantised test images)", f"{metrics['bits_per_dim']:.4f}{se}"))
    if "classifier_frechet_distance" in metrics:
        rows.append(
            (
                "classifier Frechet distance (not FID)",
                f"{metrics['classifier_frechet_distance']:.3f} (real held-out images: "
                f"{metrics['classifier_frechet_floor']:.3f}; classifier test accuracy "
                f"{metrics['classifier_test_accuracy']:.3f})",
            )
        )
    for key, label in [("energy_distance", "energy distance (samples vs test)"), ("mmd", "MMD² (samples vs test)")]:
        if key in metrics:
            rows.append((label, f"{metrics[key]:.5f}"))
    train_s = sum(r["train_seconds"] for r in flow.training_log)
    push_s = sum(r["push_seconds"] for r in flow.training_log)
    rows += [
        ("blocks", f"{len(flow)} ({', '.join('free' if b.h is None else f'{b.h:.3g}' for b in flow.blocks)})"),
        ("parameters", f"{sum(p.numel() for p in flow.parameters()):,}"),
        ("training time", f"{train_s:.1f} s training + {push_s:.1f} s pushforward"),
        ("localfm", f"{info.get('localfm_version', __version__)} (git {info.get('git_revision')})"),
    ]
    figures = [
        p
        for p in ["samples.png", "blocks.png", "density.png", "marginals.png", "losses.png"]
        if (run / "plots" / p).exists()
    ]
    md = ["# localfm run report", "", f"Run folder: `{run.name}`", "", "| quantity | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md += [""] + [f"![{f}](plots/{f})\n" for f in figures]
    blocks = ["| block | h | steps | train s | push s | final loss |", "|---|---|---|---|---|---|"]
    for r in flow.training_log:
        final = r["losses"][-1][1] if r["losses"] else float("nan")
        h = "free" if r["h"] is None else f"{r['h']:.4g}"
        blocks.append(
            f"| {r['block'] + 1} | {h} | {r['steps']} | {r['train_seconds']:.1f} "
            f"| {r['push_seconds']:.1f} | {final:.4f} |"
        )
    md += ["## Blocks", ""] + blocks
    md_path = run / "report.md"
    atomic_write_bytes(md_path, ("\n".join(md) + "\n").encode())
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    imgs = "".join(
        f'<figure><img src="plots/{f}" style="max-width:100%"><figcaption>{f}</figcaption></figure>' for f in figures
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>localfm report</title></head>"
        f"<body style='font-family:sans-serif;max-width:1100px;margin:auto'><h1>localfm run report</h1>"
        f"<table border='1' cellpadding='4' style='border-collapse:collapse'>{body}</table>{imgs}</body></html>"
    )
    html_path = run / "report.html"
    atomic_write_bytes(html_path, page.encode())
    return md_path, html_path
