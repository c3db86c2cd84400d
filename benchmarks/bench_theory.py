"""Suite 5 (issue 5): the theory check, on 2-D densities with an exact log-density.

The paper's theorem bounds the divergence between the data and the model when every block's
flow-matching error is at most eps and the chain has ``N ~ log(1/eps)`` OU blocks and no free block:
the OU process contracts towards N(0, I), so after total OU time ``T = N h`` the base mismatch
has shrunk like ``e^{-2T}``, while the blocks' errors add up. On densities with an exact
log-density the paired gap ``mean(log p_true - log p_model)`` over test points estimates
KL(data || model), the quantity bounded; this script measures it

1. against the number of OU blocks N in theory mode (``free_block: false``, constant step h, so
   the total OU time grows with N), every block trained for the same number of steps;
2. against the steps per block, for the theory chain at fixed N and for the free-block default
   (3 OU blocks + the free block, the 2-D suite's LFM), side by side.

Training goes by steps (not time): the theorem is about per-block error, not about a budget.
Every block is an MLP 64x3 softplus(beta = 20); rk4, 4 steps per block, for the pushforward and the
likelihood alike; a 20k-point training pool and 5k test points.

    python benchmarks/bench_theory.py                 # 8gaussians and moons, 15-25 minutes on one core
    python benchmarks/bench_theory.py --tiny --out DIR  # CI smoke run, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _common first: it sets the OpenMP wait policy before torch loads.
import _common  # noqa: E402, I001
from _common import metadata, write_results  # noqa: E402

import torch  # noqa: E402

import contenders as C  # noqa: E402
import localfm  # noqa: E402
from localfm import datasets  # noqa: E402

NET = {"width": 64, "depth": 3, "activation": "softplus", "beta": 20.0}
SOLVER = {"method": "rk4", "steps": 4}
FREE_DEFAULT = {"schedule": "list", "h": [0.15, 0.195, 0.2535], "free_block": True}

S_N = "1. Gap vs number of OU blocks (theory mode: no free block, constant h)"
S_STEPS = "2. Gap vs steps per block: theory chain and free-block default"
NOTES = {
    S_N: "`T = N h` is the total OU time; `paired_gap` ± `se` estimates KL(data || model) in nats on the test "
    "points. `free-block default` rows: 3 OU blocks (h = 0.15, 0.195, 0.2535) + the free block at the same "
    "steps per block, for reference.",
    S_STEPS: "The same data, network and solver; only the steps per block change.",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["8gaussians", "moons"])
    p.add_argument("--h", type=float, default=0.3, help="OU step of every block in theory mode (default 0.3)")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8, 12], help="N values of part 1")
    p.add_argument("--steps", type=int, default=1000, help="steps per block in part 1 (default 1000)")
    p.add_argument("--steps-sweep", type=int, nargs="+", default=[125, 250, 500, 1000, 2000])
    p.add_argument("--n-fixed", type=int, default=8, help="N of the theory chain in part 2 (default 8)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--n-test", type=int, default=5_000)
    _common.add_suite_options(p)
    a = p.parse_args()
    if a.tiny:
        a.datasets, a.blocks, a.steps, a.steps_sweep, a.n_fixed = ["8gaussians"], [1, 2], 40, [20, 40], 2
        a.n_train, a.n_test, a.batch = 2_000, 500, 256
    a.name = "theory_tiny" if a.tiny else "theory"
    return a


def config(blocks: dict, steps: int, a) -> dict:
    train = {"steps": steps, "batch_size": a.batch, "lr": a.lr, "lr_schedule": "cosine", "log_every": 50}
    return {"net": NET, "blocks": blocks, "train": train, "solver": SOLVER}


def theory_blocks(n: int, h: float) -> dict:
    return {"schedule": "list", "h": [h] * n, "free_block": False}


def measure(a, data: str, ds, variant: str, blocks: dict, steps: int) -> dict:
    x_train = torch.from_numpy(ds.train[: a.n_train])
    x_test = torch.from_numpy(ds.test[: a.n_test])
    t0 = time.perf_counter()
    flow = localfm.fit(x_train, config(blocks, steps, a), seed=a.seed)
    fit_s = time.perf_counter() - t0
    lp = flow.log_prob(x_test).double()
    d = torch.as_tensor(ds.log_prob(x_test.double().numpy())).double() - lp
    hs = [b.h for b in flow.blocks]
    return {
        "dataset": data,
        "variant": variant,
        "N": len(flow),
        "ou_blocks": sum(h is not None for h in hs),
        "T": sum(h for h in hs if h is not None),
        "steps_per_block": steps,
        **C.metrics.nll_summary(lp),
        "paired_gap": float(d.mean()),
        "se": float(d.std() / math.sqrt(d.numel())),
        "fit_s": fit_s,
    }


def runs_wanted(a) -> list[tuple[str, dict, int]]:
    """(variant, blocks, steps) of both parts; shared points are measured once."""
    want = [(f"theory N={n}", theory_blocks(n, a.h), a.steps) for n in a.blocks]
    want += [("free-block default", FREE_DEFAULT, a.steps)]
    for s in a.steps_sweep:
        want += [(f"theory N={a.n_fixed}", theory_blocks(a.n_fixed, a.h), s), ("free-block default", FREE_DEFAULT, s)]
    seen, out = set(), []
    for v, b, s in want:
        if (v, s) not in seen:
            seen.add((v, s))
            out.append((v, b, s))
    return out


def sections(a, rows: list[dict]) -> dict:
    cols = ["dataset", "variant", "N", "T", "steps_per_block", "nll", "nll_se", "paired_gap", "se", "fit_s"]
    part1 = [
        {c: r[c] for c in cols}
        for r in rows
        if r["steps_per_block"] == a.steps
        and (r["variant"] == "free-block default" or (r["variant"].startswith("theory") and r["N"] in a.blocks))
    ]
    part2 = [
        {c: r[c] for c in cols}
        for r in rows
        if r["steps_per_block"] in a.steps_sweep
        and (r["variant"] == "free-block default" or r["variant"] == f"theory N={a.n_fixed}")
    ]
    part1.sort(key=lambda r: (r["dataset"], r["variant"].startswith("free"), r["N"]))
    part2.sort(key=lambda r: (r["dataset"], r["variant"], r["steps_per_block"]))
    return {S_N: part1, S_STEPS: part2}


def plot(a, rows: list[dict]) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, data in enumerate(a.datasets):
        color = f"C{i}"
        th = sorted(
            (
                r
                for r in rows
                if r["dataset"] == data and r["variant"].startswith("theory") and r["steps_per_block"] == a.steps
            ),
            key=lambda r: r["N"],
        )
        if th:
            ax1.errorbar(
                [r["N"] for r in th],
                [r["paired_gap"] for r in th],
                [r["se"] for r in th],
                marker="o",
                color=color,
                label=f"{data}: theory mode (h = {a.h:g})",
            )
        ref = C.find(rows, dataset=data, variant="free-block default", steps_per_block=a.steps)
        if ref:
            ax1.axhline(ref["paired_gap"], color=color, ls="--", lw=1, label=f"{data}: free-block default (N = 4)")
        for variant, ls in ((f"theory N={a.n_fixed}", "-"), ("free-block default", "--")):
            pts = sorted(
                (
                    r
                    for r in rows
                    if r["dataset"] == data and r["variant"] == variant and r["steps_per_block"] in a.steps_sweep
                ),
                key=lambda r: r["steps_per_block"],
            )
            if pts:
                ax2.errorbar(
                    [r["steps_per_block"] for r in pts],
                    [r["paired_gap"] for r in pts],
                    [r["se"] for r in pts],
                    marker="o",
                    ls=ls,
                    color=color,
                    label=f"{data}: {variant}",
                )
    ax1.set_xlabel("OU blocks N (total OU time T = N h)")
    ax1.set_ylabel("paired gap: KL(data || model) estimate (nats)")
    ax1.set_yscale("symlog", linthresh=0.01)
    ax1.set_title(f"{a.steps} steps per block")
    ax2.set_xlabel("steps per block")
    ax2.set_xscale("log")
    ax2.set_yscale("symlog", linthresh=0.01)
    ax2.set_title("per-block training length")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    _common.save_figure(fig, a.name)


def main() -> None:
    a = parse_args()
    threads = _common.start(a.out, a.threads)
    rows: list[dict] = [] if a.fresh else C.load_rows(a.name).get("runs", [])
    meta = metadata({"data": a.seed, "training": a.seed}, threads=threads)
    t_start = time.perf_counter()

    def publish() -> None:
        meta["hardware"] = _common.hardware()  # the load average at the time of writing
        notes = (
            f"Theory mode: N OU blocks of h = {a.h:g}, no free block; {a.steps} steps per block in part 1; "
            f"batch {a.batch}, lr {a.lr:g} (cosine); {a.n_train:,} training points (the pool), {a.n_test:,} test "
            f"points; {threads} torch thread(s) on 2 shared cores."
        )
        write_results(
            a.name,
            "Suite 5: theory check on 2-D densities (issue 5)",
            meta,
            sections(a, rows),
            notes=notes,
            section_notes=NOTES,
            raw={"rows": {"runs": rows}, "net": NET, "solver": SOLVER, "free_default": FREE_DEFAULT},
        )
        plot(a, rows)

    for data in a.datasets:
        ds = datasets.load(data, seed=a.seed, sizes=(a.n_train, 1_000, a.n_test) if a.tiny else None)
        for variant, blocks, steps in runs_wanted(a):
            if C.find(rows, dataset=data, variant=variant, steps_per_block=steps):
                continue
            r = measure(a, data, ds, variant, blocks, steps)
            rows.append(r)
            print(
                f"[theory] {data} {variant} {steps} steps/block: gap {r['paired_gap']:.4f} ± {r['se']:.4f} "
                f"({r['fit_s']:.0f} s)",
                flush=True,
            )
            publish()
    publish()
    print(f"[theory] done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
