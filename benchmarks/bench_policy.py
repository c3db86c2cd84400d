"""Meta-World policies: conditional LFM against flow matching (blocks.L: 0) at equal total parameters.

Figures (issue 7):

1. ``single``: success rate against demonstrations per task (``--demos``) on ``--tasks`` (default
   the ten MT10 tasks), an LFM policy (configs/policy_lfm.yaml) and an FM policy
   (configs/policy_fm.yaml) with the same total parameters and the same training wall-clock
   (``--train-seconds``), ``--episodes`` evaluation episodes per point on held-out seeds (95%
   Wilson intervals); the two variants of a point train and evaluate one after the other.
2. ``multi``: one task-conditioned LFM policy for all tasks (``--multi-demos`` demonstrations per
   task, ``len(tasks) x --train-seconds`` of training: the ten single-task policies' total) against
   the single-task LFM policies of part 1 at the same demonstration count.
3. ``distill``: the single-task LFM policies at ``--multi-demos`` demonstrations, distilled to one
   network evaluation per block, against the undistilled ones: success and milliseconds per action.

Results go to ``benchmarks/results/<--name>.json`` / ``.md`` and ``<name>.png`` after every point;
a rerun skips the points already there (delete the JSON to start over). Demonstrations are cached
in ``runs/bench_policy/demos``, trained policies in ``runs/bench_policy/policies``.

    .venv/bin/python benchmarks/bench_policy.py                       # the full sweep (hours on one core)
    .venv/bin/python benchmarks/bench_policy.py --tiny                # a CI-scale smoke run
    .venv/bin/python benchmarks/bench_policy.py --tasks push reach --demos 5 10 --train-seconds 30
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import time
from pathlib import Path

import _common  # first: sets OMP_WAIT_POLICY before torch loads
import numpy as np
import torch
from _common import RESULTS, ROOT, command_line, metadata, save_figure, set_threads, write_results

from localfm.distill import DistillConfig
from localfm.policy import Demonstrations, PolicyConfig, distill_policy, load_policy, train_policy
from localfm.policy.metaworld import EVAL_SEED, collect, evaluate, wilson_interval

MT10 = [
    "reach",
    "push",
    "pick-place",
    "door-open",
    "drawer-open",
    "drawer-close",
    "button-press-topdown",
    "peg-insert-side",
    "window-open",
    "window-close",
]
VARIANTS = {"lfm": ROOT / "configs" / "policy_lfm.yaml", "fm": ROOT / "configs" / "policy_fm.yaml"}
WORK = ROOT / "runs" / "bench_policy"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=MT10)
    p.add_argument("--demos", nargs="+", type=int, default=[10, 5, 25, 50], help="demonstrations per task")
    p.add_argument("--train-seconds", type=float, default=45.0, help="training wall-clock of every policy")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per point")
    p.add_argument("--parts", nargs="+", default=["single", "multi", "distill"], choices=["single", "multi", "distill"])
    p.add_argument("--multi-demos", type=int, default=10, help="demonstrations per task of parts multi and distill")
    p.add_argument("--distill-steps", type=int, default=3000, help="regression steps per student")
    p.add_argument("--name", default=None, help="results name (default policy, or policy_quick with --tiny)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="smoke run: 2 tasks, 2 and 3 demos, 8 s, 6 episodes")
    args = p.parse_args(argv)
    if args.tiny:
        args.tasks, args.demos, args.train_seconds, args.episodes = ["reach", "push"], [3, 2], 8.0, 6
        args.multi_demos, args.distill_steps = 2, 200
    args.name = args.name or ("policy_quick" if args.tiny else "policy")
    if args.multi_demos not in args.demos and ({"multi", "distill"} & set(args.parts)):
        args.demos = [*args.demos, args.multi_demos]
    return args


def demos_for(task: str, n: int) -> Demonstrations:
    """The first ``n`` of the task's cached expert demonstrations (seeds 0, 1, ...; 50 collected once)."""
    path = WORK / "demos" / f"{task}.npz"
    if path.is_file():
        d = Demonstrations.load(path)
        if len(d) >= n:
            return d.select(range(n))
    d = collect(task, max(n, 50), seed=0)
    d.save(path)
    return d.select(range(n))


def point_row(key: str, r, policy, seconds: float) -> dict:
    s = r.summary()
    return {
        "key": key,
        "success_rate": s["success_rate"],
        "ci_low": s["interval"][0],
        "ci_high": s["interval"][1],
        "successes": s["successes"],
        "episodes": s["episodes"],
        "mean_length": s["mean_length"],
        "ms_per_action": s["ms_per_action"],
        "ms_per_plan_single": s["ms_per_plan_single"],
        "parameters": policy.n_parameters(),
        "train_seconds": policy.info.get("train_seconds"),
        "steps_per_block": policy.info.get("steps_per_block"),
        "nfe_per_plan": _nfe(policy),
        "eval_seconds": seconds,
        "eval_seeds": s["seeds"],
    }


def _nfe(policy) -> int:
    if policy.distilled:
        return policy.flow.nfe
    solver = policy.flow.solver
    per_step = {"euler": 1, "midpoint": 2, "rk4": 4}.get(solver.method, math.nan)
    return int(len(policy.flow) * solver.steps * per_step * (2 if policy.config.guidance else 1))


class Store:
    """The points measured so far (``raw.points`` of the results JSON), rewritten after each new one."""

    def __init__(self, args) -> None:
        self.args = args
        self.path = RESULTS / f"{args.name}.json"
        self.points: dict[str, dict] = {}
        self.commands: list[str] = []  # every command that added points
        self._merge()

    def __contains__(self, key: str) -> bool:
        self._merge()  # another process may have measured it meanwhile
        return key in self.points

    def add(self, key: str, row: dict) -> None:
        self.points[key] = row
        if command_line() not in self.commands:
            self.commands.append(command_line())
        self.write()

    def _merge(self) -> None:
        """Take in the points another process running this benchmark wrote meanwhile."""
        if self.path.is_file():
            raw = json.loads(self.path.read_text()).get("raw", {})
            self.points = {**raw.get("points", {}), **self.points}
            self.commands += [c for c in raw.get("commands", []) if c not in self.commands]

    def write(self) -> None:
        # Several processes may share one results file (e.g. parts single and multi side by side).
        WORK.mkdir(parents=True, exist_ok=True)
        with open(WORK / f"{self.path.stem}.lock", "w") as lock:  # outside the results folder
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge()
            self._write()

    def _write(self) -> None:
        a = self.args
        meta = metadata(
            {
                "demonstrations": "reset seeds 0, 1, ... per task",
                "evaluation": f"reset seeds {EVAL_SEED}..",
                "train": 0,
            },
            tasks=a.tasks,
            demos=a.demos,
            train_seconds=a.train_seconds,
            episodes=a.episodes,
            configs={k: str(v.relative_to(ROOT)) for k, v in VARIANTS.items()},
        )
        sections, notes = summarise(self.points, a, self.commands)
        write_results(
            a.name,
            "Meta-World policies: conditional LFM vs flow matching (equal parameters, equal training time)",
            meta,
            sections,
            notes=notes,
            raw={"points": self.points, "commands": self.commands},
        )
        plot(self.points, a)


def _mean_ci(rows: list[dict]) -> tuple[float, float, float]:
    """Mean success over tasks and a 95% Wilson interval on the pooled episodes."""
    k, n = sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows)
    lo, hi = wilson_interval(k, n)
    return (k / n if n else math.nan), lo, hi


def summarise(points: dict[str, dict], a, commands=()) -> tuple[dict, str]:
    single = [dict(p, part="single") for k, p in points.items() if k.startswith("single/")]
    table = []
    for p in sorted(single, key=lambda p: (p["key"].split("/")[2], int(p["key"].split("/")[3]), p["key"])):
        _, variant, task, nd = p["key"].split("/")
        table.append(
            {
                "task": task,
                "demos": int(nd),
                "policy": variant.upper(),
                "success": p["success_rate"],
                "95% interval": f"[{p['ci_low']:.2f}, {p['ci_high']:.2f}]",
                "mean length": p["mean_length"],
                "ms/action": p["ms_per_action"],
                "parameters": p["parameters"],
                "train steps": "+".join(str(s) for s in p["steps_per_block"] or []),
            }
        )
    means = []
    for nd in sorted({int(k.split("/")[3]) for k in points if k.startswith("single/")}):
        row = {"demos": nd}
        for v in VARIANTS:
            rows = [p for k, p in points.items() if k.startswith(f"single/{v}/") and k.endswith(f"/{nd}")]
            m, lo, hi = _mean_ci(rows)
            row[f"{v.upper()} mean"] = m
            row[f"{v.upper()} 95%"] = f"[{lo:.2f}, {hi:.2f}]" if rows else "-"
            row[f"{v.upper()} tasks"] = len(rows)
        means.append(row)
    sections = {"Mean success over tasks": means, "Every point": table}
    multi = [p for k, p in points.items() if k.startswith("multi/")]
    if multi:
        rows = []
        for p in sorted(multi, key=lambda p: p["key"]):
            task = p["key"].split("/")[2]
            single_p = points.get(f"single/lfm/{task}/{a.multi_demos}")
            rows.append(
                {
                    "task": task,
                    "multi-task LFM": p["success_rate"],
                    "95% interval": f"[{p['ci_low']:.2f}, {p['ci_high']:.2f}]",
                    "single-task LFM": single_p["success_rate"] if single_p else math.nan,
                }
            )
        singles = [points.get(f"single/lfm/{p['key'].split('/')[2]}/{a.multi_demos}") for p in multi]
        singles = singles if all(singles) else []
        m, lo, hi = _mean_ci(multi)
        rows.append(
            {
                "task": f"mean ({len(multi)} tasks)",
                "multi-task LFM": m,
                "95% interval": f"[{lo:.2f}, {hi:.2f}]",
                "single-task LFM": _mean_ci(singles)[0] if singles else math.nan,
            }
        )
        sections[f"Multi-task LFM ({a.multi_demos} demonstrations per task) vs single-task LFM"] = rows
    dist = [p for k, p in points.items() if k.startswith("distill/")]
    if dist:
        rows = []
        for p in sorted(dist, key=lambda p: p["key"]):
            task = p["key"].split("/")[2]
            teacher = points.get(f"single/lfm/{task}/{a.multi_demos}", {})
            rows.append(
                {
                    "task": task,
                    "distilled success": p["success_rate"],
                    "95% interval": f"[{p['ci_low']:.2f}, {p['ci_high']:.2f}]",
                    "undistilled success": teacher.get("success_rate", math.nan),
                    "distilled NFE/plan": p["nfe_per_plan"],
                    "undistilled NFE/plan": teacher.get("nfe_per_plan", math.nan),
                    "distilled ms/action": p["ms_per_action"],
                    "undistilled ms/action": teacher.get("ms_per_action", math.nan),
                    "distilled ms/plan (batch 1)": p["ms_per_plan_single"],
                    "undistilled ms/plan (batch 1)": teacher.get("ms_per_plan_single", math.nan),
                }
            )
        teachers = [points.get(f"single/lfm/{p['key'].split('/')[2]}/{a.multi_demos}") for p in dist]
        if all(teachers):
            m, lo, hi = _mean_ci(dist)
            rows.append(
                {
                    "task": f"mean ({len(dist)} tasks)",
                    "distilled success": m,
                    "95% interval": f"[{lo:.2f}, {hi:.2f}]",
                    "undistilled success": _mean_ci(teachers)[0],
                    "distilled ms/action": float(np.mean([p["ms_per_action"] for p in dist])),
                    "undistilled ms/action": float(np.mean([p["ms_per_action"] for p in teachers])),
                    "distilled ms/plan (batch 1)": float(np.mean([p["ms_per_plan_single"] for p in dist])),
                    "undistilled ms/plan (batch 1)": float(np.mean([p["ms_per_plan_single"] for p in teachers])),
                }
            )
        sections[f"Distilled LFM policy ({a.multi_demos} demonstrations, one evaluation per block)"] = rows
    ran = " Points were measured by: " + "; ".join(f"`{c}`" for c in commands) + "." if commands else ""
    notes = (
        "Success = Meta-World's info['success'] at any step of a 500-step episode; episodes end at the first "
        "success. Evaluation seeds (object and goal placements) are disjoint from the demonstrations' seeds. "
        "Means pool the episodes of all tasks measured at that demonstration count (Wilson interval on the pool). "
        "ms/action: policy compute per executed action with all live episodes planned in one batch; training "
        "ran on one CPU thread of a shared 2-core machine, so equal wall-clock is equal budget only up to the "
        "background load." + ran
    )
    return sections, notes


def plot(points: dict[str, dict], a) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    tasks = [t for t in a.tasks if any(k.split("/")[2] == t for k in points if k.startswith("single/"))]
    if not tasks:
        return
    cols = 4
    rows = math.ceil((len(tasks) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colours = {"lfm": "tab:blue", "fm": "tab:orange"}
    for ax, task in zip(axes.flat, [*tasks, "mean"], strict=False):
        for v in VARIANTS:
            xs, ys, lo, hi = [], [], [], []
            for nd in sorted(a.demos):
                if task == "mean":
                    rows_ = [p for k, p in points.items() if k.startswith(f"single/{v}/") and k.endswith(f"/{nd}")]
                    if not rows_:
                        continue
                    m, l_, h_ = _mean_ci(rows_)
                else:
                    p = points.get(f"single/{v}/{task}/{nd}")
                    if p is None:
                        continue
                    m, l_, h_ = p["success_rate"], p["ci_low"], p["ci_high"]
                xs.append(nd)
                ys.append(m)
                lo.append(max(0.0, m - l_))
                hi.append(max(0.0, h_ - m))
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colours[v], label=v.upper())
        ax.set_title(task if task != "mean" else "mean over tasks", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted(a.demos))
        ax.set_xticklabels([str(d) for d in sorted(a.demos)], fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks) + 1 :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("demonstrations per task")
    fig.supylabel("success rate (95% Wilson interval)")
    save_figure(fig, a.name)


def policy_dir(key: str) -> Path:
    return WORK / "policies" / key.replace("/", "_")


def run_single(args, store: Store) -> None:
    for nd in args.demos:
        for task in args.tasks:
            for v, cfg_path in VARIANTS.items():
                key = f"single/{v}/{task}/{nd}"
                if key in store:
                    continue
                demos = demos_for(task, nd)
                policy = train_policy(demos, PolicyConfig.load(cfg_path), time_budget=args.train_seconds, seed=0)
                policy.save(policy_dir(key))
                t0 = time.perf_counter()
                r = evaluate(policy, task, args.episodes, generator=torch.Generator().manual_seed(0))
                store.add(key, point_row(key, r, policy, time.perf_counter() - t0))
                print(f"{key}: {r.success_rate:.2f} {tuple(round(x, 2) for x in r.interval)}", flush=True)


def run_multi(args, store: Store) -> None:
    keys = [f"multi/lfm/{t}/{args.multi_demos}" for t in args.tasks]
    if all(k in store for k in keys):
        return
    demos = demos_for(args.tasks[0], args.multi_demos)
    for task in args.tasks[1:]:
        demos = demos + demos_for(task, args.multi_demos)
    path = policy_dir(f"multi/lfm/all/{args.multi_demos}")
    if (path / "policy.json").is_file():
        policy = load_policy(path)
    else:
        budget = args.train_seconds * len(args.tasks)
        policy = train_policy(demos, PolicyConfig.load(VARIANTS["lfm"]), time_budget=budget, seed=0)
        policy.save(path)
    for key, task in zip(keys, args.tasks, strict=True):
        if key in store:
            continue
        t0 = time.perf_counter()
        r = evaluate(policy, task, args.episodes, generator=torch.Generator().manual_seed(0))
        store.add(key, point_row(key, r, policy, time.perf_counter() - t0))
        print(f"{key}: {r.success_rate:.2f}", flush=True)


def run_distill(args, store: Store) -> None:
    for task in args.tasks:
        key = f"distill/lfm/{task}/{args.multi_demos}"
        teacher_dir = policy_dir(f"single/lfm/{task}/{args.multi_demos}")
        if key in store or not (teacher_dir / "policy.json").is_file():
            continue
        teacher = load_policy(teacher_dir)
        cfg = DistillConfig(
            steps_per_block=1, train_steps=args.distill_steps, batch_size=256, generation_pairs=20_000, val_pairs=512
        )
        fast = distill_policy(
            teacher, demos_for(task, args.multi_demos), cfg, generator=torch.Generator().manual_seed(0)
        )
        fast.save(policy_dir(key))
        t0 = time.perf_counter()
        r = evaluate(fast, task, args.episodes, generator=torch.Generator().manual_seed(0))
        store.add(key, point_row(key, r, fast, time.perf_counter() - t0))
        print(f"{key}: {r.success_rate:.2f}", flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    set_threads(args.threads)
    np.random.seed(0)
    store = Store(args)
    for part, fn in (("single", run_single), ("multi", run_multi), ("distill", run_distill)):
        if part in args.parts:
            fn(args, store)
    store.write()
    print(f"results in {RESULTS / args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
