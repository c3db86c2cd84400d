"""Pool storage (``train.pool_storage``): the memory and time of ``fit`` with pools on the device
against pools on disk, over pool sizes, on Fashion-MNIST images.

Each (size, storage) pair is one ``fit`` in its own process, on the same memory-mapped float32 copy
of the training images, with a small UNet per block (3 blocks, so two pushforwards) and one Euler
step per block, so that the pushes, not the training, dominate. A thread samples the process's
``/proc/self/status`` every 20 ms: ``anon`` is memory the process owns (what it would need
if nothing could be paged out), ``rss`` adds the mapped file pages that are resident (the page
cache, which the system reclaims under pressure). Peaks are reported above the process's memory
just before ``fit`` (torch, the model code and the open data file). Both storages must train the
same model: the parameters' hashes are compared.

    python benchmarks/bench_pools.py            # 55,000 images at three sizes, ~10 minutes
    python benchmarks/bench_pools.py --quick --out DIR   # CI smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402, I001  (first: it sets the OpenMP wait policy before torch loads)
from _common import metadata, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

STORAGES = ("device", "disk")


def config(quick: bool, storage: str) -> dict:
    return {
        "seed": 0,
        "net": {
            "kind": "unet",
            "channels": 4,
            "channel_mult": [1, 2],
            "blocks_per_level": 1,
            "attention_resolutions": [],
        },
        "blocks": {"schedule": "list", "h": [0.1, 0.15], "free_block": True},
        "train": {
            "steps": 2 if quick else 10,
            "batch_size": 32,
            "push_batch_size": 100,
            "log_every": 1,
            "pool_storage": storage,
        },
        "solver": {"method": "euler", "steps": 1},
    }


def memory_mb() -> dict[str, float]:
    """RssAnon and VmRSS of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                out["anon" if key == "RssAnon" else "rss"] = float(value.split()[0]) / 1024
    return out


def child(data: Path, size: int, storage: str, quick: bool) -> None:
    """One fit; prints its figures as one JSON line."""
    import localfm

    torch.set_num_threads(1)
    x = torch.from_numpy(np.load(data, mmap_mode="c")[:size])
    base = memory_mb()
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            for k, v in memory_mb().items():
                peak[k] = max(peak[k], v)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    flow = localfm.fit(x, config(quick, storage))
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    for k, v in memory_mb().items():
        peak[k] = max(peak[k], v)
    digest = hashlib.sha256()
    for v in flow.state_dict().values():
        digest.update(v.detach().cpu().contiguous().numpy().tobytes())
    log = flow.training_log
    print(
        json.dumps(
            {
                "images": size,
                "storage": storage,
                "pool_mb": size * x[0].numel() * 4 / 2**20,
                "peak_anon_mb": peak["anon"] - base["anon"],
                "peak_rss_mb": peak["rss"] - base["rss"],
                "fit_s": wall,
                "push_s": sum(b["push_seconds"] for b in log),
                "train_s": sum(b["train_seconds"] for b in log),
                "params_sha256": digest.hexdigest()[:16],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--child", nargs=3, metavar=("DATA", "SIZE", "STORAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), int(args.child[1]), args.child[2], args.quick)
    _common.start(args.out, 1)
    if args.quick:
        images = np.random.default_rng(0).uniform(-1, 1, (600, 1, 28, 28)).astype(np.float32)
        sizes, source = [300, 600], "uniform noise images (quick run)"
    else:
        from localfm.datasets import load

        images = load("fashion-mnist").train.astype(np.float32)
        sizes, source = [len(images) // 4, len(images) // 2, len(images)], "Fashion-MNIST training images"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pools-") as tmp:
        data = Path(tmp) / "images.npy"
        np.save(data, images)
        del images
        for size in sizes:
            for storage in STORAGES:  # side by side at each size
                cmd = [sys.executable, __file__, "--child", str(data), str(size), storage]
                out = subprocess.run(
                    cmd + (["--quick"] if args.quick else []), check=True, capture_output=True, text=True
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{size:6d} images, {storage:6s}: peak anon {row['peak_anon_mb']:7.1f} MB, "
                    f"rss {row['peak_rss_mb']:7.1f} MB, fit {row['fit_s']:6.1f} s (push {row['push_s']:.1f} s)",
                    flush=True,
                )
    same = all(len({r["params_sha256"] for r in rows if r["images"] == size}) == 1 for size in sizes)
    for r in rows:
        dev = next(d for d in rows if d["images"] == r["images"] and d["storage"] == "device")
        r["anon_vs_device"] = r["peak_anon_mb"] / max(dev["peak_anon_mb"], 1e-9)
        r["fit_time_vs_device"] = r["fit_s"] / dev["fit_s"]
    write_results(
        "pools_quick" if args.quick else "pools",
        "Pool storage: fit's memory and time with pools on the device and on disk",
        metadata([0], data=source, config=config(args.quick, "<storage>"), same_parameters=same),
        {"Peak memory and time of fit": rows},
        notes=(
            f"{__doc__.split(chr(10) + chr(10))[1]}\n\nSame trained parameters for both storages at every size: "
            f"**{same}**. `pool_mb` is one pool's size (float32). `anon_vs_device` and `fit_time_vs_device` "
            "are ratios to the device storage at the same size (one run each; the machine is shared)."
        ),
    )
    if not same:
        raise SystemExit("pools on disk trained a different model from pools on the device")


if __name__ == "__main__":
    main()
