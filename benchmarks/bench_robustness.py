"""Robustness counts: kills survived, malformed inputs refused, tampered files caught.

Runs the checks of ``tests/test_resume_kill.py``, ``tests/test_robustness.py`` and
``tests/test_robustness_fuzz.py`` (the same code, ``tests/_robustness_cases.py``) with larger,
seeded counts, and records how many cases were tried and how many ended as documented:

- kill and resume: SIGKILL a training subprocess at random points (after a progress report,
  inside the pushforward, half-way through a checkpoint or pool write, after a random delay),
  resume each time; the finished model must be bit-identical to an uninterrupted run;
- malformed inputs: config dicts and YAML files, data arrays given to ``fit``, user data files,
  and ``localfm train`` on bad configs: a documented error (``ValueError``, ``TypeError``,
  ``FileNotFoundError``, ``CheckpointError``; exit status 2 and one line from the CLI) or a valid result;
- tampered files: random byte flips, truncations, JSON edits (with and without a recomputed
  checksum), deleted files and pickle payloads in saved models and training checkpoints: refused,
  fallen back from, or (when nothing changed) loaded unchanged; never a pickle executed.

    python benchmarks/bench_robustness.py            # full counts (several minutes)
    python benchmarks/bench_robustness.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _common first: it sets the OpenMP wait policy before torch loads.
from _common import ROOT, metadata, write_results  # noqa: E402, I001

sys.path.insert(0, str(ROOT / "tests"))

import _robustness_cases as cases  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import localfm  # noqa: E402
from localfm import CheckpointError  # noqa: E402

LIBRARY_ERRORS = (ValueError, TypeError, FileNotFoundError, CheckpointError)
KILLS_PER_RUN = 4


class Tally:
    """Counts of cases tried and passed per check, with the first few failures kept."""

    def __init__(self) -> None:
        self.tried: Counter = Counter()
        self.passed: Counter = Counter()
        self.outcomes: dict[str, Counter] = {}
        self.failures: list[dict] = []

    def run(self, check: str, fn, *args, **kwargs):
        self.tried[check] += 1
        try:
            outcome = fn(*args, **kwargs)
        except Exception as err:  # an assertion or an undocumented exception: a failed case
            self.failures.append(
                {"check": check, "error": f"{type(err).__name__}: {err}"[:500], "args": repr(args)[:300]}
            )
            if len(self.failures) <= 3:
                traceback.print_exc()
            return None
        self.passed[check] += 1
        self.outcomes.setdefault(check, Counter())[str(outcome)] += 1
        return outcome

    def rows(self) -> list[dict]:
        return [
            {
                "check": k,
                "tried": self.tried[k],
                "passed": self.passed[k],
                "outcomes": ", ".join(f"{o} {n}" for o, n in sorted(self.outcomes.get(k, {}).items())),
            }
            for k in self.tried
        ]


def library_call(fn, *args):
    try:
        result = fn(*args)
    except LIBRARY_ERRORS as err:
        return type(err).__name__
    return "accepted" if result is not None else "none"


def random_array(rng: random.Random):
    """Data for ``fit``: wrong ranks, empty, non-finite, strings, objects, complex, bools, ragged lists."""
    n = rng.choice([0, 1, 2, 5, 64])
    d = rng.choice([0, 1, 2, 3])
    kind = rng.randrange(9)
    if kind == 0:
        return np.zeros((n,) + (d,) * rng.randrange(0, 4))
    if kind == 1:
        a = np.random.default_rng(rng.randrange(2**32)).normal(size=(max(n, 1), max(d, 1)))
        a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return a
    if kind == 2:
        return np.array([["a", "b"]] * max(n, 1))
    if kind == 3:
        return np.array([[object(), 1.0]] * max(n, 1), dtype=object)
    if kind == 4:
        return np.ones((max(n, 2), 2), dtype=complex)
    if kind == 5:
        return torch.ones(max(n, 2), 2, dtype=torch.bool)
    if kind == 6:
        return [[1.0, 2.0], [3.0]]
    if kind == 7:
        return rng.choice(["data", None, 3.5, {"x": 1}])
    return np.random.default_rng(rng.randrange(2**32)).normal(size=(max(n, 2), max(d, 1)))  # valid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    q = args.quick
    counts = {
        "kills": 6 if q else 24,
        "config_dicts": 200 if q else 3000,
        "config_yaml": 100 if q else 1000,
        "fit_data": 20 if q else 150,
        "user_files": 50 if q else 500,
        "model_damage": 100 if q else 1500,
        "training_damage": 40 if q else 400,
        "cli": 2 if q else 12,
    }
    torch.set_num_threads(1)
    logging.getLogger("localfm").setLevel(logging.ERROR)  # damaged checkpoints are skipped by design
    tally = Tally()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    tiny = localfm.load_config(
        {
            "dtype": "float64",
            "net": {"width": 16, "depth": 2, "activation": "tanh"},
            "blocks": {"schedule": "list", "h": [0.2], "free_block": True},
            "train": {"steps": 12, "batch_size": 64, "lr": 1e-2, "log_every": 5},
            "solver": {"method": "rk4", "steps": 4},
        }
    )
    work = Path(tempfile.mkdtemp(prefix="bench-robustness-"))
    try:
        # --- malformed inputs -------------------------------------------------------------------
        for _ in range(counts["config_dicts"]):
            tally.run("config dict", library_call, localfm.load_config, cases.malformed_config(rng))
        for i in range(counts["config_yaml"]):
            path = work / f"c{i}.yaml"
            path.write_text(cases.malformed_yaml(rng), encoding="utf-8", errors="surrogatepass")
            tally.run("config YAML file", library_call, localfm.load_config, path)
        one_step = tiny.replace(train=tiny.train.__class__(**{**tiny.train.__dict__, "steps": 1}))
        for _ in range(counts["fit_data"]):
            tally.run("data array to fit", library_call, lambda x: localfm.fit(x, one_step), random_array(rng))
        from localfm.datasets import load_user_file

        for _ in range(counts["user_files"]):
            tally.run("user data file", library_call, load_user_file, cases.malformed_data(rng, work))

        # --- tampered files ---------------------------------------------------------------------
        x = torch.randn(128, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        run_cfg = tiny.replace(
            train=tiny.train.__class__(**{**tiny.train.__dict__, "checkpoint_every": 5, "keep_checkpoints": 10})
        )
        flow = localfm.fit(x, run_cfg, run_dir=work / "pristine-run")
        localfm.save(flow, work / "pristine-model")
        pickles = 0
        for i in range(counts["model_damage"]):
            kind = cases.DAMAGE_KINDS[i % len(cases.DAMAGE_KINDS)]
            pickles += "pickle" in kind or "torch_save" in kind
            case = work / f"m{i}"
            folder = shutil.copytree(work / "pristine-model", case / "model")
            what = cases.damage(rng, folder, "flow.json", "model.safetensors", case / "PWNED", kind)
            tally.run(f"saved model: {kind}", cases.check_damaged_model, flow, folder, case / "PWNED", what)
            shutil.rmtree(case)
        for i in range(counts["training_damage"]):
            kind = cases.DAMAGE_KINDS[i % len(cases.DAMAGE_KINDS)]
            pickles += "pickle" in kind or "torch_save" in kind
            case = work / f"t{i}"
            run = shutil.copytree(work / "pristine-run", case / "run")
            seed = rng.randrange(2**32)
            tally.run(
                "training checkpoint (resume falls back)",
                cases.check_damaged_training_checkpoint,
                run,
                run_cfg,
                tuple(x.shape),
                seed,
                kind,
                case / "PWNED",
            )
            shutil.rmtree(case)

        # --- the command line -------------------------------------------------------------------
        for i in range(counts["cli"]):
            case = work / f"cli{i}"
            case.mkdir()
            tally.run("CLI: localfm train (bad config/data)", exit_status, cases.cli_train_case, rng, case)
            kind, command = rng.choice(cases.DAMAGE_KINDS), rng.choice(["eval", "sample"])
            case2 = work / f"cli{i}b"
            case2.mkdir()
            tally.run(
                f"CLI: localfm {command} (damaged model)",
                exit_status,
                cases.cli_damaged_model_case,
                rng,
                work / "pristine-model",
                case2,
                kind,
                command,
            )

        # --- kill and resume: several runs, a few kills each, each finished run checked ---------
        reference = cases.reference_tensors()
        kills, runs = [], []
        for r in range(max(1, counts["kills"] // KILLS_PER_RUN)):
            run_dir = work / f"killed-run-{r}"
            for kind, arg in cases.kill_plan(rng, KILLS_PER_RUN):
                outcome = tally.run(f"SIGKILL after {kind}", kill_once, run_dir, kind, arg)
                if outcome is not None:
                    kills.append(outcome.outcome)
                    tally.run("invariants after a kill", invariants, run_dir)
            final = tally.run("resumed run finishes", finish, run_dir)
            if final is None:
                runs.append({"finished": False, "identical": False, "diff": float("nan")})
                continue
            identical, diff = cases.compare(reference, cases.final_tensors(run_dir))
            runs.append({"finished": True, "identical": identical, "diff": diff})
            tally.run("resumed run bit-identical", same_model, identical, diff)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t_start

    kill_summary = {
        "training runs": len(runs),
        "kill points planned": len(kills),
        "processes actually killed": sum(k.killed for k in kills),
        "kills inside a checkpoint/pool write": sum(k.killed and k.kind == "write" for k in kills),
        "kills inside the pushforward": sum(k.killed and k.kind == "push" for k in kills),
        "runs finished after resuming": sum(r["finished"] for r in runs),
        "runs bit-identical to the uninterrupted run": sum(r["identical"] for r in runs),
        "largest parameter difference": max((r["diff"] for r in runs if r["finished"]), default=float("nan")),
    }
    totals = {
        "kill points tried / passed": f"{sum(tally.tried[k] for k in tally.tried if k.startswith('SIGKILL'))} / "
        f"{sum(tally.passed[k] for k in tally.passed if k.startswith('SIGKILL'))}",
        "malformed inputs tried / passed": _sum(tally, ("config", "data", "user", "CLI: localfm train")),
        "tampered files tried / passed": _sum(
            tally, ("saved model", "training checkpoint", "CLI: localfm eval", "CLI: localfm sample")
        ),
        "pickle-bearing files tried (never executed)": pickles,
        "failures": len(tally.failures),
        "seconds": round(seconds, 1),
    }
    write_results(
        "robustness",
        "Robustness: kills, malformed inputs, tampered files",
        metadata([args.seed], counts=counts, quick=q),
        {
            "Totals": totals,
            "Kill and resume": kill_summary,
            "Checks": tally.rows(),
            "Kill plan": [
                {"kind": k.kind, "at": k.arg, "killed": k.killed, "last line before the kill": k.last_line}
                for k in kills
            ],
        },
        notes="\n\n".join(__doc__.split("\n\n")[1:3]) + "\n\nA case *passes* when it ends as documented. Outcomes: "
        "`refused` (CheckpointError), `unchanged` (the damage left the content identical, e.g. a JSON "
        "whitespace byte), `edited` (a deliberate edit with a recomputed checksum that still describes a "
        "valid model), `fallback` (resume took an older checkpoint), `accepted` (a valid input), or the "
        "name of the documented exception.",
        raw={"failures": tally.failures},
    )
    print(f"{totals}\n{kill_summary}")
    if tally.failures:
        sys.exit(1)


class Killed(str):
    """A tally outcome (``killed`` / ``ran to the end``) that keeps the :class:`KillOutcome`."""

    outcome: cases.KillOutcome


def kill_once(run_dir: Path, kind: str, arg: float) -> Killed:
    outcome = cases.run_target(run_dir, kind, arg)
    label = Killed("killed" if outcome.killed else "ran to the end")
    label.outcome = outcome
    return label


def same_model(identical: bool, diff: float) -> str:
    assert identical, f"the resumed run differs by up to {diff:g}"
    return "identical"


class Finished(str):
    outcome: cases.KillOutcome


def finish(run_dir: Path) -> Finished:
    outcome = cases.run_target(run_dir, None, 0)
    assert outcome.last_line == "done", outcome
    label = Finished("done")
    label.outcome = outcome
    return label


def exit_status(case, *args) -> str:
    return f"exit status {case(*args)}"


def invariants(run_dir: Path) -> str:
    problems = cases.check_run_dir(run_dir)
    assert not problems, problems
    return "ok"


def _sum(tally: Tally, prefixes: tuple[str, ...]) -> str:
    keys = [k for k in tally.tried if k.startswith(prefixes)]
    return f"{sum(tally.tried[k] for k in keys)} / {sum(tally.passed[k] for k in keys)}"


if __name__ == "__main__":
    main()
