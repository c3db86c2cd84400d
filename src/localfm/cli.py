"""The ``localfm`` command line: a thin layer that parses, validates and calls the library.

``localfm train`` and ``localfm eval`` also run under torchrun (``torchrun --nproc-per-node K -m
localfm.cli train CONFIG``): the process group is joined here, from torchrun's environment, and
the run is shared out over the ranks (:mod:`localfm.distributed`); rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from . import __version__

EXAMPLES = {
    "demo": "localfm demo                      # tree density, report in runs/demo\n"
    "  localfm demo --out runs/mine --time-budget 120",
    "train": "localfm train configs/tree_cpu.yaml --out runs/tree\n"
    "  torchrun --standalone --nproc-per-node 2 -m localfm.cli train configs/power_cpu.yaml --out runs/power\n"
    "  localfm train configs/power_cpu.yaml --set train.lr=3e-4 --set blocks.L=2\n"
    "  localfm train configs/power_cpu.yaml --out runs/power --resume\n"
    "  localfm train configs/gas.yaml --set data_root=~/maf-data --dry-run",
    "sample": "localfm sample runs/tree -n 10000 --out samples.npy",
    "eval": "localfm eval runs/tree\n  localfm eval runs/power --split test --max-points 20000",
    "plot": "localfm plot runs/tree",
    "report": "localfm report runs/tree",
    "datasets": "localfm datasets",
    "distill": "localfm distill runs/tree                 # one step per block: runs/tree/distilled-k1\n"
    "  localfm distill runs/tree --steps 2 --group-size 3\n"
    "  localfm distill runs/tree --group-size 9 --width 256   # one wide student for the whole chain\n"
    "  localfm sample runs/tree/distilled-k1 -n 10000\n"
    "  localfm eval runs/tree/distilled-k1",
}


DEMO_BUDGET = 120.0  # seconds of training (pushforward included) for `localfm demo`
# The demo's small networks train faster on 1 thread than on 2: 1.4-2.5x the steps per second,
# 1 and 2 threads alternated in one process with other jobs on the 2-core machine (every small op
# of a 2-thread run waits for its second thread to be scheduled).
DEMO_THREADS = 1


class UsageError(Exception):
    """A user error that the CLI reports in one line with exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="localfm",
        description="Local Flow Matching generative models: train, sample, evaluate, plot.",
        epilog="Run 'localfm COMMAND --help' for each command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"localfm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch (default: torch's choice; `demo` uses 1, see DEMO_THREADS)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog="examples:\n  " + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    d = add("demo", "train a small LFM on the 2-D tree density and write a report")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument(
        "--time-budget", type=float, default=None, help="training seconds, pushforward included (default: 120)"
    )
    d.add_argument("--quick", action="store_true", help="a 30-second smoke version")

    t = add("train", "train an LFM from a YAML config into a run folder")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. train.lr=3e-4 (repeatable)",
    )
    t.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    t.add_argument("--time-budget", type=float, default=None, help="wall-clock seconds for the whole run")
    t.add_argument("--no-eval", action="store_true", help="skip evaluation, plots and report after training")

    s = add("sample", "draw samples from a trained run (data units)")
    s.add_argument("run", help="run folder")
    s.add_argument("-n", type=int, required=True, help="number of samples")
    s.add_argument("--out", default=None, help="output .npy or .csv (default: RUN/samples.npy)")
    s.add_argument("--seed", type=int, default=0)

    e = add("eval", "test NLL with standard error, sample metrics; writes RUN/metrics.json")
    e.add_argument("run", help="run folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--max-points", type=int, default=None, help="evaluate on a random subset of this size")
    e.add_argument("--n-samples", type=int, default=10_000, help="samples for energy distance and MMD")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--fid-weights",
        default=None,
        metavar="FILE",
        help="image runs: add FID proper, with pytorch-fid (installed by you) and its Inception weights file",
    )

    pl = add("plot", "write the figures of a run into RUN/plots")
    pl.add_argument("run", help="run folder")
    pl.add_argument("--n-samples", type=int, default=None, help="default: 40,000 for 2-D data, else 20,000")

    r = add("report", "write RUN/report.md and RUN/report.html from metrics and plots")
    r.add_argument("run", help="run folder")

    add("datasets", "list the datasets localfm knows, with shapes, splits and sources")

    ds = add("distill", "distil every block of a run into a few-step student map for fast sampling")
    ds.add_argument("run", help="run folder")
    ds.add_argument("--steps", type=int, default=1, help="steps per student (default 1)")
    ds.add_argument("--group-size", type=int, default=None, help="merge this many consecutive blocks per student")
    ds.add_argument("--train-steps", type=int, default=None, help="regression steps per student")
    ds.add_argument(
        "--width", type=int, default=None, help="fresh students of this MLP width (default: start from the teacher's)"
    )

    from .policy.cli import add_parser as add_policy_parser

    add_policy_parser(sub)
    return p


def _progress_bar():
    """A tqdm bar per block showing loss, samples/s and time left; closes itself at block ends."""
    from tqdm.auto import tqdm

    state = {"bar": None, "key": None}

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].total = state["bar"].n  # a block ends at its step count or at its deadline
            state["bar"].close()
            state["bar"] = None

    def callback(p) -> None:
        key = (p.phase, p.block)
        if p.phase == "done":
            close()
            return
        if state["key"] != key:
            close()
            desc = f"block {p.block + 1}/{p.n_blocks} " + ("train" if p.phase == "train" else "push ")
            state["bar"] = tqdm(
                total=p.steps,
                initial=p.step,  # the first report comes after log_every steps: no rate from them
                desc=desc,
                unit="step" if p.phase == "train" else "pt",
                unit_scale=p.phase == "push",
                leave=True,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            state["key"] = key
        bar = state["bar"]
        bar.n = p.step
        spent = bar.format_dict["elapsed"]
        if p.phase == "train" and math.isfinite(p.eta) and p.step > bar.initial and spent > 0:
            # Under a time budget a block stops at its deadline: show the steps it will reach.
            bar.total = min(p.steps, p.step + round((p.step - bar.initial) * p.eta / spent))
        if p.phase == "train":
            bar.set_postfix(
                loss=f"{p.loss:.4f}", rate=f"{p.samples_per_s / 1e3:.0f}k/s", left=f"{p.eta:.0f}s", refresh=False
            )
        bar.refresh()

    return callback


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _after_training(run: Path, *, quick: bool = False) -> None:
    from . import distributed
    from .runs import branching_text, evaluate_run, plot_run, write_report

    main = distributed.world().is_main
    if main:
        print("evaluating on the test split ...", file=sys.stderr)
    points, n = (5_000, 2_000) if quick else (None, 5_000)
    if _run_kind(run) == "image":  # Hutchinson likelihoods and ODE samples of UNets: slow on a CPU
        points, n = (100, 200) if quick else (500, 1_000)
    m = evaluate_run(run, max_points=points, n_samples=n)
    if not main:  # the evaluation is shared out; plots and the report are rank 0's
        return
    plot_run(run, n_samples=5_000 if quick else None)
    md, html = write_report(run)
    rows = [("test NLL", f"{m['nll']:.4f} ± {m['nll_se']:.4f} nats")]
    if "true_entropy" in m:
        rows += [("true entropy", f"{m['true_entropy']:.4f} nats"), ("gap", f"{m['gap']:.4f} nats")]
    if "solver_check" in m:
        sc = m["solver_check"]
        rows.append(
            (
                "solver check",
                f"{sc['difference']:+.4f} nats with {sc['finer_solver']}"
                + ("" if sc["converged"] else " (NOT converged)"),
            )
        )
    if "branching" in m:
        rows.append(("fork levels shown", branching_text(m["branching"])))
    if "bits_per_dim" in m:
        rows.append(("bits/dim", f"{m['bits_per_dim']:.4f} ± {m['bits_per_dim_se']:.4f}"))
    if "classifier_frechet_distance" in m:
        floor = m["classifier_frechet_floor"]
        rows.append(
            ("classifier Frechet distance", f"{m['classifier_frechet_distance']:.3f} (real images {floor:.3f})")
        )
    if "energy_distance" in m:
        rows.append(("energy distance", f"{m['energy_distance']:.5f}"))
    rows += [("report", str(html)), ("", str(md))]
    _print_table(rows)


def _run_kind(run: Path) -> str | None:
    from .checkpoint import read_json

    info = read_json(run / "run.json") if (run / "run.json").is_file() else {}
    return (info.get("dataset") or {}).get("kind")


def _summary(flow) -> None:
    rows = []
    for r in flow.training_log:
        h = "free" if r["h"] is None else f"h={r['h']:.4g}"
        loss = r["losses"][-1][1] if r["losses"] else float("nan")
        rows.append(
            (
                f"block {r['block'] + 1} ({h})",
                f"{r['steps']} steps, {r['train_seconds']:.1f} s + push {r['push_seconds']:.1f} s, loss {loss:.4f}",
            )
        )
    _print_table(rows)


def cmd_train(args) -> None:
    from . import distributed
    from .config import load_config, to_dict
    from .runs import train_run

    cfg = load_config(args.config, tuple(args.overrides))
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    distributed.local_batch_size(cfg.train.batch_size, distributed.from_env())
    if args.dry_run:
        import yaml

        from .runs import load_run_data

        if not distributed.from_env().is_main:
            return
        ds = load_run_data(cfg)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        print(f"# data: {ds.name}, {ds.kind}, splits {ds.sizes}, dimension {ds.dim}")
        print(f"# blocks: {cfg.blocks.steps()}  run folder: {out}  (dry run: nothing trained)")
        return
    t0 = time.perf_counter()
    with distributed.session(cfg.device) as world:
        bar = _progress_bar() if world.is_main else None
        flow, run = train_run(cfg, out, resume=args.resume, time_budget=args.time_budget, callback=bar)
        if world.is_main:
            ranks = f" on {world.size} processes" if world.size > 1 else ""
            print(f"trained {len(flow)} blocks{ranks} in {time.perf_counter() - t0:.0f} s; model in {run / 'model'}")
            _summary(flow)
        if not args.no_eval:
            _after_training(run)


def cmd_demo(args) -> None:
    from .runs import train_run

    cfg_path = Path(__file__).with_name("demo.yaml")
    quick = ("train.steps=200", "blocks.L=2", "net.width=64")
    overrides = quick if args.quick else ()
    budget = args.time_budget if args.time_budget is not None else (None if args.quick else DEMO_BUDGET)
    out = Path(args.out)
    print(f"localfm demo: training an LFM on the 2-D tree density into {out}", file=sys.stderr)
    t0 = time.perf_counter()
    flow, run = train_run(
        cfg_path,
        out,
        overrides=overrides,
        time_budget=budget,
        callback=_progress_bar(),
        resume=(out / "checkpoints").exists() and not (out / "model").exists(),
    )
    _summary(flow)
    _after_training(run, quick=args.quick)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s. Open {run / 'report.html'}")


def cmd_sample(args) -> None:
    from .runs import sample_run

    if args.n < 1:
        raise UsageError(f"-n must be a positive number of samples, got {args.n}")
    x, out = sample_run(args.run, args.n, args.out, seed=args.seed)
    size = f"dimension {x.shape[1]}" if x.ndim == 2 else f"shape {tuple(x.shape[1:])}"
    print(f"wrote {len(x):,} samples of {size} to {out}")


def cmd_eval(args) -> None:
    from . import distributed
    from .runs import branching_text, evaluate_run

    with distributed.session("cpu"):  # a loaded run lives on the CPU: gloo
        m = evaluate_run(
            args.run,
            split=args.split,
            max_points=args.max_points,
            n_samples=args.n_samples,
            seed=args.seed,
            fid_weights=args.fid_weights,
        )
        if not distributed.world().is_main:
            return
    nested = ("solver_check", "branching")
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in m.items() if k not in nested]
    if "branching" in m:
        rows.append(("branching", branching_text(m["branching"])))
    if "solver_check" in m:
        sc = m["solver_check"]
        rows.append(
            ("solver_check", f"{sc['difference']:+.4f} nats with {sc['finer_solver']} (converged: {sc['converged']})")
        )
    _print_table(rows)
    print(f"wrote {Path(args.run) / 'metrics.json'}")


def cmd_plot(args) -> None:
    from .runs import plot_run

    for path in plot_run(args.run, n_samples=args.n_samples):
        print(path)


def cmd_report(args) -> None:
    from .runs import write_report

    for path in write_report(args.run):
        print(path)


def cmd_datasets(args) -> None:
    from .datasets import list_datasets

    infos = list_datasets()
    header = ("name", "kind", "dim", "train / val / test", "source")
    rows = []
    for info in infos:
        sizes = " / ".join(f"{s:,}" for s in info.sizes) if getattr(info, "sizes", None) else "from your files"
        rows.append((info.name, info.kind, str(info.dim or "any"), sizes, info.source))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


def cmd_distill(args) -> None:
    from .runs import distill_run_cli

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    out = distill_run_cli(
        args.run,
        args.steps,
        group_size=args.group_size,
        train_steps=args.train_steps,
        width=args.width,
        callback=_progress_bar(),
    )
    print(f"distilled model in {out}; sample with: localfm sample {out} -n 10000")


def cmd_policy(args) -> None:
    from .policy.cli import run

    run(args)


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "report": cmd_report,
    "datasets": cmd_datasets,
    "distill": cmd_distill,
    "policy": cmd_policy,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .training import TrainingDivergedError

    try:
        from .distributed import from_env

        if from_env().size > 1 and args.command not in ("train", "eval"):
            raise UsageError(f"localfm {args.command} runs in one process; only train and eval run under torchrun")
        threads = args.threads if args.threads is not None else (DEMO_THREADS if args.command == "demo" else None)
        if threads is not None:
            if threads < 1:
                raise UsageError(f"--threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        COMMANDS[args.command](args)
    except (
        UsageError,
        ValueError,
        TypeError,
        FileNotFoundError,
        ImportError,  # an optional package a command needs: the message says how to install it
        CheckpointError,
        TrainingDivergedError,
    ) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"localfm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("localfm: interrupted; the last checkpoint is kept (use --resume to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
