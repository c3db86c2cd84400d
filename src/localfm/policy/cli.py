"""``localfm policy collect|train|eval|distill``: parse, validate, call the library, print one summary."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EXAMPLES = (
    "localfm policy collect --task push --episodes 10 --out runs/demos/push-10.npz\n"
    "  localfm policy train configs/policy_lfm.yaml --set demos=[runs/demos/push-10.npz] --out runs/push-lfm\n"
    "  localfm policy eval runs/push-lfm --episodes 50\n"
    "  localfm policy distill runs/push-lfm --demos runs/demos/push-10.npz\n"
    "  localfm policy eval runs/push-lfm/distilled-k1 --episodes 50"
)


def add_parser(sub) -> None:
    """Register ``policy`` and its subcommands on the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "policy",
        help="robot policies on Meta-World: collect demonstrations, train, evaluate, distil",
        description="Action-chunk policies with a conditional LFM (or FM) action generator, on Meta-World.",
        epilog="examples:\n  " + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")

    c = ps.add_parser("collect", help="scripted-expert demonstrations of a Meta-World task (.npz)")
    c.add_argument(
        "--task", required=True, help="Meta-World task, e.g. push or pick-place (any with a scripted expert)"
    )
    c.add_argument("--episodes", type=int, required=True, help="successful episodes to record")
    c.add_argument("--seed", type=int, default=0, help="reset seed of the first episode (default 0)")
    c.add_argument("--out", default=None, help="output .npz (default runs/demos/TASK-N.npz)")

    t = ps.add_parser("train", help="train a policy from a YAML config (configs/policy_lfm.yaml, policy_fm.yaml)")
    t.add_argument("config", help="policy YAML config")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--demos", nargs="+", default=None, help="demonstration files (replace the config's demos)")
    t.add_argument("--out", default=None, help="policy folder (default runs/policy-<config name>)")
    t.add_argument("--time-budget", type=float, default=None, help="training seconds (default: the config's)")
    t.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and parameter count, train nothing"
    )

    e = ps.add_parser("eval", help="success rate (95%% interval), episode length, ms per action; RUN/eval.json")
    e.add_argument("run", help="policy folder")
    e.add_argument("--episodes", type=int, default=50)
    e.add_argument("--task", default=None, help="task to evaluate (default: every task of the policy)")
    e.add_argument("--seed", type=int, default=None, help="first evaluation reset seed (default 1000000)")
    e.add_argument("--frames", type=int, default=8, help="frames in the rollout strip (0: none)")
    e.add_argument("--batch", type=int, default=25, help="episodes run side by side")

    d = ps.add_parser("distill", help="distil a policy's flow to one network evaluation per block")
    d.add_argument("run", help="policy folder")
    d.add_argument("--demos", nargs="+", default=None, help="its demonstration files (default: the config's)")
    d.add_argument("--train-steps", type=int, default=3000, help="regression steps per student")
    d.add_argument("--out", default=None, help="output policy folder (default RUN/distilled-k1)")


def _usage(msg: str):
    from ..cli import UsageError

    return UsageError(msg)


def _load_demos(files):
    from .data import Demonstrations

    if not files:
        raise _usage("no demonstrations: set demos in the config or pass --demos FILE (from localfm policy collect)")
    demos = None
    for f in files:
        d = Demonstrations.load(f)
        demos = d if demos is None else demos + d
    return demos


def _metaworld():
    try:
        from . import metaworld
    except ImportError as err:
        raise _usage(str(err)) from None
    try:
        metaworld.task_names()
    except ImportError as err:
        raise _usage(str(err)) from None
    return metaworld


def cmd_collect(args) -> None:
    mw = _metaworld()
    if args.episodes < 1:
        raise _usage(f"--episodes must be >= 1, got {args.episodes}")
    task = mw.canonical_task(args.task)
    out = Path(args.out or f"runs/demos/{task}-{args.episodes}.npz")
    t0 = time.perf_counter()
    try:
        demos = mw.collect(task, args.episodes, seed=args.seed)
    except RuntimeError as err:
        raise _usage(str(err)) from None
    demos.save(out)
    lengths = [len(o) for o in demos.obs]
    print(
        f"{len(demos)} expert episodes of {task} (seeds {demos.seeds[0]}..{demos.seeds[-1]}, "
        f"mean length {sum(lengths) / len(lengths):.0f} steps) in {time.perf_counter() - t0:.1f} s -> {out}"
    )


def _param_count(cfg, demos) -> int:
    import dataclasses

    from ..nets import build_net

    tasks = sorted(set(demos.tasks))
    c = cfg.obs_horizon * demos.obs_dim + (len(tasks) if len(tasks) > 1 else 0)
    net_cfg = dataclasses.replace(cfg.flow.net, context_dim=c)
    per_block = sum(p.numel() for p in build_net(cfg.pred_horizon * demos.action_dim, net_cfg).parameters())
    return per_block * len(cfg.flow.blocks.steps())


def cmd_train(args) -> None:
    import yaml

    from ..config import to_dict
    from .model import PolicyConfig
    from .train import train_policy

    cfg = PolicyConfig.load(args.config, args.overrides)
    if args.demos:
        cfg = cfg.replace(demos=tuple(args.demos))
    if args.time_budget is not None:
        if not args.time_budget > 0:
            raise _usage(f"--time-budget must be > 0 seconds, got {args.time_budget}")
        cfg = cfg.replace(time_budget=args.time_budget)
    demos = _load_demos(cfg.demos)
    n_params = _param_count(cfg, demos)
    out = Path(args.out or f"runs/policy-{Path(args.config).stem}")
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        print(
            f"# {len(demos)} episodes, tasks {sorted(set(demos.tasks))}, "
            f"{n_params:,} parameters in {len(cfg.flow.blocks.steps())} block(s)"
        )
        return
    print(f"training {len(cfg.flow.blocks.steps())} block(s), {n_params:,} parameters, on {len(demos)} episodes")
    policy = train_policy(demos, cfg)
    policy.save(out)
    info = policy.info
    print(
        f"policy in {out}: {info['parameters']:,} parameters, {info['windows']} windows, "
        f"steps per block {info['steps_per_block']}, {info['train_seconds']:.0f} s; "
        f"evaluate with: localfm policy eval {out} --episodes 50"
    )


def _strip(frames, path: Path) -> None:
    import numpy as np
    from matplotlib import image

    image.imsave(path, np.concatenate(list(frames), axis=1))


def _trajectory_plot(traj: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    hand, obj = np.asarray(traj["hand"]), np.asarray(traj["object"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    axes[0].plot(hand[:, 0], hand[:, 1], label="end effector")
    axes[0].plot(obj[:, 0], obj[:, 1], label="object")
    if traj.get("goal"):
        axes[0].scatter([traj["goal"][0]], [traj["goal"][1]], marker="*", s=120, color="k", label="goal")
    axes[0].set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(fontsize=7)
    axes[1].plot(hand[:, 2], label="end effector z")
    axes[1].plot(obj[:, 2], label="object z")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_eval(args) -> None:
    import torch

    from ..checkpoint import write_json
    from .model import load_policy

    mw = _metaworld()
    if args.episodes < 1 or args.batch < 1 or args.frames < 0:
        raise _usage("--episodes and --batch must be >= 1 and --frames >= 0")
    run = Path(args.run)
    policy = load_policy(run)
    tasks = [mw.canonical_task(args.task)] if args.task else policy.tasks
    seed = mw.EVAL_SEED if args.seed is None else args.seed
    results, lines = {}, []
    for i, task in enumerate(tasks):
        r = mw.evaluate(
            policy,
            task,
            args.episodes,
            seed=seed,
            batch=args.batch,
            generator=torch.Generator().manual_seed(0),
            frames=args.frames if i == 0 else 0,
        )
        results[task] = r.summary()
        lines.append(
            f"{task}: success {r.success_rate:.2f} [{r.interval[0]:.2f}, {r.interval[1]:.2f}] "
            f"over {r.episodes} episodes, "
            f"mean length {r.mean_length:.0f}, {r.ms_per_action:.3f} ms/action (batched), "
            f"{r.ms_per_plan_single:.2f} ms/plan (one episode)"
        )
        if i == 0 and args.frames:
            if r.frames:
                _strip(r.frames, run / "rollout.png")
                lines.append(f"rollout strip of seed {seed}: {run / 'rollout.png'}")
            else:
                lines.append(
                    f"no offscreen renderer here ({r.trajectory.get('render_error')}); trajectory plot instead"
                )
            _trajectory_plot(r.trajectory, run / "trajectory.png", f"{task}, seed {seed}")
    metrics = {
        "episodes": args.episodes,
        "first_seed": seed,
        "tasks": results,
        "mean_success": sum(v["success_rate"] for v in results.values()) / len(results),
        "parameters": policy.n_parameters(),
        "distilled": policy.distilled,
    }
    write_json(run / "eval.json", metrics)
    print("\n".join(lines))
    print(f"metrics in {run / 'eval.json'}")


def cmd_distill(args) -> None:
    import torch

    from ..distill import DistillConfig
    from .model import load_policy
    from .train import distill_policy

    if args.train_steps < 1:
        raise _usage(f"--train-steps must be >= 1, got {args.train_steps}")
    run = Path(args.run)
    policy = load_policy(run)
    demos = _load_demos(args.demos or policy.config.demos)
    cfg = DistillConfig(
        steps_per_block=1, train_steps=args.train_steps, batch_size=256, generation_pairs=20_000, val_pairs=512
    )
    fast = distill_policy(policy, demos, cfg, generator=torch.Generator().manual_seed(0))
    out = Path(args.out or run / "distilled-k1")
    fast.save(out)
    print(
        f"distilled policy ({fast.flow.nfe} network evaluations per plan) in {out}; "
        f"evaluate with: localfm policy eval {out}"
    )


COMMANDS = {"collect": cmd_collect, "train": cmd_train, "eval": cmd_eval, "distill": cmd_distill}


def run(args) -> None:
    if args.policy_command is None:
        raise _usage("policy needs a subcommand: collect, train, eval or distill (localfm policy --help)")
    COMMANDS[args.policy_command](args)
