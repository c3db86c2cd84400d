"""Smoke runs of the comparison suites (issue 5): each suite's ``--tiny`` mode, for real, into a temp folder.

These check what the scripts write (every contender present, finite NLLs, LFM and FM at equal
parameter counts, learning curves in time order, the theory chain's OU time), not the numbers:
benchmarks are scripts, never timed tests. A contender whose package is not installed is
skipped by the script, and only then.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CONTENDERS = ("LFM", "FM", "torchcfm", "zuko-NSF", "zuko-MAF")
PACKAGE = {"torchcfm": "torchcfm", "zuko-NSF": "zuko", "zuko-MAF": "zuko"}

pytestmark = pytest.mark.slow


def expected_contenders() -> list[str]:
    return [c for c in CONTENDERS if c not in PACKAGE or importlib.util.find_spec(PACKAGE[c]) is not None]


def run_script(script: str, *args: str) -> None:
    """Run ``benchmarks/<script>`` as a user would; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def run_tiny(script: str, out: Path, *extra: str) -> dict:
    run_script(script, "--tiny", "--out", str(out), *extra)
    name = {"bench_2d.py": "2d_tiny", "bench_power.py": "power_tiny", "bench_theory.py": "theory_tiny"}[script]
    payload = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert payload["meta"]["command"].startswith("python benchmarks/")
    for heading in payload["sections"]:
        assert f"## {heading}" in md
    return payload


def test_bench_2d_tiny(tmp_path):
    payload = run_tiny("bench_2d.py", tmp_path)
    rows = payload["raw"]["rows"]
    want = expected_contenders()
    assert {r["contender"] for r in rows["runs"]} == set(want)
    for data in ("8gaussians", "moons"):
        got = {r["contender"]: r for r in rows["runs"] if r["dataset"] == data}
        assert set(got) == set(want), data
        for r in got.values():
            assert math.isfinite(r["nll"]) and r["nll_se"] > 0
            assert math.isfinite(r["paired_gap"]) and math.isfinite(r["ED"])
            assert r["nll-H"] == pytest.approx(r["nll"] - r["H"])
            assert r["nfe/sample"] >= 1
        # one reference solver gives every ODE model's NLL (the solver check ran on the same 1,000 points)
        for name in ("LFM", "FM", "torchcfm"):
            if name in got:
                assert got[name]["nll_solver"] == "dopri5 1e-5"
                assert got[name]["nll"] == pytest.approx(got[name]["dopri5_nll"], abs=1e-5)
        # equal total parameters for LFM (4 blocks) and global FM (one wider block)
        assert abs(got["LFM"]["params"] - got["FM"]["params"]) <= 0.002 * got["LFM"]["params"]
        assert got["LFM"]["steps"].count(",") == 3 and "," not in got["FM"]["steps"]
        # LFM integrates with rk4 4 steps per block everywhere: 4 blocks x 16 evaluations
        assert got["LFM"]["nfe/sample"] == 64
    # the sweep: every contender tried every setting, on the validation split
    sweep = rows["sweep"]
    assert {(r["contender"], r["lr"]) for r in sweep} == {(c, lr) for c in want for lr in (1e-3, 3e-3)}
    assert all(
        sum(r["best"] for r in payload["sections"][s] if r["contender"] == c) == 1
        for s in payload["sections"]
        if s.startswith("Tuning")
        for c in want
    )
    checks = next(v for k, v in payload["sections"].items() if k.startswith("The issue"))
    assert "LFM gap <= FM gap (datasets)" in checks


def test_bench_2d_tiny_train_gap(tmp_path):
    """The over-fitting diagnostic: each flow's paired gap on training points beside the test gap."""
    payload = run_tiny("bench_2d.py", tmp_path, "--contenders", "LFM", "FM", "--train-gap-points", "300")
    runs = payload["raw"]["rows"]["runs"]
    assert len(runs) == 4 and all(math.isfinite(r["train_gap"]) and r["train_gap_se"] > 0 for r in runs)
    assert all(r["train_gap"] != r["paired_gap"] for r in runs)  # other points, another mean
    table = next(v for k, v in payload["sections"].items() if k.startswith("All runs"))
    assert all("train_gap" in r for r in table)


def test_bench_2d_tiny_averages_training_seeds(tmp_path):
    payload = run_tiny("bench_2d.py", tmp_path, "--contenders", "LFM", "FM", "--train-seeds", "0", "1")
    runs = payload["raw"]["rows"]["runs"]
    table = next(v for k, v in payload["sections"].items() if k.startswith("Gap to the true entropy"))
    for data in ("8gaussians", "moons"):
        gap = {(r["contender"], r["seed"]): r["paired_gap"] for r in runs if r["dataset"] == data}
        assert set(gap) == {(c, k) for c in ("LFM", "FM") for k in (0, 1)}
        assert gap["LFM", 0] != gap["LFM", 1]  # the training seed reaches the training
        line = next(r for r in table if r["dataset"] == data)
        assert float(line["LFM"].split()[0]) == pytest.approx((gap["LFM", 0] + gap["LFM", 1]) / 2, abs=1e-3)
        diff = sum(gap["LFM", k] - gap["FM", k] for k in (0, 1)) / 2
        assert line["LFM-FM"].endswith("(2 seeds)")
        assert float(line["LFM-FM"].split()[0]) == pytest.approx(diff, abs=1e-3)
        assert line["LFM<=FM"] == (diff <= 0)
        # seeds for the sign at 2 SE: (2 sd / |mean|)^2, sd of two values = |a - b| / sqrt(2)
        d = [gap["LFM", k] - gap["FM", k] for k in (0, 1)]
        need = (2 * abs(d[0] - d[1]) / math.sqrt(2) / abs(diff)) ** 2
        assert line["seeds for 2 SE"] == max(2, math.ceil(need))
    # the datasets LFM loses beyond two standard errors of the difference between seeds
    worse = []
    for data in ("8gaussians", "moons"):
        gap = {(r["contender"], r["seed"]): r["paired_gap"] for r in runs if r["dataset"] == data}
        d = [gap["LFM", k] - gap["FM", k] for k in (0, 1)]
        if sum(d) / 2 > 2 * abs(d[0] - d[1]) / 2:  # the SE of a two-seed mean is half their difference
            worse.append(data)
    checks = next(v for k, v in payload["sections"].items() if k.startswith("The issue"))
    assert checks["LFM gap above FM's by more than 2 SE"].startswith(f"{len(worse)} of 2")
    assert all(data in checks["LFM gap above FM's by more than 2 SE"] for data in worse)


def test_bench_2d_tiny_fewer_wider_lfm_blocks(tmp_path):
    """``--lfm-h``: LFM with one OU block and the free block, each wider, at the default's total parameters;
    FM keeps its network, and the run writes its own results file."""
    run_script("bench_2d.py", "--tiny", "--out", str(tmp_path), "--contenders", "LFM", "FM", "--lfm-h", "0.15")
    assert not (tmp_path / "2d_tiny.json").exists()
    payload = json.loads((tmp_path / "2d_tiny_lfmh1.json").read_text())
    assert "h = [0.15]" in payload["title"]
    for data in ("8gaussians", "moons"):
        got = {r["contender"]: r for r in payload["raw"]["rows"]["runs"] if r["dataset"] == data}
        assert got["LFM"]["steps"].count(",") == 1  # two blocks
        assert got["LFM"]["nfe/sample"] == 32  # rk4 4 steps per block
        assert got["FM"]["params"] == 34_842  # the 130-wide network of the default's FM twin
        assert abs(got["LFM"]["params"] - got["FM"]["params"]) <= 0.01 * got["FM"]["params"]


def test_bench_2d_tiny_sweeps_architecture(tmp_path):
    """``--lfm-blocks 4 2 --lfm-depths 3 4 --fm-depths 3 4``: the sweep tries each architecture (same total
    parameters; LFM's blocks x depths) at every lr x batch, each contender's lowest validation NLL is what
    runs, and the table keeps those runs."""
    arch = ("--lfm-blocks", "4", "2", "--lfm-depths", "3", "4", "--fm-depths", "3", "4")
    run_script("bench_2d.py", "--tiny", "--out", str(tmp_path), "--contenders", "LFM", "FM", *arch)
    path = tmp_path / "2d_tiny_arch.json"
    payload = json.loads(path.read_text())
    rows = payload["raw"]["rows"]
    tried = {(r["contender"], r["arch"], r["lr"]) for r in rows["sweep"]}
    archs = {"LFM": (None, "blocks=2", "depth=4", "blocks=2 depth=4"), "FM": (None, "depth=4")}
    assert tried == {(c, a, lr) for c in archs for a in archs[c] for lr in (1e-3, 3e-3)}
    for c in archs:
        best = min((r for r in rows["sweep"] if r["contender"] == c), key=lambda r: r["val_nll"])
        label = f"lr={best['lr']:g} batch={best['batch']}" + (f" {best['arch']}" if best["arch"] else "")
        runs = [r for r in rows["runs"] if r["contender"] == c]
        assert len(runs) == 2 and all(r["setting"] == label for r in runs)
        for r in runs:
            assert abs(r["params"] - 34_824) <= 0.01 * 34_824  # every architecture at the same total
            if c == "LFM":
                assert r["steps"].count(",") == (1 if "blocks=2" in (best["arch"] or "") else 3)
    # a run of a setting the sweep did not choose stays in the file but out of the tables
    stale = {**rows["runs"][0], "setting": "lr=0.1 batch=1", "paired_gap": 99.0}
    rows["runs"].append(stale)
    path.write_text(json.dumps(payload))
    run_script("bench_2d.py", "--tiny", "--out", str(tmp_path), *arch, "--render")
    payload = json.loads(path.read_text())
    assert stale in payload["raw"]["rows"]["runs"]
    listed = next(v for k, v in payload["sections"].items() if k.startswith("All runs"))
    assert len(listed) == 4 and all(r["setting"] != "lr=0.1 batch=1" for r in listed)
    # ... and in the ablation table of every setting with runs, beside the chosen ones
    every = {r["dataset"]: r for r in next(v for k, v in payload["sections"].items() if k.startswith("Every setting"))}
    assert every[stale["dataset"]][f"{stale['contender']} lr=0.1 batch=1"] == "99.0000 (1)"
    chosen = next(r for r in listed if r["dataset"] == stale["dataset"] and r["contender"] == stale["contender"])
    assert every[stale["dataset"]][f"{stale['contender']} {chosen['setting']}"] == f"{chosen['paired_gap']:.4f} (1)"


def test_bench_2d_tiny_sweeps_on_two_datasets(tmp_path):
    """``--sweep-data 8gaussians moons``: every setting is tried on both, the one with the lowest mean
    validation NLL over the two is what runs, and the results go to their own file."""
    run_script(
        "bench_2d.py",
        "--tiny",
        "--out",
        str(tmp_path),
        "--contenders",
        "LFM",
        "FM",
        "--sweep-data",
        "8gaussians",
        "moons",
    )
    assert not (tmp_path / "2d_tiny.json").exists()
    payload = json.loads((tmp_path / "2d_tiny_sweep-8gaussians-moons.json").read_text())
    assert payload["title"].endswith("tuned on 8gaussians and moons")
    rows = payload["raw"]["rows"]
    for c in ("LFM", "FM"):
        sweep = [r for r in rows["sweep"] if r["contender"] == c]
        assert {(r["dataset"], r["lr"]) for r in sweep} == {
            (d, lr) for d in ("8gaussians", "moons") for lr in (1e-3, 3e-3)
        }
        mean = {lr: statistics.fmean(r["val_nll"] for r in sweep if r["lr"] == lr) for lr in (1e-3, 3e-3)}
        label = f"lr={min(mean, key=mean.get):g} batch=256"
        assert {r["setting"] for r in rows["runs"] if r["contender"] == c} == {label}


def test_bench_2d_tiny_per_dataset(tmp_path):
    """``--per-dataset``: no shared sweep; at the first training seed every setting runs on every
    dataset and is scored on the validation split; the later seed runs only the setting with the lower
    score, and the tables keep, per dataset, each contender's runs of that setting (both seeds)."""
    run_script(
        "bench_2d.py", "--tiny", "--out", str(tmp_path), "--contenders", "LFM", "FM", "--per-dataset",
        "--train-seeds", "0", "1",
    )  # fmt: skip
    payload = json.loads((tmp_path / "2d_tiny_per-dataset.json").read_text())
    rows = payload["raw"]["rows"]
    assert not rows.get("sweep")
    listed = next(v for k, v in payload["sections"].items() if k.startswith("All runs"))
    table = {r["dataset"]: r for r in next(v for k, v in payload["sections"].items() if k.startswith("Gap to"))}
    for data in ("8gaussians", "moons"):
        for c in ("LFM", "FM"):
            mine = [r for r in rows["runs"] if (r["dataset"], r["contender"]) == (data, c)]
            tuning = {r["setting"]: r for r in mine if r["seed"] == 0}
            assert set(tuning) == {"lr=0.001 batch=256", "lr=0.003 batch=256"}
            assert all(math.isfinite(r["val_nll"]) for r in mine)
            pick = min(tuning, key=lambda label: tuning[label]["val_nll"])
            assert [r["setting"] for r in mine if r["seed"] == 1] == [pick]
            kept = [r for r in listed if (r["dataset"], r["contender"]) == (data, c)]
            assert sorted((r["seed"], r["setting"]) for r in kept) == [(0, pick), (1, pick)]
            assert f"{c}: {pick}" in table[data]["settings"]
            assert table[data]["seeds"].count(": 2") == 2  # both contenders averaged over the two seeds


def test_bench_2d_tiny_lfm_solver(tmp_path):
    """``--lfm-solver rk4:8``: LFM pushes and samples with 8 rk4 steps per block (own results file), and
    its likelihood still comes from the reference solver."""
    run_script("bench_2d.py", "--tiny", "--out", str(tmp_path), "--contenders", "LFM", "--lfm-solver", "rk4:8")
    payload = json.loads((tmp_path / "2d_tiny_lfm-rk48.json").read_text())
    assert payload["raw"]["suite"]["lfm"]["solver"] == {"method": "rk4", "steps": 8}
    for r in payload["raw"]["rows"]["runs"]:
        assert r["nfe/sample"] == 4 * 8 * 4  # 4 blocks x 8 steps x 4 stages
        assert r["nll"] == pytest.approx(r["dopri5_nll"], abs=1e-5)


def test_bench_power_tiny(tmp_path):
    cache = tmp_path / "cache"
    payload = run_tiny("bench_power.py", tmp_path, "--defer-test", "--cache", str(cache))
    rows = payload["raw"]["rows"]
    want = expected_contenders()
    assert {r["contender"] for r in rows["final"]} == set(want)
    # ODE models wait for --test-only (saved), zuko's exact log_prob is measured at once
    ode = {c for c in want if c in ("LFM", "FM", "torchcfm")}
    assert {p.stem.rsplit("_", 1)[0] for p in cache.glob("*.pt")} == ode
    assert {r["contender"] for r in rows.get("test", [])} == set(want) - ode
    payload = run_tiny("bench_power.py", tmp_path, "--test-only", "--cache", str(cache))
    rows = payload["raw"]["rows"]
    assert {r["contender"] for r in rows["test"]} == set(want)
    for r in rows["test"]:
        assert math.isfinite(r["nll"]) and r["n"] == 1000
    final = {r["contender"]: r for r in rows["final"]}
    assert abs(final["LFM"]["params"] - final["FM"]["params"]) <= 0.002 * final["LFM"]["params"]
    for c in want:
        if c != "LFM":  # LFM may overshoot a 2 s budget: each block trains at least a quarter of its share
            assert final[c]["train_s"] == pytest.approx(2.0, abs=0.5)
    for curve in rows["curves"]:
        times = [p["train_s"] for p in curve["points"]]
        assert times and times == sorted(times), curve["contender"]
        assert all(math.isfinite(p["nll"]) for p in curve["points"])
    table = next(v for k, v in payload["sections"].items() if k.startswith("Test NLL"))
    assert all(math.isfinite(r["nll"]) for r in table)
    assert "Solver check (5k test points)" in payload["sections"]
    # an LFM trained with another solver (its own file) joins the main file's summary
    extra = ("--contenders", "LFM", "--lfm-solver", "rk4:1", "--sweep-from", "power_tiny", "--cache", str(cache))
    run_script("bench_power.py", "--tiny", "--out", str(tmp_path), *extra)
    summary = run_tiny("bench_power.py", tmp_path, "--render", "--cache", str(cache))["sections"]["Summary"]
    assert {f"2 s: LFM (rk41) - {c}" for c in want if c != "LFM"} <= set(summary)
    assert summary["2 s: LFM (rk41) - FM"].split()[0] != summary["2 s: LFM - FM"].split()[0]


def test_bench_theory_tiny(tmp_path):
    payload = run_tiny("bench_theory.py", tmp_path)
    runs = payload["raw"]["rows"]["runs"]
    theory = {(r["N"], r["steps_per_block"]): r for r in runs if r["variant"].startswith("theory")}
    assert {(1, 40), (2, 40), (2, 20)} <= set(theory)
    for (n, _), r in theory.items():
        assert r["ou_blocks"] == n and r["T"] == pytest.approx(0.3 * n)  # no free block, OU time grows with N
    free = [r for r in runs if r["variant"] == "free-block default"]
    assert {r["steps_per_block"] for r in free} == {20, 40} and all(r["N"] == 4 for r in free)
    assert all(math.isfinite(r["paired_gap"]) and r["se"] > 0 for r in runs)


def test_bench_images_quick_then_its_solver_study(tmp_path):
    """Fashion-MNIST's comparison at CI scale (8x8 digits, seconds): both models scored, saved,
    drawn; then the saved models re-scored at more solver steps."""

    def run(*extra: str) -> None:
        run_script("bench_images.py", "--quick", "--threads", "1", "--out", str(tmp_path), *extra)

    run()
    runs = json.loads((tmp_path / "images_quick.json").read_text())["raw"]["runs"]
    assert [r["model"] for r in runs] == ["LFM", "FM"]
    lfm, fm = runs
    assert abs(lfm["parameters"] - fm["parameters"]) < 0.05 * fm["parameters"]  # equal model size
    for r in runs:
        assert math.isfinite(r["bits_per_dim"]) and r["bpd_se"] > 0 and r["cfd_mean"] > 0
        assert math.isfinite(r["check_bpd_diff"]) and r["check_solver"] == "rk4 x2"
    assert (tmp_path / "images_quick_samples.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "models" / "images_quick").iterdir()) == ["fm_seed0", "lfm_seed0"]

    run("--study", "1", "2", "--models", "LFM", "--bpd-points", "8")
    run("--study", "2", "--grid-power", "3", "--models", "LFM", "--bpd-points", "8")
    study = json.loads((tmp_path / "images_quick_study.json").read_text())["raw"]
    got = {(r["rk4 steps per block"], r["grid"]) for r in study["rows"]}
    assert got == {(1, 1.0), (2, 1.0), (2, 3.0)} and len(study["commands"]) == 2
    assert all(
        math.isfinite(r["bits_per_dim"]) and r["network evaluations"] == 16 * r["rk4 steps per block"]
        for r in study["rows"]
    )


def test_bench_distill_quick(tmp_path):
    """Distillation's comparison at CI scale: teachers of equal size from equal budgets, every
    student scored at its own network evaluations, the speed ratio and the figures written."""
    run_script("bench_distill.py", "--quick", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "distill_quick.json").read_text())
    teachers = payload["raw"]["log"]["teachers"]
    lfm, fm = teachers["LFM"], teachers["FM"]
    assert lfm["blocks"] == 3 and fm["blocks"] == 1
    assert abs(lfm["parameters"] - fm["parameters"]) < 0.02 * fm["parameters"]  # equal model size
    assert abs(lfm["fit_s"] - fm["fit_s"]) < 0.5 * fm["fit_s"]  # equal budgets (6 s each)
    rows = {r["model"]: r for r in payload["sections"]["Quality vs network evaluations"]}
    assert rows["LFM student k=1"]["nfe"] == 3 and rows["LFM student k=1, 3 blocks merged"]["nfe"] == 1
    assert rows["FM student k=1"]["nfe"] == 1 and rows["FM student k=3"]["nfe"] == 3
    assert all(math.isfinite(r["energy_distance"]) and math.isfinite(r["mmd_fine"]) for r in rows.values())
    speed = {r["model"]: r for r in payload["sections"]["Sampling speed"]}
    assert speed["LFM student k=1"]["speed-up vs teacher (wall)"] > 1  # 3 evaluations against dopri5's ~100
    targets = [f["target"] for f in payload["sections"]["Figures"]]
    assert targets.count("<= 1.5") == 1 and targets.count(">= 20") == 1 and targets.count("LFM lower ED") == 3
    assert (tmp_path / "distill_quick.png").stat().st_size > 0
    # cost: evaluations times the evaluated network's size (an LFM block is a third of FM's network)
    # (the wide student, one fresh network for the chain at FM's width, costs what FM's k=1 does)
    wide = [n for n in rows if "FM's width" in n]
    assert len(wide) == 1 and rows[wide[0]]["nfe"] == 1
    assert rows[wide[0]]["cost"] == rows["FM student k=1"]["cost"] == pytest.approx(fm["parameters"])
    for name, r in rows.items():
        t = lfm if name.startswith("LFM") else fm
        if name not in wide:
            assert r["cost"] == pytest.approx(r["nfe"] * t["parameters"] / t["blocks"]), name
    # --render recomputes the figures from the saved measurements, and gives the same ones
    (tmp_path / "distill_quick.json").write_text(
        json.dumps({**payload, "sections": {**payload["sections"], "Figures": []}})
    )
    run_script("bench_distill.py", "--quick", "--out", str(tmp_path), "--render")
    again = json.loads((tmp_path / "distill_quick.json").read_text())
    assert again["sections"]["Figures"] == payload["sections"]["Figures"]
    assert "rendered" in again["meta"] and again["raw"] == payload["raw"]


def test_bench_distill_teachers_only(tmp_path):
    """``--teachers-only``: both teachers scored (samples and test NLL), no student made."""
    run_script("bench_distill.py", "--quick", "--teachers-only", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "distill_quick_teachers.json").read_text())
    rows = {r["kind"]: r for r in payload["sections"]["Teachers"]}
    assert {"LFM teacher dopri5", "FM teacher dopri5"} <= set(rows)
    assert not any("student" in kind for kind in rows)
    lfm, fm = rows["LFM teacher dopri5"], rows["FM teacher dopri5"]
    assert math.isfinite(lfm["test_nll"]) and lfm["test_nll_se"] > 0 and math.isfinite(fm["test_nll"])
    got = payload["sections"]["LFM against FM"]["test NLL, LFM - FM (own solvers)"]
    assert float(got.split()[0]) == pytest.approx(lfm["test_nll"] - fm["test_nll"], abs=1e-4)
    assert not (tmp_path / "distill_quick.json").exists()


def test_bench_distill_precise(tmp_path):
    """``--precise N``: the ED figures from N samples per seed against N reference points, with a
    noise floor of exact draws, teachers trained with the seed asked for, its own results file;
    ``--render`` gives the same figures from the saved estimates."""
    args = ("bench_distill.py", "--quick", "--precise", "3000", "--teacher-seed", "1", "--out", str(tmp_path))
    run_script(*args)
    path = tmp_path / "distill_quick_precise_t1.json"
    payload = json.loads(path.read_text())
    assert payload["meta"]["seeds"]["teacher fit"] == 1
    rows = {r["kind"]: r for r in payload["sections"]["Energy distance"]}
    assert set(rows) == {"data", "LFM teacher dopri5", "LFM student", "FM student"}
    assert rows["LFM student"]["nfe"] == rows["FM student"]["nfe"] == 3  # equal evaluations: 3 blocks
    assert "mmd" not in rows["data"]  # energy distance alone
    (ours, theirs) = payload["raw"]["metric_check"][0]["energy_distance"]
    assert ours == pytest.approx(theirs, rel=1e-6)  # the cached ED agrees with localfm.metrics
    per_seed = payload["raw"]["per_seed"]
    figures = {f["target"]: f for f in payload["sections"]["Figures"]}
    teacher = per_seed[rows["LFM teacher dopri5"]["model"]]
    diff = [a - b for a, b in zip(per_seed["LFM student k=1"], teacher, strict=True)]
    assert f"{statistics.fmean(diff):+.3g}" in figures["<= 1.5"]["note"]
    over_floor = statistics.fmean(teacher) - statistics.fmean(per_seed[rows["data"]["model"]])
    assert figures["(context) above 0"]["measured"].startswith(f"{over_floor:.3g} ")
    assert figures["LFM lower ED"]["measured"].startswith("paired LFM - FM")
    path.write_text(json.dumps({**payload, "sections": {**payload["sections"], "Figures": []}}))
    run_script(*args, "--render")
    assert json.loads(path.read_text())["sections"]["Figures"] == payload["sections"]["Figures"]


def test_precise_figures_decide_only_what_the_errors_allow():
    """The teacher's ED is taken over the floor's (the reference's shared offset); the ratio only over a
    teacher ED resolved above zero; the comparison only beyond 2 SE."""
    sys.path.insert(0, str(BENCH))
    from bench_distill import precise_figures

    def row(name, values, nfe=4):
        return {"model": name, "nfe": nfe, "energy_distance": statistics.fmean(values), "per_seed_ed": values}

    floor = row("data", [-1e-4 + v for v in (1e-6, -1e-6, 2e-6, -2e-6, 0.0)], 0)  # an offset of -1e-4
    teacher = row("T", [v - 1e-4 for v in (1.0e-3, 1.1e-3, 0.9e-3, 1.0e-3, 1.0e-3)])
    good = row("S", [v + 2e-4 for v in teacher["per_seed_ed"]])
    fm = row("F", [v + 5e-4 + 1e-5 * i for i, v in enumerate(teacher["per_seed_ed"])])
    _, t, ratio, versus = precise_figures(floor, teacher, good, fm)
    assert t["reached"] is True and t["measured"].startswith("0.001 ")  # the offset removed
    assert ratio["reached"] is True and ratio["measured"] == "1.2"
    assert versus["reached"] is True  # LFM lower by 3e-4, far beyond its error
    bad = row("S", [v + 6e-4 for v in teacher["per_seed_ed"]])
    assert precise_figures(floor, teacher, bad, fm)[2]["reached"] is False
    unresolved = row("T", [v - 1e-4 for v in (1e-5, -2e-5, 3e-5, -1e-5, 0.0)])
    assert precise_figures(floor, unresolved, good, fm)[2]["reached"] is None
    tie = row("F", [v + (-1) ** i * 1e-4 for i, v in enumerate(good["per_seed_ed"])])
    assert precise_figures(floor, teacher, good, tie)[3]["reached"] is None


def test_per_dataset_choice_compares_settings_on_their_shared_seeds():
    """A setting's validation NLL at a seed the other setting lacks cannot move the choice; where both
    have every seed, the mean over them decides; a diverged run rules its setting out."""
    sys.path.insert(0, str(BENCH))
    from bench_2d import chosen_per_dataset

    def run(setting, seed, val, budget=300.0):
        return {"dataset": "moons", "contender": "LFM", "budget": budget, "seed": seed, "setting": setting,
                "val_nll": val}  # fmt: skip

    tuned = [run("A", 0, 2.40), run("B", 0, 2.41), run("A", 1, 2.50)]
    kept, choice = chosen_per_dataset(tuned, 300.0)
    assert choice == {("moons", "LFM"): "A"} and [r["seed"] for r in kept] == [0, 1]  # seed 1 kept, not scored
    both = [*tuned, run("B", 1, 2.42)]  # now both have seeds 0 and 1: means 2.45 against 2.415
    assert chosen_per_dataset(both, 300.0)[1] == {("moons", "LFM"): "B"}
    assert chosen_per_dataset([*both, run("A", 0, 2.0, budget=60.0)], 300.0)[1][("moons", "LFM")] == "B"
    assert chosen_per_dataset([run("A", 0, math.nan), run("B", 0, 2.6)], 300.0)[1][("moons", "LFM")] == "B"


def test_bench_pools_quick(tmp_path):
    """Pool storage at CI scale: each storage's fit in its own process, the same model from both."""
    run_script("bench_pools.py", "--quick", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "pools_quick.json").read_text())
    rows = payload["sections"]["Peak memory and time of fit"]
    assert {(r["images"], r["storage"]) for r in rows} == {(n, s) for n in (300, 600) for s in ("device", "disk")}
    assert payload["meta"]["same_parameters"] is True
    assert all(r["peak_rss_mb"] > 0 and r["push_s"] > 0 for r in rows)
    assert (tmp_path / "pools_quick.md").read_text().count("| disk |") == 2


def test_bench_ablation_tiny(tmp_path):
    """POWER's ablation at CI scale: every variant trained and scored against the default, paired."""
    run_script("bench_ablation.py", "--tiny", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "ablation_power_tiny.json").read_text())
    rows = {r["variant"]: r for r in payload["sections"]["Variants"]}
    assert list(rows)[0] == "default" and rows["default"]["delta"] == 0 and len(rows) == 9
    assert rows["1 OU block"]["blocks"] == 2 and rows["6 OU blocks"]["blocks"] == 7
    base = rows["default"]["parameters"]
    assert all(abs(r["parameters"] - base) <= 0.05 * base for r in rows.values())  # equal model size
    assert all(math.isfinite(r["delta"]) and r["delta_se"] >= 0 for r in rows.values())
    assert (tmp_path / "ablation_power_tiny.png").stat().st_size > 0


def test_bench_core_subnormals_quick(tmp_path):
    """The subnormal section at CI scale: both runs step alike, and where nothing is subnormal yet
    flushing changes nothing but the clock (the two networks' losses are equal)."""
    run_script("bench_core.py", "--quick", "--only", "subnormals", "--threads", "1", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "core_quick_subnormals.json").read_text())
    (rows,) = payload["sections"].values()
    assert [r["steps"] for r in rows] == ["1-10", "11-20", "21-30", "31-40"]
    for r in rows:
        assert r["flushed_steps_per_s"] > 0 and r["unflushed_steps_per_s"] > 0
        if r["subnormal_share"] == 0:
            assert r["val_loss_flushed"] == r["val_loss_unflushed"]
    assert (tmp_path / "core_quick_subnormals.png").stat().st_size > 0


def test_subnormal_share_counts_them_even_when_the_caller_flushes():
    sys.path.insert(0, str(BENCH))
    from bench_core import subnormal_share

    from localfm.training import flush_denormals

    class Sharp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = torch.nn.Softplus(beta=20)

        def forward(self, x, t):
            return self.act(x)

    x = torch.tensor([[-4.5, 0.0, 1.0]])  # softplus(-4.5) = exp(-90) / 20, about 4e-41: subnormal
    with flush_denormals():
        assert subnormal_share(Sharp(), x, torch.zeros(1)) == pytest.approx(1 / 3)
    assert subnormal_share(Sharp(), x.abs(), torch.zeros(1)) == 0


def test_matched_width_gives_the_closest_parameter_count():
    sys.path.insert(0, str(BENCH))
    import contenders as C

    net = {"width": 64, "depth": 3, "activation": "relu"}
    target = 4 * C.mlp_params(6, net)
    for copies in (1, 4, 6):
        w = C.matched_width(6, net, target, copies=copies)
        miss = {v: abs(copies * C.mlp_params(6, {**net, "width": v}) - target) for v in (w - 1, w, w + 1)}
        assert miss[w] == min(miss.values()), (copies, miss)
    assert C.matched_width(6, net, target, copies=4) == 64
    # global FM's twin of 3 OU blocks + the free block: one network with the four blocks' parameters
    lfm = {"net": net, "blocks": {"schedule": "list", "h": [0.1, 0.2, 0.3]}, "train": {"push_points": 10}}
    twin = C.fm_twin(lfm, 6)
    assert twin["blocks"]["h"] == [] and "push_points" not in twin["train"] and lfm["train"] == {"push_points": 10}
    assert abs(C.mlp_params(6, twin["net"]) - target) <= 0.01 * target
    # the sweep's architectures keep the total: LFM in two blocks (one OU step + free), FM four layers deep
    suite = C.Suite(lfm=lfm, ode_solver={"method": "dopri5"}, nsf={}, maf={})
    two = suite.lfm_config(C.Setting(1e-3, 64, blocks=2), 6)
    assert two["blocks"]["h"] == [0.1] and two["net"]["width"] > 64 and two["train"]["batch_size"] == 64
    assert abs(2 * C.mlp_params(6, two["net"]) - target) <= 0.01 * target
    deep = suite.fm_config(C.Setting(1e-3, 64, depth=4), 6)["net"]
    assert deep["depth"] == 4 and abs(C.mlp_params(6, deep) - target) <= 0.01 * target
    assert C.Setting(1e-3, 64, depth=4).label == "lr=0.001 batch=64 depth=4"
    # LFM's blocks deeper too, alone or with fewer blocks; FM's depth is its own, not LFM's
    for blocks, h in ((None, [0.1, 0.2, 0.3]), (2, [0.1])):
        cfg = suite.lfm_config(C.Setting(1e-3, 64, blocks=blocks, depth=5), 6)
        assert cfg["blocks"]["h"] == h and cfg["net"]["depth"] == 5
        assert abs((len(h) + 1) * C.mlp_params(6, cfg["net"]) - target) <= 0.01 * target
    assert C.Setting(1e-3, 64, blocks=2, depth=5).label == "lr=0.001 batch=64 blocks=2 depth=5"
    assert suite.fm_config(C.Setting(1e-3, 64, depth=5), 6)["net"]["width"] == C.fm_width(6, lfm, depth=5)
    with pytest.raises(ValueError, match="blocks=5"):
        suite.lfm_config(C.Setting(1e-3, 64, blocks=5), 6)
