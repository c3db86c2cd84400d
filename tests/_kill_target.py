"""A tiny resumable training run for the kill-and-resume tests (run as a subprocess).

Usage: ``python _kill_target.py RUN_DIR [WRITE_PAUSE_S]`` (``KILL_TARGET_POOLS=disk``: pools on disk).
Trains a fixed seeded problem with
``localfm.fit(..., run_dir=RUN_DIR, resume=True)`` and saves the result to ``RUN_DIR/final``.
It prints one line per event, flushed, so that the parent can kill it right after one:

* ``train B S``: a progress report of block B at step S (every ``log_every`` steps);
* ``push B I``: I points of block B's pool have been pushed;
* ``write NAME``: half of a file is on disk under its temporary name, the rest follows after
  ``WRITE_PAUSE_S`` seconds (the write is slowed here, in the test script, not in localfm);
* ``done``: training finished and the model is saved.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import localfm
import localfm.checkpoint
import localfm.runstate

CONFIG = {
    "seed": 3,
    "dtype": "float64",
    "net": {"width": 16, "depth": 2, "activation": "tanh"},
    "blocks": {"schedule": "list", "h": [0.2, 0.3, 0.4], "free_block": True},
    "train": {
        "steps": 60,
        "batch_size": 64,
        "lr": 5e-3,
        "lr_schedule": "cosine",
        "warmup": 5,
        "ema": 0.9,
        "log_every": 5,
        "checkpoint_every": 8,
        "keep_checkpoints": 2,
        "push_batch_size": 32,
    },
    "solver": {"method": "rk4", "steps": 3},
}


def data() -> torch.Tensor:
    """Two Gaussian blobs in 2-D, the same every time."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(192, 2, generator=g, dtype=torch.float64)
    return x + torch.where(torch.rand(192, 1, generator=g) < 0.5, 2.0, -2.0)


def slow_atomic_write(pause: float):
    """``atomic_write_bytes`` that stops half-way through the temporary file (to be killed there)."""

    def write(path: Path, data: bytes) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            print(f"write {path.name}", flush=True)
            time.sleep(pause)
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    return write


def main() -> None:
    run_dir = Path(sys.argv[1])
    pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    torch.set_num_threads(1)
    if pause > 0:
        localfm.checkpoint.atomic_write_bytes = slow_atomic_write(pause)
        localfm.runstate.atomic_write_bytes = localfm.checkpoint.atomic_write_bytes

    def callback(p: localfm.Progress) -> None:
        if p.phase in ("train", "push"):
            print(f"{p.phase} {p.block} {p.step}", flush=True)

    config = dict(CONFIG, train=dict(CONFIG["train"], pool_storage=os.environ.get("KILL_TARGET_POOLS", "device")))
    flow = localfm.fit(data(), config, run_dir=run_dir, resume=True, callback=callback)
    localfm.save(flow, run_dir / "final")
    print("done", flush=True)


if __name__ == "__main__":
    main()
