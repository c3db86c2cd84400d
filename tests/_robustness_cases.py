"""Damage, malformed inputs and kills for the robustness tests and ``benchmarks/bench_robustness.py``.

Every generator takes a ``random.Random`` so that a test (few cases, driven by hypothesis seeds)
and the benchmark (many cases) run the same checks.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

import localfm
from localfm.checkpoint import CheckpointError, sha256

HERE = Path(__file__).resolve().parent
TARGET = HERE / "_kill_target.py"


# ---------------------------------------------------------------------------------------------
# A payload that must never run: unpickling it would create ``marker``.


class Boom:
    """Unpickling a ``Boom(marker)`` creates the file ``marker`` (through ``Path.touch``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"blocks.0.net.layers.0.weight": Boom(marker)})


def torch_save_payload(marker: Path) -> bytes:
    """A ``torch.save`` file (zip + pickle) whose pickle would create ``marker``."""
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "boom": Boom(marker)}, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Damage to a saved checkpoint folder


def _json_paths(obj, prefix=()):
    """Every path to a value inside a JSON object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _json_paths(v, prefix + (i,))


def _other_value(rng: random.Random, old):
    choices = [None, True, 0, -1, 1, 2**40, 0.5, -0.0, 1e308, math.nan, "x", "", [], {}, [1, 2], {"a": 1}]
    if isinstance(old, bool):
        choices += [not old]
    elif isinstance(old, (int, float)):
        choices += [old + 1, old * 2, -old, old * 1.0001 + 1e-9]
    elif isinstance(old, str):
        choices += [old[::-1], old + "x", old.upper()]
    elif isinstance(old, list):
        choices += [old[:-1], old + old[:1], list(reversed(old))]
    while True:
        new = rng.choice(choices)
        if json.dumps(new) != json.dumps(old):
            return new


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _delete(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


DAMAGE_KINDS = (
    "flip_tensor_byte",
    "truncate_tensors",
    "flip_json_byte",
    "truncate_json",
    "edit_json_value",
    "edit_json_value_keep_checksum",
    "delete_json_key",
    "delete_file",
    "empty_file",
    "append_garbage",
    "pickle_as_tensors",
    "torch_save_as_tensors",
    "pickle_as_json",
)


def damage(rng: random.Random, folder: Path, json_name: str, tensor_name: str, marker: Path, kind=None) -> str:
    """Damage the checkpoint ``folder`` in one random way; return a description of what was done.

    ``edit_json_value_keep_checksum`` edits the JSON and recomputes its checksum (a deliberate
    edit): the loader must then refuse it or load something that still matches the tensors.
    """
    kind = kind or rng.choice(DAMAGE_KINDS)
    jpath, tpath = folder / json_name, folder / tensor_name
    if kind in ("flip_tensor_byte", "flip_json_byte"):
        p = tpath if kind == "flip_tensor_byte" else jpath
        data = bytearray(p.read_bytes())
        i = rng.randrange(len(data))
        data[i] ^= rng.randrange(1, 256)
        p.write_bytes(bytes(data))
        return f"{kind} at {i}"
    if kind in ("truncate_tensors", "truncate_json"):
        p = tpath if kind == "truncate_tensors" else jpath
        data = p.read_bytes()
        n = rng.randrange(len(data))
        p.write_bytes(data[:n])
        return f"{kind} to {n} bytes"
    if kind in ("edit_json_value", "edit_json_value_keep_checksum", "delete_json_key"):
        meta = json.loads(jpath.read_text())
        paths = [p for p in _json_paths(meta) if p != ("json_sha256",)]
        path = rng.choice(paths)
        if kind == "delete_json_key":
            _delete(meta, path)
        else:
            _set(meta, path, _other_value(rng, _get(meta, path)))
        if kind == "edit_json_value_keep_checksum":
            body = {k: v for k, v in meta.items() if k != "json_sha256"}
            meta["json_sha256"] = sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        jpath.write_text(json.dumps(meta))
        return f"{kind} {'/'.join(map(str, path))}"
    if kind == "delete_file":
        p = rng.choice([jpath, tpath])
        p.unlink()
        return f"{kind} {p.name}"
    if kind == "empty_file":
        p = rng.choice([jpath, tpath])
        p.write_bytes(b"")
        return f"{kind} {p.name}"
    if kind == "append_garbage":
        p = rng.choice([jpath, tpath])
        p.write_bytes(p.read_bytes() + rng.randbytes(rng.randrange(1, 64)))
        return f"{kind} {p.name}"
    if kind == "pickle_as_tensors":
        tpath.write_bytes(pickle_payload(marker))
        return kind
    if kind == "torch_save_as_tensors":
        tpath.write_bytes(torch_save_payload(marker))
        return kind
    if kind == "pickle_as_json":
        jpath.write_bytes(pickle_payload(marker))
        return kind
    raise ValueError(kind)


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def same_flow(a: localfm.LocalFlow, b: localfm.LocalFlow) -> bool:
    """Same tensors, same step sizes, same config: nothing about the model was changed."""
    sa, sb = a.state_dict(), b.state_dict()
    return (
        sa.keys() == sb.keys()
        and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
        and [blk.h for blk in a.blocks] == [blk.h for blk in b.blocks]
        and a.config == b.config
        and a.solver == b.solver
        and a.event_shape == b.event_shape
    )


def check_damaged_model(original: localfm.LocalFlow, folder: Path, marker: Path, description: str) -> str:
    """Load a damaged model folder: ``refused`` (CheckpointError) or ``unchanged`` (an identical model).

    After a deliberate edit (the checksum recomputed) a model that loads may differ from the
    original (``edited``), but must still be a valid flow. Any other exception, a changed model
    after accidental damage, or the pickle marker raises AssertionError.
    """
    try:
        flow = localfm.load(folder)
    except CheckpointError:
        outcome = "refused"
    else:
        if same_flow(original, flow):
            outcome = "unchanged"
        else:
            assert description.startswith("edit_json_value_keep_checksum"), f"{description}: loaded a changed model"
            outcome = "edited"
    assert not marker.exists(), "a pickle payload was executed"
    return outcome


# ---------------------------------------------------------------------------------------------
# Malformed configs and data files


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["none", "bool", "int", "bigint", "float", "special", "str", "list", "dict"]
    kind = rng.choice(kinds if depth < 3 else kinds[:7])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-3, 10)
    if kind == "bigint":
        return rng.choice([2**31, 2**63, 10**30, -(10**12)])
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e-12, 0.3, 2.5, 1e30, 1e300])
    if kind == "special":
        return rng.choice([math.nan, math.inf, -math.inf])
    if kind == "str":
        return rng.choice(["", "x", "cuda:9", "float16", "geometric", "list", "relu", "1e-3", "\x00", "é" * 3])
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "lr", "steps", "h"]): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


SCHEMA = {
    "": ["data", "seed", "dtype", "device", "net", "blocks", "train", "solver", "bogus"],
    "net": ["kind", "width", "depth", "activation", "beta", "time_embedding", "fourier_features", "context_dim"],
    "blocks": ["schedule", "c", "rho", "L", "h", "free_block"],
    "train": ["steps", "batch_size", "lr", "lr_schedule", "warmup", "ema", "grad_clip", "pairing", "keep_checkpoints"],
    "solver": ["method", "steps", "rtol", "atol"],
}


def malformed_config(rng: random.Random) -> dict:
    """A config dict of known and unknown keys with values of random types."""
    out: dict = {}
    for _ in range(rng.randrange(1, 5)):
        group = rng.choice(list(SCHEMA))
        key = rng.choice(SCHEMA[group])
        target = out if group == "" else out.setdefault(group, {})
        if not isinstance(target, dict):
            continue
        target[key] = random_value(rng)
    return out


def malformed_yaml(rng: random.Random) -> str:
    """YAML text: a mangled config, a non-mapping, a tag that would build a Python object, junk."""
    import yaml

    choice = rng.randrange(6)
    if choice == 0:
        return yaml.safe_dump(malformed_config(rng), allow_unicode=True).replace(":", rng.choice([":", "", "::"]), 1)
    if choice == 1:
        return rng.choice(["- 1\n- 2\n", "42\n", "'just text'\n", "null\n", "[" * 50 + "]" * 49])
    if choice == 2:
        return "train: !!python/object/apply:os.system ['touch PWNED']\n"
    if choice == 3:
        return "".join(chr(rng.randrange(1, 0x250)) for _ in range(rng.randrange(1, 60)))
    if choice == 4:
        return "net:\n  width: 8\n net: {depth: 2}\n\tbad indent"
    return yaml.safe_dump(malformed_config(rng), allow_unicode=True)


def malformed_data(rng: random.Random, folder: Path) -> Path:
    """A .npy or .csv file that is empty, ragged, non-numeric, non-finite, 1-D, 4-D or a pickle."""
    import numpy as np

    kind = rng.randrange(9)
    suffix = rng.choice([".npy", ".csv"])
    path = folder / f"data{kind}_{rng.randrange(10**6)}{suffix}"
    arrays = {
        0: np.zeros((0, 2)),
        1: np.array([[1.0, np.nan], [2.0, 3.0]]),
        2: np.array([[1.0, np.inf], [2.0, 3.0]]),
        3: np.arange(5.0),
        4: np.zeros((2, 2, 2, 2, 2)),
        5: np.array([["a", "b"], ["c", "d"]]),
        6: np.array([[1.0, 2.0]]),
    }
    if kind in arrays:
        a = arrays[kind]
        if suffix == ".npy":
            np.save(path, a)
        else:
            path.write_text("\n".join(",".join(map(str, np.atleast_1d(r).ravel())) for r in np.atleast_2d(a)) + "\n")
    elif kind == 7:
        path.write_text(rng.choice(["x,y\n1,2\n3\n", "1;2\n3;4\n", "", "\x00\x01\x02", "a,b\nc,d\n"]))
    else:
        path.write_bytes(pickle.dumps(np.zeros((3, 2))) if suffix == ".npy" else rng.randbytes(64))
    return path


# ---------------------------------------------------------------------------------------------
# Kill and resume


@dataclass
class KillOutcome:
    kind: str
    arg: float
    killed: bool
    last_line: str


def kill_plan(rng: random.Random, n: int) -> list[tuple[str, float]]:
    """``n`` kill points: after the k-th line of a kind (``train``, ``push``, ``write``) or t seconds after
    the first line."""
    kinds = (["write", "push", "train", "time"] * (n // 4 + 1))[:n]  # every kind, in turn
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        if kind == "time":
            plan.append((kind, round(rng.uniform(0.0, 1.5), 2)))
        else:
            plan.append((kind, rng.randint(1, {"train": 10, "push": 6, "write": 4}[kind])))
    return plan


def run_target(
    run_dir: Path, kind: str | None, arg: float, *, timeout: float = 120.0, pools: str = "device"
) -> KillOutcome:
    """Run ``_kill_target.py`` and SIGKILL it at the planned point (``kind=None``: let it finish)."""
    pause = "0.5" if kind == "write" else "0"
    env = dict(os.environ, PYTHONUNBUFFERED="1", KILL_TARGET_POOLS=pools)
    with open(run_dir.parent / f"{run_dir.name}.stderr", "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(TARGET), str(run_dir), pause], stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        killer = threading.Timer(arg, lambda: proc.send_signal(signal.SIGKILL))
        seen, last = 0, ""
        try:
            for line in proc.stdout:
                last = line.strip()
                if kind == "time" and not killer.is_alive() and not killer.finished.is_set():
                    killer.start()  # the delay counts from the first report, once training runs
                if kind not in (None, "time") and last.split(" ")[0] == kind:
                    seen += 1
                    if seen == arg:
                        proc.send_signal(signal.SIGKILL)
                        break
            proc.wait()
        finally:
            timer.cancel()
            killer.cancel()
            proc.stdout.close()
    if proc.returncode not in (0, -signal.SIGKILL):
        tail = Path(err.name).read_text(errors="replace")[-3000:]
        raise AssertionError(f"the training subprocess failed (status {proc.returncode}):\n{tail}")
    return KillOutcome(kind or "none", arg, proc.returncode == -signal.SIGKILL, last)


def check_run_dir(run_dir: Path) -> list[str]:
    """Invariants after a kill: every complete checkpoint has its files and the pool it refers to."""
    problems = []
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return problems
    for d in folder.iterdir():
        if d.name.startswith(".") or not d.is_dir() or d.name.startswith("damaged-"):
            continue
        if not ((d / "state.json").is_file() and (d / "state.safetensors").is_file()):
            problems.append(f"{d.name} is incomplete")
            continue
        pool = json.loads((d / "state.json").read_text()).get("pool_file")
        if pool and not (folder / pool).is_file():
            problems.append(f"{d.name} refers to {pool}, which was deleted")
    return problems


def partial_writes(run_dir: Path) -> int:
    """Temporary files or folders a kill left behind in the run folder (the next run removes them)."""
    return sum(1 for _ in run_dir.rglob(".*")) if run_dir.is_dir() else 0


def reference_tensors() -> dict[str, torch.Tensor]:
    """The uninterrupted run, in this process (same problem, same seed, one thread)."""
    sys.path.insert(0, str(HERE))
    try:
        import _kill_target as target
    finally:
        sys.path.remove(str(HERE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flow = localfm.fit(target.data(), target.CONFIG)
    finally:
        torch.set_num_threads(threads)
    return flow.state_dict()


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return localfm.load(run_dir / "final").state_dict()


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference)."""
    assert a.keys() == b.keys()
    identical = all(torch.equal(a[k], b[k]) for k in a)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return identical, diff


def check_damaged_training_checkpoint(
    run: Path, cfg: localfm.FlowConfig, shape: tuple[int, ...], seed: int, kind: str, marker: Path
) -> str:
    """Damage one checkpoint of the run folder ``run`` (a copy): resuming must pick the newest other
    one, or the same one only if its content is unchanged (a JSON whitespace flip) or was edited
    deliberately (checksum recomputed). Returns ``fallback``, ``unchanged``, ``edited`` or ``refused``.
    """
    from localfm.runstate import _checkpoints, latest

    rng = random.Random(seed)
    ckpts = _checkpoints(run / "checkpoints")
    victim = rng.choice(ckpts)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    what = damage(rng, victim, "state.json", "state.safetensors", marker, kind)
    deliberate = what.startswith("edit_json_value_keep_checksum")
    try:
        saved = latest(run, cfg, shape, dtype=torch.float64)
    except ValueError:  # includes CheckpointError: a deliberate edit of the config or the shapes
        assert deliberate, what
        outcome = "refused"
    else:
        if saved.path == victim:
            tensors = victim / "state.safetensors"
            assert tensors.is_file() and tensors.read_bytes() == before["state.safetensors"], what
            same = json.loads((victim / "state.json").read_bytes()) == json.loads(before["state.json"])
            assert deliberate or same, what
            outcome = "unchanged" if same else "edited"
        else:
            assert saved.path == (ckpts[0] if victim != ckpts[0] else ckpts[1]), what
            outcome = "fallback"
    assert not marker.exists(), "a pickle payload was executed"
    return outcome


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``localfm ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "localfm.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def assert_one_line_error(proc: subprocess.CompletedProcess) -> None:
    """Exit status 2 and exactly one line, ``localfm: error: ...``, on stderr; no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("localfm: error: "), proc.stderr[-2000:]


def cli_train_case(rng: random.Random, folder: Path) -> int:
    """``localfm train BAD.yaml --dry-run`` on a malformed config naming a malformed data file."""
    import yaml

    data = malformed_config(rng)
    data["data"] = str(malformed_data(rng, folder))  # if the config parses, the data must fail
    text = malformed_yaml(rng) if rng.random() < 0.5 else yaml.safe_dump(data, allow_unicode=True)
    (folder / "bad.yaml").write_text(text)
    proc = cli("train", "bad.yaml", "--out", "run", "--dry-run", cwd=folder)
    if proc.returncode != 0:  # a config that happens to be valid passes the dry run
        assert_one_line_error(proc)
    assert not (folder / "PWNED").exists()
    return proc.returncode


def cli_damaged_model_case(rng: random.Random, model: Path, folder: Path, kind: str, command: str) -> int:
    """``localfm eval|sample RUN`` on a run whose model folder was damaged."""
    import shutil

    run = folder / "run"
    target = shutil.copytree(model, run / "model")
    marker = folder / "PWNED"
    damage(rng, target, "flow.json", "model.safetensors", marker, kind)
    extra = ["-n", "5", "--out", str(folder / "s.npy")] if command == "sample" else []
    proc = cli(command, str(run), *extra, cwd=folder)
    if not (command == "sample" and proc.returncode == 0):  # benign damage: sampling works
        assert_one_line_error(proc)
    assert not marker.exists(), "a pickle payload was executed"
    return proc.returncode
