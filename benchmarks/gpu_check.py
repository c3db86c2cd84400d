"""GPU check of the image path: a short CIFAR-shaped LFM training with bf16 mixed precision and EMA.

Run by ``benchmarks/gpu_check.sh`` on a machine with a CUDA GPU (about 3 minutes). Writes one JSON
file, rewritten after every stage so that a run cut short keeps what it measured:

1. ``env``: torch, CUDA, the GPU, bf16 support, which localfm dependencies came from where.
2. ``step_throughput``: images/s of one training step (forward, loss, backward, Adam, EMA) of the
   CIFAR-10 block UNet (``configs/cifar10.yaml``, 9.6M parameters) and of its FM twin (38.3M),
   batch 128, with and without ``train.amp`` (bf16 autocast), after warm-up steps.
3. ``fit``: ``localfm.fit`` of a 4-block LFM (the CIFAR-10 block UNet, amp, EMA, warm-up, clipping)
   on synthetic 3x32x32 images under a time budget: training images/s per block, pushforward
   seconds, final losses; then samples and Hutchinson bits/dim of dequantised held-out images on
   the GPU, to check that both are finite.

    python benchmarks/gpu_check.py --out gpu_check.json [--budget 90] [--smoke]

``--smoke`` runs everything tiny on the CPU (a check of the script itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
# Dependencies missing on the GPU machine may be carried in from the repo's venv; appended, so the
# machine's own packages win.
for sp in sorted((ROOT / ".venv" / "lib").glob("python3*/site-packages")):
    sys.path.append(str(sp))

import torch  # noqa: E402

RESULT: dict = {"stages_done": []}


def save(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(RESULT, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def env() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    mods = {}
    for name in ("numpy", "yaml", "safetensors", "torchdiffeq", "tqdm"):
        try:
            m = __import__(name)
            carried = str(ROOT / ".venv") in (getattr(m, "__file__", "") or "")
            where = "carried from the repo venv" if carried else "machine"
            mods[name] = f"{getattr(m, '__version__', '?')} ({where})"
        except ImportError as err:
            mods[name] = f"missing: {err}"
    info["modules"] = mods
    return info


def synthetic_images(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Smooth random 3x32x32 images in [-1, 1], quantised to 256 levels like CIFAR-10's."""
    import torch.nn.functional as F

    low = torch.randn(n, 3, 4, 4, generator=generator, device=device)
    x = torch.tanh(1.5 * F.interpolate(low, size=32, mode="bicubic", align_corners=False))
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def step_throughput(device, smoke: bool) -> list[dict]:
    from localfm.config import load_config
    from localfm.nets import build_net
    from localfm.training import new_block_state, train_block

    rows = []
    batch = 8 if smoke else 128
    warm, timed = (2, 3) if smoke else (10, 30)
    g = torch.Generator(device).manual_seed(0)
    pool = synthetic_images(512 if smoke else 4096, g, device)
    for name in ("cifar10", "cifar10_fm"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        net_cfg = dataclasses.replace(cfg.net, channels=8) if smoke else cfg.net
        for amp in (False, True):
            tc = dataclasses.replace(cfg.train, batch_size=batch, amp=amp, warmup=10, log_every=10**6)
            torch.manual_seed(0)
            net = build_net((3, 32, 32), net_cfg).to(device)
            state = new_block_state(net, tc)
            train_block(state, pool, 0.1, tc, warm, generator=g)  # warm-up: kernels, allocator
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_block(state, pool, 0.1, tc, warm + timed, generator=g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rows.append(
                {
                    "model": name,
                    "parameters": sum(p.numel() for p in net.parameters()),
                    "amp": amp,
                    "batch": batch,
                    "steps_timed": timed,
                    "seconds": dt,
                    "images_per_s": timed * batch / dt,
                    "final_loss": state.losses[-1][1] if state.losses else None,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                }
            )
            print(rows[-1], flush=True)
            del net, state
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


def fit_check(device, budget: float, smoke: bool) -> dict:
    import numpy as np

    import localfm
    from localfm.datasets import bits_per_dim, dequantize
    from localfm.metrics import nll_summary

    g = torch.Generator(device).manual_seed(1)
    n_train, n_test = (256, 16) if smoke else (20_000, 512)
    x = synthetic_images(n_train + n_test, g, device)
    x_train, x_test = x[:n_train], x[n_train:]
    cfg = {
        "device": device.type,
        "net": {
            "kind": "unet",
            "channels": 8 if smoke else 64,
            "channel_mult": [1, 2, 2, 2],
            "blocks_per_level": 2,
            "attention_resolutions": [16],
            "heads": 4,
            "dropout": 0.1,
        },
        "blocks": {"schedule": "list", "h": [0.1, 0.15, 0.225]},
        "train": {
            "steps": 10**6,  # the budget decides
            "batch_size": 8 if smoke else 128,
            "lr": 2e-4,
            "lr_schedule": "constant",
            "warmup": 100,
            "grad_clip": 1.0,
            "ema": 0.9999,
            "interpolant": "linear",
            "amp": True,
            "push_batch_size": 64 if smoke else 2000,
            "log_every": 25,
        },
        "solver": {"method": "rk4", "steps": 2},
    }
    t0 = time.perf_counter()
    flow = localfm.fit(x_train, cfg, time_budget=budget, seed=0)
    wall = time.perf_counter() - t0
    blocks = [
        {
            "block": r["block"] + 1,
            "h": r["h"],
            "steps": r["steps"],
            "train_s": r["train_seconds"],
            "push_s": r["push_seconds"],
            "train_images_per_s": r["steps"] * cfg["train"]["batch_size"] / max(r["train_seconds"], 1e-9),
            "final_loss": r["losses"][-1][1] if r["losses"] else None,
        }
        for r in flow.training_log
    ]
    out = {"budget_s": budget, "fit_wall_s": wall, "train_points": n_train, "blocks": blocks}
    out["parameters"] = sum(p.numel() for p in flow.parameters())
    t0 = time.perf_counter()
    s = flow.sample(n_test, generator=torch.Generator(device).manual_seed(2), batch_size=512)
    out["sample_s"] = time.perf_counter() - t0
    out["samples_finite"] = bool(torch.isfinite(s).all())
    out["samples_per_s"] = n_test / out["sample_s"]
    xq = dequantize(x_test.cpu().numpy(), np.random.default_rng(3))
    t0 = time.perf_counter()
    lp = flow.log_prob(
        torch.from_numpy(xq).to(device), batch_size=256, generator=torch.Generator(device).manual_seed(4)
    )
    out["log_prob_s"] = time.perf_counter() - t0
    m = nll_summary(lp.cpu())
    out["bits_per_dim"] = float(bits_per_dim(m["nll"], 3 * 32 * 32))
    out["bits_per_dim_se"] = m["nll_se"] / (3 * 32 * 32 * math.log(2))
    out["bits_per_dim_finite"] = math.isfinite(out["bits_per_dim"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=90.0, help="fit time budget in seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU: checks the script")
    args = parser.parse_args()
    t_start = time.perf_counter()
    RESULT["env"] = env()
    RESULT["command"] = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]).replace(str(args.out), "OUT")
    save(args.out)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    RESULT["device"] = str(device)
    if device.type != "cuda" and not args.smoke:
        RESULT["error"] = "CUDA is not available to this torch: nothing measured"
        save(args.out)
        return
    for stage, fn in (
        ("step_throughput", lambda: step_throughput(device, args.smoke)),
        ("fit", lambda: fit_check(device, args.budget if not args.smoke else 10.0, args.smoke)),
    ):
        t0 = time.perf_counter()
        try:
            RESULT[stage] = fn()
            RESULT["stages_done"].append(stage)
        except Exception as err:  # record and go on: one call of the GPU machine, keep what works
            import traceback

            RESULT[stage] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            print(RESULT[stage]["traceback"], file=sys.stderr, flush=True)
        RESULT[f"{stage}_seconds"] = time.perf_counter() - t0
        save(args.out)
    RESULT["total_seconds"] = time.perf_counter() - t_start
    save(args.out)
    print(json.dumps({k: v for k, v in RESULT.items() if k != "env"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
