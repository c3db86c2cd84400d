"""Cost of the divergence estimators per network evaluation, relative to a plain forward pass.

For an MLP velocity network (256 x 4, relu, time concatenated) and data dimension d, one evaluation
of the log-density ODE's right-hand side costs, relative to ``v(x, t)`` under ``no_grad``:

- ``exact_sequential``: ``localfm.ode.divergence_exact(batched=False)``, one forward with a graph
  and d vector-Jacobian products one after another on it;
- ``exact_batched``: ``divergence_exact(batched=True)``, the d products as one vmapped backward;
- ``forward_vmap_jvp``: forward mode, ``torch.func.vmap`` over the d unit tangents of ``torch.func.jvp``;
- ``hutchinson``: ``localfm.ode.divergence_hutchinson`` (one vector-Jacobian product, an estimate).

This is what justifies ``divergence_exact``'s choice of the sequential form on CPUs.

    python benchmarks/bench_divergence.py            # full: d in 2,6,8,43,63 and B in 1024,4096,16384
    python benchmarks/bench_divergence.py --quick    # CI smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _common first: it sets the OpenMP wait policy before torch loads.
from _common import interleaved, metadata, set_threads, write_results  # noqa: E402, I001

import torch  # noqa: E402
from torch.func import jvp, vmap  # noqa: E402

from localfm.nets import MLP, NetConfig  # noqa: E402
from localfm.ode import divergence_exact, divergence_hutchinson  # noqa: E402


def divergence_forward_mode(f, x):
    """Exact divergence by forward mode: ``vmap`` of ``jvp`` over the d unit tangents."""
    B, d = x.shape
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    def column(e):  # J e_i for every point, shape (B, d)
        return jvp(f, (x,), (e.expand(B, d),))[1]

    with torch.no_grad():
        g = vmap(column)(eye)  # (d, B, d): g[i, b, :] = J_b e_i
        return f(x), torch.diagonal(g, dim1=0, dim2=2).sum(-1)


def check_agreement(net, d: int) -> float:
    """Largest difference between the exact variants on a few points (they must agree)."""
    x = torch.randn(64, d, dtype=torch.float64)
    net64 = MLP(d, net.config).double()
    net64.load_state_dict(net.state_dict())
    t = torch.tensor(0.3, dtype=torch.float64)

    def f(y):
        return net64(y, t)

    ref = divergence_exact(f, x, batched=False)[1]
    others = [divergence_exact(f, x, batched=True)[1], divergence_forward_mode(f, x)[1]]
    return max(float((o - ref).abs().max()) for o in others)


def bench(d: int, batch: int, rounds: int, net_config: NetConfig, seed: int) -> dict:
    torch.manual_seed(seed)
    net = MLP(d, net_config).eval()
    x = torch.randn(batch, d)
    t = torch.tensor(0.3)
    probe = torch.randint(0, 2, x.shape).float() * 2 - 1

    def f(y):
        return net(y, t)

    def plain():
        with torch.no_grad():
            f(x)

    fns = {
        "plain": plain,
        "exact_sequential": lambda: divergence_exact(f, x, batched=False),
        "exact_batched": lambda: divergence_exact(f, x, batched=True),
        "forward_vmap_jvp": lambda: divergence_forward_mode(f, x),
        "hutchinson": lambda: divergence_hutchinson(f, x, probe),
    }
    if (d + 1) * batch > 300_000:  # the costliest settings: two rounds, no warm-up, to keep the run short
        rounds, warmup = min(rounds, 2), 0
    else:
        warmup = 1
    times = interleaved(fns, rounds=rounds, warmup=warmup)
    base = times.median("plain")
    row = {"d": d, "batch": batch, "plain_ms": 1e3 * base}
    for name in fns:
        if name != "plain":
            row[name] = times.median(name) / base
    row["d+1"] = d + 1
    row["batched/sequential"] = row["exact_batched"] / row["exact_sequential"]
    row["forward/sequential"] = row["forward_vmap_jvp"] / row["exact_sequential"]
    cpu = {name: times.median(name, "cpu") for name in fns}
    row["cpu: batched/sequential"] = cpu["exact_batched"] / cpu["exact_sequential"]
    row["cpu: forward/sequential"] = cpu["forward_vmap_jvp"] / cpu["exact_sequential"]
    row["rounds"] = rounds
    row["raw_seconds"] = {"wall": times.wall, "cpu": times.cpu}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke run (< 60 s)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (default 3, quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    threads = set_threads(args.threads)
    dims = (2, 6) if args.quick else (2, 6, 8, 43, 63)
    batches = (1024,) if args.quick else (1024, 4096, 16384)
    rounds = args.rounds or (2 if args.quick else 3)
    net_config = NetConfig(width=256, depth=4, activation="relu")

    agreement = {f"d={d}": check_agreement(MLP(d, net_config), d) for d in dims}
    rows = []
    for d in dims:
        for batch in batches:
            row = bench(d, batch, rounds, net_config, args.seed)
            rows.append(row)
            print(
                f"d={d:3d} B={batch:6d} plain {row['plain_ms']:8.2f} ms | seq {row['exact_sequential']:6.2f}x "
                f"batched {row['exact_batched']:6.2f}x fwd {row['forward_vmap_jvp']:6.2f}x "
                f"hutch {row['hutchinson']:5.2f}x",
                flush=True,
            )

    table = [{k: v for k, v in r.items() if k != "raw_seconds"} for r in rows]
    by_d = []
    for d in dims:
        rs = [r for r in rows if r["d"] == d]
        by_d.append(
            {
                "d": d,
                "batched/sequential (min..max over B)": f"{min(r['batched/sequential'] for r in rs):.2f}.."
                f"{max(r['batched/sequential'] for r in rs):.2f}",
                "forward/sequential (min..max over B)": f"{min(r['forward/sequential'] for r in rs):.2f}.."
                f"{max(r['forward/sequential'] for r in rs):.2f}",
            }
        )
    meta = metadata(
        [args.seed],
        network="MLP 256x4 relu, time concatenated, float32",
        rounds=f"{rounds} after one warm-up round; 2 without warm-up where (d + 1) * batch > 300,000",
        threads=threads,
    )
    notes = (
        "Cost of one right-hand-side evaluation of the log-density ODE, as a multiple of one plain "
        "forward pass `v(x, t)` under `no_grad` at the same batch size (medians over interleaved rounds). "
        "A ratio batched/sequential > 1 means the sequential form is faster. `cpu:` columns are the same "
        "ratios in CPU time of this process (insensitive to other jobs on the machine). Exact variants agree to "
        f"{max(agreement.values()):.1e} in float64."
    )
    write_results(
        "divergence_quick" if args.quick else "divergence",
        "Divergence estimators: cost per network evaluation",
        meta,
        {"Relative cost (x plain forward)": table, "Summary by dimension": by_d},
        notes=notes,
        raw={"seconds": [{"d": r["d"], "batch": r["batch"], **r["raw_seconds"]} for r in rows]},
    )


if __name__ == "__main__":
    main()
