"""The command line, run as a user runs it: real subprocesses on a real (small) training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small_cpu.yaml"


def localfm(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "localfm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"localfm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One small run made by `localfm train`, shared by the command tests below (pools on disk)."""
    work = tmp_path_factory.mktemp("cli")
    out = work / "run"
    sets = ["--set", "train.steps=150", "--set", "train.pool_storage=disk"]
    proc = localfm("train", str(SMALL), "--out", str(out), *sets, "--no-eval", cwd=work)
    assert "trained 3 blocks" in proc.stdout
    return out


def test_train_writes_a_complete_run_folder(run: Path) -> None:
    for name in ["config.yaml", "run.json", "log.jsonl", "model/flow.json", "model/model.safetensors"]:
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["dataset"]["name"] == "8gaussians" and info["train_seconds"] > 0
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {e["phase"] for e in events} >= {"train", "push", "done"}
    assert any((run / "checkpoints").iterdir())
    # train.pool_storage=disk: the checkpoints refer to the pushed pools' own .npy files
    pools = sorted(p.name for p in (run / "checkpoints").glob("pool-b*"))
    assert pools and all(p.endswith(".npy") for p in pools)


def test_eval_writes_metrics(run: Path) -> None:
    proc = localfm("eval", str(run), "--max-points", "2000", "--n-samples", "1000", cwd=run.parent)
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] == 2000 and np.isfinite(m["nll"]) and m["nll_se"] > 0
    # 8gaussians has an exact density: the gap to the true entropy is reported, and a short run
    # is above the entropy (a model cannot beat the truth by more than noise).
    assert m["gap"] > -3 * (m["nll_se"] + m["true_entropy_se"])
    assert m["energy_distance"] >= -0.01 and "metrics.json" in proc.stdout


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_sample_in_data_units(run: Path, suffix: str) -> None:
    out = run.parent / f"s{suffix}"
    localfm("sample", str(run), "-n", "500", "--out", str(out), cwd=run.parent)
    x = np.load(out) if suffix == ".npy" else np.loadtxt(out, delimiter=",", skiprows=1)
    assert x.shape == (500, 2) and np.isfinite(x).all()
    # 8gaussians lives on a circle of radius 2*sqrt(2): samples in data units, not standardised.
    r = np.linalg.norm(x, axis=1)
    assert 1.5 < np.median(r) < 4.0


def test_plot_and_report(run: Path) -> None:
    proc = localfm("plot", str(run), "--n-samples", "2000", cwd=run.parent)
    for name in ["samples.png", "blocks.png", "density.png", "losses.png"]:
        path = run / "plots" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert str(path) in proc.stdout
    localfm("report", str(run), cwd=run.parent)
    md = (run / "report.md").read_text()
    assert "plots/samples.png" in md and "| blocks |" in md
    assert "<img" in (run / "report.html").read_text()


def test_resume_continues_a_finished_run_without_retraining(run: Path, tmp_path: Path) -> None:
    proc = localfm(
        "train", str(SMALL), "--out", str(run), "--set", "train.steps=150", "--resume", "--no-eval", cwd=tmp_path
    )
    assert "trained 3 blocks" in proc.stdout


def test_dry_run_prints_the_resolved_config_and_trains_nothing(tmp_path: Path) -> None:
    proc = localfm(
        "train", str(SMALL), "--set", "train.lr=3e-4", "--dry-run", "--out", str(tmp_path / "r"), cwd=tmp_path
    )
    assert "lr: 0.0003" in proc.stdout and "dry run" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_datasets_lists_every_kind(tmp_path: Path) -> None:
    out = localfm("datasets", cwd=tmp_path).stdout
    for name in ["tree", "rose", "8gaussians", "power", "gas", "miniboone", "bsds300", "fashion-mnist"]:
        assert name in out


def test_version_and_help(tmp_path: Path, capsys) -> None:
    assert localfm("--version", cwd=tmp_path).stdout.startswith("localfm ")
    from localfm.cli import main

    # --help of every command, in-process (each command also runs as a subprocess above and below).
    for cmd in ["demo", "train", "sample", "eval", "plot", "report", "datasets"]:
        with pytest.raises(SystemExit) as stop:
            main([cmd, "--help"])
        assert stop.value.code == 0 and "examples:" in capsys.readouterr().out, cmd


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.yaml"], "config file not found"),
        (["train", str(SMALL), "--set", "train.stesp=3", "--dry-run"], "did you mean 'steps'"),
        (["train", str(SMALL), "--set", "train.lr=-1", "--dry-run"], "train.lr must be > 0"),
        (["train", str(SMALL), "--set", "solver.logdet_control=maybe", "--dry-run"], "solver.logdet_control"),
        (["train", str(SMALL), "--set", "data=nosuchdata", "--dry-run"], "nosuchdata"),
        (["eval", "no_such_run"], "not a finished run"),
        (["sample", "no_such_run", "-n", "3"], "not a finished run"),
        (["--threads", "0", "datasets"], "--threads must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = localfm(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localfm: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_quick_writes_a_report(tmp_path: Path) -> None:
    proc = localfm("demo", "--quick", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert (tmp_path / "demo" / "report.html").is_file()
    assert "report.html" in proc.stdout
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert m["dataset"] == "tree" and np.isfinite(m["nll"])
    # the fork levels of the tree: the target shows more than a seconds-long quick model can
    b = m["branching"]
    assert b["target"]["levels"] >= 6 and 0 <= b["model"]["levels"] <= b["target"]["levels"]
    assert "fork levels shown" in (tmp_path / "demo" / "report.md").read_text()


def test_fid_on_a_run_that_is_not_images_is_refused_before_any_work(run: Path) -> None:
    proc = localfm("eval", str(run), "--fid-weights", "pt_inception.pth", cwd=run.parent, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "localfm: error: FID is for images; this run's data (8gaussians) are not images: drop --fid-weights"
    )


def test_distill_then_sample_and_eval_the_student(run: Path) -> None:
    proc = localfm("distill", str(run), "--train-steps", "60", cwd=run.parent)
    student = run / "distilled-k1"
    assert (student).is_dir() and str(student) in proc.stdout
    out = run.parent / "d.npy"
    localfm("sample", str(student), "-n", "300", "--out", str(out), cwd=run.parent)
    x = np.load(out)
    assert x.shape == (300, 2) and np.isfinite(x).all()
    localfm("eval", str(student), "--n-samples", "500", cwd=run.parent)
    m = json.loads((student / "metrics.json").read_text())
    # One step per block: as many network evaluations per sample as blocks, and no likelihood.
    assert m["network_evaluations_per_sample"] == 3 and "nll" not in m and m["energy_distance"] < 1.0
    # One fresh student, twice as wide, for the whole chain: its own folder, one evaluation per sample.
    proc = localfm("distill", str(run), "--group-size", "3", "--width", "128", "--train-steps", "60", cwd=run.parent)
    wide = run / "distilled-k1-m3-w128"
    assert str(wide) in proc.stdout
    localfm("sample", str(wide), "-n", "50", "--out", str(out), cwd=run.parent)
    assert np.load(out).shape == (50, 2)
    assert json.loads((wide / "distilled.json").read_text())["distill_config"]["width"] == 128
    bad = localfm("distill", str(run), "--width", "0", cwd=run.parent, check=False)
    assert bad.returncode == 2 and "distill.width" in bad.stderr and "Traceback" not in bad.stderr


def test_train_on_a_user_file_by_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]]) + 2.0
    np.save(tmp_path / "mine.npy", x)
    out = tmp_path / "run"
    localfm(
        "train",
        str(SMALL),
        "--set",
        f"data={tmp_path / 'mine.npy'}",
        "--set",
        "train.steps=40",
        "--set",
        "blocks.L=1",
        "--out",
        str(out),
        "--no-eval",
        cwd=tmp_path,
    )
    info = json.loads((out / "run.json").read_text())
    assert info["dataset"]["kind"] == "tabular" and sum(info["dataset"]["sizes"]) == 600
    localfm("sample", str(out), "-n", "200", "--out", str(tmp_path / "s.npy"), cwd=tmp_path)
    s = np.load(tmp_path / "s.npy")
    # Samples come back in the file's units (the data has mean 2 in every coordinate).
    assert s.shape == (200, 3) and abs(s.mean() - 2.0) < 1.0


def test_threads_option_sets_torch_threads(capsys) -> None:
    import torch

    from localfm.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "2", "datasets"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["--threads", "1", "datasets"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "tree" in capsys.readouterr().out
