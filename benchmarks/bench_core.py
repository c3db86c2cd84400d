"""The core library's required figures (issue 2), measured on this machine.

1. ``gaussian``: on a correlated 2-D Gaussian with non-zero mean and known entropy H, LFM and the
   FM baseline (``blocks: {L: 0}``) trained by ``localfm.fit(x, cfg, time_budget=...)`` reach a
   test NLL within 0.02 nats of H (NLL with its standard error; also the paired gap
   ``NLL_model - NLL_true`` on the same points, an estimate of KL(p || model) with a much smaller error).
2. ``invertibility``: ``max |decode(encode(x)) - x|`` in float64, dopri5 at rtol = atol = 1e-8,
   on the trained flows (target <= 1e-5).
3. ``overhead``: ``fit``'s training throughput (samples/s, from its progress callback) against a
   bare PyTorch loop doing the same step on the same network (target ratio >= 0.90).
4. ``log_prob``: exact ``log_prob`` against a plain forward solve (``encode``) on 6-D data with the
   same solver and batch size (target <= d + 2 = 8 times), on a POWER-sized model (4 blocks of
   MLP 256x4 relu), with the time extrapolated to POWER's test split (204,928 points), and the
   effect of ``log_prob(batch_size=...)``.
5. ``subnormals``: training throughput with subnormal floats flushed to zero (what ``fit`` does) and
   without, two identical runs in alternating windows: softplus's sharp default ``beta`` makes ever
   more subnormal activations as training goes on, and the CPU computes with them far more slowly.

    python benchmarks/bench_core.py                   # full run, 10-15 minutes on 2 shared cores
    python benchmarks/bench_core.py --quick           # CI smoke run, under a minute
    python benchmarks/bench_core.py --only overhead   # one section (results in core_overhead.*)
    python benchmarks/bench_core.py --only subnormals --threads 1   # section 5, about a minute
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _common first: it sets the OpenMP wait policy before torch loads.
from _common import interleaved, median, metadata, pyplot, save_figure, start, write_results  # noqa: E402, I001

import torch  # noqa: E402

import localfm  # noqa: E402
from localfm import datasets  # noqa: E402
from localfm.flow import Standardizer  # noqa: E402
from localfm.interpolants import get_interpolant  # noqa: E402
from localfm.nets import NetConfig, build_net  # noqa: E402
from localfm.ode import SolverConfig  # noqa: E402
from localfm.training import flush_denormals, fresh_net, new_block_state, train_block  # noqa: E402

SECTIONS = ("gaussian", "invertibility", "overhead", "log_prob", "subnormals")
POWER_TEST_POINTS = 204_928

S_GAUSS = "1. 2-D Gaussian: test NLL vs entropy"
S_INV = "2. Invertibility (float64, dopri5 rtol=atol=1e-8)"
S_OVH = "3. Training overhead: fit's training loop (train_block) vs a bare PyTorch loop"
S_COST = "4a. log_prob vs encode (6-D, POWER-sized model, same solver and batch size)"
S_EXTRA = "4b. log_prob time, extrapolated to POWER's test split (204,928 points)"
S_BATCH = "4c. Effect of log_prob(batch_size=...)"
S_SUB = "5. Subnormal floats: training steps/s flushed to zero (fit's setting) and not"
SECTION_NOTES = {
    S_GAUSS: "`nll-H` carries the test sample's noise (`se`); `paired_gap` is the mean of "
    "`log p_true - log p_model` over the same test points, an estimate of KL(p || model) with a much "
    "smaller error. `fit_wall_s` is the whole `fit` call: training plus the pushforward after every block "
    "but the last; `train_s` is training alone. `min_block_steps` flags blocks that the time budget "
    "left (nearly) untrained. Configs: `raw.gaussian_configs` in the JSON.",
    S_INV: "In data units, on test points; `nfe_*` are network evaluations per block.",
    S_OVH: "`localfm.training.train_block` (the loop `fit` runs for every block) against a bare loop doing the "
    "same step on the same network from the same initialisation (one OU block, h = 0.15, constant learning "
    "rate). The two alternate in windows of steps after one warm-up window each, so both see the same "
    "background load; samples/s and `ratio` (library / bare throughput) come from median window times, "
    "`ratio (cpu time)` from this process's CPU time (insensitive to other jobs). Each library window is "
    "one `train_block` call, so it also pays the per-call set-up and end checks that `fit` pays once per "
    "block.",
    S_COST: "One POWER-sized model (3 OU blocks + free block, MLP 256x4 relu) trained briefly on a 6-D "
    "mixture. `nfe_per_batch` counts network evaluations over all blocks. The adaptive solver controls "
    "its steps on the state alone, so both passes take the same steps and the ratio is the cost of the "
    "exact divergence per evaluation.",
    S_EXTRA: "`log_prob_s` is one pass over `measured_points` (median of the interleaved rounds), scaled "
    "linearly to 204,928 points. dopri5's step count depends on the trained fields; this briefly trained "
    "model's NFE is in the first column (scale by NFE for another model).",
    S_BATCH: "One `log_prob` pass over the same points per batch size with one rk4 step per block (fixed "
    "evaluations, so the column is throughput per evaluation); `us_per_point_and_nfe` is microseconds per "
    "point per network evaluation. dopri5's step count also changes with the batch (its error norm is over "
    "the batch): its evaluations on the first batch are counted with `encode`, which takes the same steps.",
    S_SUB: "Two runs of `train_block` from the same initialisation and seed (the 2-D suite's free block: MLP "
    "75x4 softplus, beta 20, on rings, Adam lr 3e-3, batch 2048), one under `flush_denormals(True)`, one "
    "under `flush_denormals(False)`, alternating windows of steps; each row sums a quarter of the windows. "
    "`subnormal_share`: fraction of the unflushed network's hidden activations on a fixed batch that are "
    "subnormal at the row's last step; `val_loss_*`: each network's flow-matching loss on fixed validation "
    "pairs (evaluated flushed), the same when flushing changes nothing but speed.",
}

# --- 1. 2-D Gaussian --------------------------------------------------------------------------
MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=torch.float64)  # correlation 0.85


def gaussian() -> torch.distributions.MultivariateNormal:
    return torch.distributions.MultivariateNormal(MEAN, COV)


def draw_gaussian(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MEAN + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T


def gaussian_configs() -> dict[str, dict]:
    """LFM (3 OU blocks + free block, POWER's step sizes) and FM (one free block), same network.

    The target velocity fields of a Gaussian are close to linear, so a 64 x 3 softplus MLP is
    plenty (and pushes 10,000 training points cheaply: at 128 wide the pushes of a loaded machine
    took half of LFM's budget); a large step count with the cosine schedule lets the time budget
    decide where to stop (the schedule follows the share of the budget used).
    """
    train = {"steps": 1_000_000, "batch_size": 2048, "lr": 2e-3, "lr_schedule": "cosine"}
    net = {"width": 64, "depth": 3, "activation": "softplus"}
    return {
        "LFM": {"net": net, "blocks": {"schedule": "list", "h": [0.15, 0.195, 0.2535]}, "train": train},
        "FM": {"net": net, "blocks": {"L": 0}, "train": train},
    }


def run_gaussian(args, flows: dict) -> list[dict]:
    mvn = gaussian()
    H = float(mvn.entropy())
    x_train = draw_gaussian(args.n_train, args.seed).float()
    x_test = draw_gaussian(args.n_test, args.seed + 1)
    rows = []
    for name, cfg in gaussian_configs().items():
        t0 = time.perf_counter()
        flow = localfm.fit(x_train, cfg, time_budget=args.budget, seed=args.seed)
        fit_seconds = time.perf_counter() - t0
        flows[name] = flow
        t0 = time.perf_counter()
        lp = flow.log_prob(x_test).double()
        eval_seconds = time.perf_counter() - t0
        true_lp = mvn.log_prob(x_test)
        nll, se = float(-lp.mean()), float(lp.std() / math.sqrt(lp.numel()))
        paired = true_lp - lp  # per-point log p - log p_model: mean estimates KL(p || model)
        log = flow.training_log
        row = {
            "model": name,
            "blocks": len(flow),
            "H": H,
            "test_nll": nll,
            "se": se,
            "nll-H": nll - H,
            "true_nll_same_points": float(-true_lp.mean()),
            "paired_gap": float(paired.mean()),
            "paired_se": float(paired.std() / math.sqrt(paired.numel())),
            "budget_s": args.budget,
            "fit_wall_s": fit_seconds,
            "train_s": sum(b["train_seconds"] for b in log),
            "push_s": sum(b["push_seconds"] for b in log),
            "steps_per_block": ",".join(str(b["steps"]) for b in log),
            "min_block_steps": min(b["steps"] for b in log),
            "eval_s": eval_seconds,
            "nfe_per_block": ",".join(str(n) for n in flow.encode(x_test[:4096]).nfe),
            "within_0.02": abs(nll - H) <= 0.02,
        }
        rows.append(row)
        print(
            f"[gaussian] {name}: NLL {nll:.4f} +- {se:.4f} (H {H:.4f}, gap {nll - H:+.4f}; paired gap "
            f"{row['paired_gap']:+.4f} +- {row['paired_se']:.4f}); fit {fit_seconds:.1f} s "
            f"(train {row['train_s']:.1f}, push {row['push_s']:.1f}), eval {eval_seconds:.1f} s",
            flush=True,
        )
    return rows


# --- 2. Invertibility -------------------------------------------------------------------------
def run_invertibility(args, flows: dict) -> list[dict]:
    if not flows:  # run on its own: a short LFM fit gives a trained flow to invert
        cfg = gaussian_configs()["LFM"]
        flows["LFM"] = localfm.fit(draw_gaussian(args.n_train, args.seed).float(), cfg, time_budget=10, seed=args.seed)
    solver = SolverConfig(method="dopri5", rtol=1e-8, atol=1e-8)
    x = draw_gaussian(args.n_invert, args.seed + 2)
    rows = []
    for name, flow in flows.items():
        flow64 = copy.deepcopy(flow).double()
        t0 = time.perf_counter()
        enc = flow64.encode(x, solver=solver)
        dec = flow64.decode(enc.x, solver=solver)
        seconds = time.perf_counter() - t0
        err = (dec.x - x).abs()
        row = {
            "model": name,
            "points": x.shape[0],
            "max_abs_err": float(err.max()),
            "mean_abs_err": float(err.mean()),
            "nfe_encode": ",".join(map(str, enc.nfe)),
            "nfe_decode": ",".join(map(str, dec.nfe)),
            "seconds": seconds,
            "within_1e-5": float(err.max()) <= 1e-5,
        }
        rows.append(row)
        print(f"[invertibility] {name}: max |decode(encode(x)) - x| = {row['max_abs_err']:.2e}", flush=True)
    return rows


# --- 3. Training overhead ---------------------------------------------------------------------
class BareLoop:
    """The training step of ``fit`` with nothing around it, resumable ``steps`` at a time.

    Same network and initialisation as ``fit``'s first block (``build_net`` under ``seed``), same
    pairs: ``randint`` into the pool, ``randn`` noise, exact OU step, uniform t, linear interpolant,
    MSE, Adam at a constant learning rate.
    """

    def __init__(self, pool: torch.Tensor, net_cfg: dict, h: float, batch: int, lr: float, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = build_net(pool.shape[1], NetConfig(**net_cfg))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.pool, self.batch = pool, batch
        self.a, self.b = math.exp(-h), math.sqrt(-math.expm1(-2 * h))

    def run(self, steps: int) -> float:
        pool, batch, gen, net = self.pool, self.batch, self.gen, self.net
        for _ in range(steps):
            x_l = pool[torch.randint(pool.shape[0], (batch,), generator=gen)]
            x_r = self.a * x_l + self.b * torch.randn(x_l.shape, generator=gen)
            t = torch.rand(batch, generator=gen)
            dx_t = x_r - x_l
            x_t = x_l + t.unsqueeze(1) * dx_t
            loss = (net(x_t, t) - dx_t).pow(2).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return float(loss.detach())  # the library reads the loss at each report too


class LibraryLoop:
    """``localfm.training.train_block`` (the loop ``fit`` runs for each block), resumed ``steps`` at a time.

    Each call also pays train_block's per-call set-up and its end-of-run checks and report, which
    ``fit`` pays once per block or per ``log_every`` steps: a slight handicap for the library.
    """

    def __init__(self, pool: torch.Tensor, net_cfg: dict, h: float, batch: int, lr: float, seed: int) -> None:
        cfg = localfm.load_config({"net": net_cfg, "train": {"batch_size": batch, "lr": lr, "lr_schedule": "constant"}})
        self.state = new_block_state(fresh_net(pool.shape[1], cfg, seed), cfg.train)
        self.gen = torch.Generator().manual_seed(seed)
        self.pool, self.h, self.tc = pool, h, cfg.train

    def run(self, steps: int) -> None:
        train_block(self.state, self.pool, self.h, self.tc, self.state.step + steps, generator=self.gen)


def overhead_settings(quick: bool) -> list[dict]:
    settings = [
        {"name": "defaults (d=2, MLP 256x3 softplus)", "d": 2, "net": {}, "batch": 1024},
        {"name": "POWER-sized (d=6, MLP 256x4 relu)", "d": 6, "net": {"depth": 4, "activation": "relu"}, "batch": 1024},
        {"name": "small (d=2, MLP 64x2 softplus)", "d": 2, "net": {"width": 64, "depth": 2}, "batch": 256},
    ]
    return settings[2:] if quick else settings


def run_overhead(args) -> list[dict]:
    """Alternate windows of library steps and bare steps, so both see the same background load."""
    rows = []
    window, rounds = (10, 3) if args.quick else (20, 6)
    h, lr = 0.15, 1e-3
    for st in overhead_settings(args.quick):
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(5_000, st["d"], generator=g) * 2 + 1
        pool = Standardizer.fit(x)(x).float()  # what fit trains block 0 on
        lib = LibraryLoop(pool, st["net"], h, st["batch"], lr, args.seed)
        bare = BareLoop(pool, st["net"], h, st["batch"], lr, args.seed)
        times = interleaved(
            {"lib": lambda lib=lib: lib.run(window), "bare": lambda b=bare: b.run(window)}, rounds=rounds
        )
        samples = window * st["batch"]
        row = {
            "setting": st["name"],
            "batch": st["batch"],
            "train_block_samples_per_s": samples / times.median("lib"),
            "bare_samples_per_s": samples / times.median("bare"),
            "ratio": times.median("bare") / times.median("lib"),
            "ratio (cpu time)": times.median("bare", "cpu") / times.median("lib", "cpu"),
            "windows": f"{rounds} x {window} steps each",
        }
        row["meets_0.90"] = row["ratio"] >= 0.90
        rows.append(row)
        print(
            f"[overhead] {st['name']}: train_block {row['train_block_samples_per_s']:.0f} /s, bare "
            f"{row['bare_samples_per_s']:.0f} /s, ratio {row['ratio']:.3f} (cpu time {row['ratio (cpu time)']:.3f})",
            flush=True,
        )
    return rows


# --- 4. log_prob cost -------------------------------------------------------------------------
def six_d_data(n: int, seed: int) -> torch.Tensor:
    """A 6-D non-Gaussian stand-in for POWER: a skewed, correlated mixture of 8 Gaussians."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, 6, generator=torch.Generator().manual_seed(1234)) * 2
    mix = torch.randint(8, (n,), generator=g)
    z = torch.randn(n, 6, generator=g)
    return means[mix] + 0.5 * z + 0.3 * torch.tanh(2 * z[:, [1, 2, 3, 4, 5, 0]])


def power_sized_flow(args) -> tuple[localfm.LocalFlow, float]:
    """POWER's architecture (3 OU blocks + free block, MLP 256x4 relu), briefly trained on 6-D data.

    A short training gives velocity fields with some structure, so dopri5's step count is not that
    of a network at initialisation; the cost per network evaluation does not depend on training.
    """
    cfg = {
        "net": {"width": 256, "depth": 4, "activation": "relu"},
        "blocks": {"schedule": "list", "h": [0.15, 0.195, 0.2535]},
        "train": {"steps": args.power_steps, "batch_size": 1024, "lr": 2e-3},
    }
    t0 = time.perf_counter()
    flow = localfm.fit(six_d_data(args.power_train, args.seed), cfg, seed=args.seed)
    return flow, time.perf_counter() - t0


def encode_chunks(flow, x, solver, batch_size) -> list[int]:
    """``encode`` in the batches ``log_prob`` would use; network evaluations of each batch."""
    return [sum(flow.encode(x[i : i + batch_size], solver=solver).nfe) for i in range(0, x.shape[0], batch_size)]


def run_log_prob(args) -> dict[str, list[dict]]:
    flow, train_s = power_sized_flow(args)
    print(f"[log_prob] POWER-sized flow trained in {train_s:.1f} s", flush=True)
    threads = torch.get_num_threads()
    x = six_d_data(args.n_logp, args.seed + 1)
    solvers = {"rk4 (4 steps)": SolverConfig(method="rk4", steps=4), "dopri5 (1e-5)": SolverConfig(method="dopri5")}
    bs = 4096
    cost, extrapolation = [], []
    for name, solver in solvers.items():
        # encode and log_prob on the same points, same batch size, alternately.
        nfe = encode_chunks(flow, x, solver, bs)
        times = interleaved(
            {
                "encode": lambda s=solver: encode_chunks(flow, x, s, bs),
                "log_prob": lambda s=solver: flow.log_prob(x, solver=s, batch_size=bs),
            },
            rounds=args.rounds,
            warmup=0,
        )
        enc, lp = times.median("encode"), times.median("log_prob")
        lp_cpu = times.median("log_prob", "cpu")
        cost.append(
            {
                "solver": name,
                "points": x.shape[0],
                "batch_size": bs,
                "nfe_per_batch": median(nfe),
                "encode_points_per_s": x.shape[0] / enc,
                "log_prob_points_per_s": x.shape[0] / lp,
                "log_prob/encode": lp / enc,
                "cpu: log_prob/encode": lp_cpu / times.median("encode", "cpu"),
                "meets_d+2=8": lp / enc <= 8,
            }
        )
        per_point_nfe = lp / x.shape[0] / median(nfe)
        extrapolation.append(
            {
                "solver": name,
                "nfe_per_batch": median(nfe),
                "measured_points": x.shape[0],
                "log_prob_s": lp,
                "us_per_point_and_nfe": 1e6 * per_point_nfe,
                "power_test_split_s (wall)": POWER_TEST_POINTS * lp / x.shape[0],
                "power_test_split_s (cpu/threads)": POWER_TEST_POINTS * lp_cpu / threads / x.shape[0],
                "prototype_s (220 s per 20k)": 220 * POWER_TEST_POINTS / 20_000,
            }
        )
        print(
            f"[log_prob] {name}: log_prob / encode = {lp / enc:.2f} (NFE {median(nfe)} per batch); "
            f"POWER test split ~{extrapolation[-1]['power_test_split_s (wall)']:.0f} s wall, "
            f"~{extrapolation[-1]['power_test_split_s (cpu/threads)']:.0f} s from CPU time",
            flush=True,
        )
    # Effect of the batch size. Fixed steps isolate the throughput per network evaluation (one rk4
    # step per block keeps it short); dopri5's step count also changes with the batch, since its
    # error norm is taken over the batch: encode (same steps as log_prob) counts them.
    xb = six_d_data(args.n_batch, args.seed + 2)
    one_step = SolverConfig(method="rk4", steps=1)
    times = interleaved(
        {b: lambda b=b: flow.log_prob(xb, solver=one_step, batch_size=b) for b in args.batch_sizes}, rounds=1, warmup=0
    )
    batch_rows = []
    for b in args.batch_sizes:
        n = xb.shape[0]
        rk4_nfe = encode_chunks(flow, xb[:b], one_step, b)[0]  # the same for every batch
        dopri_nfe = encode_chunks(flow, xb[:b], solvers["dopri5 (1e-5)"], b)[0]
        sec = times.median(b)
        batch_rows.append(
            {
                "batch_size": b,
                "points": n,
                "rk4-1 log_prob points_per_s": n / sec,
                "rk4-1 points_per_s (cpu/threads)": n * threads / times.median(b, "cpu"),
                "us_per_point_and_nfe": 1e6 * sec / n / rk4_nfe,
                "dopri5 nfe (first batch)": dopri_nfe,
            }
        )
        print(f"[log_prob] batch_size={b}: {batch_rows[-1]['rk4-1 log_prob points_per_s']:.0f} points/s", flush=True)
    return {"cost": cost, "extrapolation": extrapolation, "batch_size": batch_rows, "train_s": train_s}


# --- 5. subnormal floats ----------------------------------------------------------------------
def subnormal_share(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Fraction of the hidden activations of ``net(x, t)`` that are subnormal, computed unflushed."""
    tiny = torch.finfo(x.dtype).tiny
    counts = [0, 0]

    def count(_module, _inputs, out) -> None:
        counts[0] += int(((out != 0) & (out.abs() < tiny)).sum())
        counts[1] += out.numel()

    acts = [m for m in net.modules() if type(m).__module__ == torch.nn.modules.activation.__name__]
    hooks = [m.register_forward_hook(count) for m in acts]
    try:
        with flush_denormals(False), torch.no_grad():
            net(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    if not counts[1]:
        raise RuntimeError("subnormal_share: the network has no activation modules to watch")
    return counts[0] / counts[1]


def run_subnormals(args) -> tuple[list[dict], list[dict]]:
    """Alternate windows of a flushed and an unflushed run; per window: steps/s and the subnormal share."""
    window, rounds = (10, 4) if args.quick else (250, 20)
    ds = datasets.load("rings", seed=args.seed, sizes=(4_000, 1_000, 1_000) if args.quick else None)
    pool = Standardizer.fit(torch.from_numpy(ds.train))(torch.from_numpy(ds.train)).float()
    net, h, batch, lr = {"width": 75, "depth": 4}, None, 256 if args.quick else 2048, 3e-3
    runs = {on: LibraryLoop(pool, net, h, batch, lr, args.seed) for on in (True, False)}
    g = torch.Generator().manual_seed(args.seed + 1)
    val = pool[torch.randint(pool.shape[0], (batch,), generator=g)]
    z, t_val = torch.randn(val.shape, generator=g), torch.rand(batch, generator=g)
    interp = get_interpolant(runs[True].tc.interpolant)  # the free block's pairs (val, z), as trained
    x_t, target = interp.x_t(val, z, t_val), interp.dx_t(val, z, t_val)

    def val_loss(run: LibraryLoop) -> float:
        with flush_denormals(), torch.no_grad():
            return float((run.state.net(x_t, t_val) - target).pow(2).mean())

    windows = []
    for r in range(rounds):
        row = {"steps": (r + 1) * window}
        for on, run in runs.items():
            w0 = time.perf_counter()
            with flush_denormals(on):
                run.run(window)
            row["flushed_s" if on else "unflushed_s"] = time.perf_counter() - w0
        row["subnormal_share"] = subnormal_share(runs[False].state.net, x_t, t_val)
        row["val_loss_flushed"], row["val_loss_unflushed"] = val_loss(runs[True]), val_loss(runs[False])
        windows.append(row)
    rows = []
    per = max(1, rounds // 4)
    for k in range(0, rounds, per):
        part = windows[k : k + per]
        fl, un = sum(w["flushed_s"] for w in part), sum(w["unflushed_s"] for w in part)
        rows.append(
            {
                "steps": f"{k * window + 1}-{part[-1]['steps']}",
                "flushed_steps_per_s": len(part) * window / fl,
                "unflushed_steps_per_s": len(part) * window / un,
                "ratio (flushed/unflushed)": un / fl,
                "subnormal_share": part[-1]["subnormal_share"],
                "val_loss_flushed": part[-1]["val_loss_flushed"],
                "val_loss_unflushed": part[-1]["val_loss_unflushed"],
            }
        )
        print(
            f"[subnormals] steps {rows[-1]['steps']}: flushed {rows[-1]['flushed_steps_per_s']:.0f} /s, "
            f"unflushed {rows[-1]['unflushed_steps_per_s']:.0f} /s, subnormal share {part[-1]['subnormal_share']:.2e}",
            flush=True,
        )
    return rows, windows


def plot_subnormals(windows: list[dict], window: int, name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [w["steps"] for w in windows]
    for key, label in (("flushed_s", "flushed (fit)"), ("unflushed_s", "not flushed")):
        ax.plot(steps, [window / w[key] for w in windows], marker="o", ms=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("steps/s")
    ax.set_ylim(bottom=0)
    ax.set_title("softplus MLP on rings: subnormal floats")
    ax.legend()
    save_figure(fig, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget for a CI smoke run (< 60 s)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=None, help="fit time budget in seconds (default 120)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    q = args.quick
    args.budget = args.budget or (4.0 if q else 120.0)
    args.n_train = 2_000 if q else 10_000
    args.n_test = 1_000 if q else 20_000
    args.n_invert = 256 if q else 2048
    args.power_train, args.power_steps = (1_000, 5) if q else (5_000, 60)
    args.n_logp = 256 if q else 4096
    args.n_batch = 256 if q else 16_384
    args.batch_sizes = (64, 256) if q else (1024, 4096, 16_384)
    args.rounds = 1 if q else 2
    threads = start(args.out, args.threads)
    sections = args.only or SECTIONS

    t_start = time.perf_counter()
    results: dict = {}
    raw: dict = {}
    flows: dict = {}
    if "gaussian" in sections:
        results[S_GAUSS] = run_gaussian(args, flows)
        raw["gaussian_configs"] = gaussian_configs()
        raw["gaussian"] = {"mean": MEAN.tolist(), "cov": COV.tolist(), "n_train": args.n_train, "n_test": args.n_test}
    if "invertibility" in sections:
        results[S_INV] = run_invertibility(args, flows)
    if "overhead" in sections:
        results[S_OVH] = run_overhead(args)
    if "log_prob" in sections:
        lp = run_log_prob(args)
        results[S_COST], results[S_EXTRA], results[S_BATCH] = lp["cost"], lp["extrapolation"], lp["batch_size"]
        raw["power_sized_flow_fit_s"] = lp["train_s"]
    if "subnormals" in sections:
        results[S_SUB], raw["subnormal_windows"] = run_subnormals(args)
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s", flush=True)

    name = "core" + ("_quick" if q else "") + ("_" + "_".join(args.only) if args.only else "")
    notes = (
        f"Total run time {total:.0f} s. The machine is shared with other jobs: ratios come from variants "
        "run alternately in one process (medians); absolute rates vary with the load (`cpu/threads` "
        "columns estimate an idle machine from this process's CPU time)."
    )
    meta = metadata({"seed": args.seed, "train data": args.seed, "test data": args.seed + 1}, threads=threads)
    if "subnormals" in sections:
        windows = raw["subnormal_windows"]
        plot_subnormals(windows, windows[0]["steps"], name)
    write_results(
        name, "Core library figures (issue 2)", meta, results, notes=notes, section_notes=SECTION_NOTES, raw=raw
    )


if __name__ == "__main__":
    main()
