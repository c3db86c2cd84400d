"""Shared helpers of the benchmark scripts: run metadata, timing, and writing results.

Every script writes ``benchmarks/results/<name>.json`` (the figures plus a ``meta`` record: hardware,
command, date, git revision, seeds) and ``benchmarks/results/<name>.md`` (the same as Markdown
tables), both atomically, so an interrupted run never leaves half a file behind.

Timings on a shared machine are noisy: compare variants side by side in one run
(:func:`interleaved`), repeat, and report medians and ratios of medians.

Import this module before torch: it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set). With
the default active policy, torch's OpenMP threads spin between parallel regions, and on a machine
whose cores are shared with other jobs a 2-thread forward pass was measured 5-10x slower than with
one thread; the passive policy removes that (the setting is recorded in every results file).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TORCH_LOADED_FIRST = "torch" in sys.modules  # then the setting below comes too late to apply
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

__all__ = [
    "ROOT",
    "RESULTS",
    "set_threads",
    "hardware",
    "git_revision",
    "command_line",
    "metadata",
    "median",
    "Timings",
    "interleaved",
    "markdown_table",
    "write_results",
    "render",
]


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


_LOAD_AT_IMPORT = _load_average()  # the scripts import this module first: the load when they started


def pyplot():
    """matplotlib's pyplot on the Agg backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, name: str) -> Path:
    """``results/<name>.png`` (110 dpi) from a finished figure, which is then closed."""
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt  # a figure exists, so matplotlib does

    plt.close(fig)
    return path


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads (``None`` keeps torch's default); returns the count in use."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_suite_options(p, tiny: str = "CI smoke run, seconds") -> None:
    """``--seed --threads --tiny --out --fresh``: the options every comparison suite shares."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help=tiny)
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--fresh", action="store_true", help="ignore results already written")


def start(out: Path | None, threads: int | None) -> int:
    """Send the results to ``out`` (created; None keeps benchmarks/results) and pin torch's threads;
    returns the thread count. Subnormal floats are flushed to zero for the whole run, as
    ``localfm.fit`` does while it trains, so that every contender's loop computes alike."""
    global RESULTS
    torch.set_flush_denormal(True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        RESULTS = out
    return set_threads(threads)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """What the numbers were measured on (no host names, no paths)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")
        + (" (set after torch loaded: not applied)" if _TORCH_LOADED_FIRST else ""),
    }
    if _LOAD_AT_IMPORT is not None:
        info["load_average_1min_start"] = _LOAD_AT_IMPORT
        info["load_average_1min"] = _load_average()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_revision() -> str:
    """Short commit hash of HEAD, with ``+dirty`` when the library source has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def command_line() -> str:
    """The command that ran this script, with the script named relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        name = str(script.relative_to(ROOT))
    except ValueError:
        name = script.name
    return shlex.join(["python", name, *sys.argv[1:]])


def metadata(seeds: Sequence[int] | dict[str, int], **extra: Any) -> dict[str, Any]:
    """The ``meta`` record of a results file."""
    return {
        "command": command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_revision": git_revision(),
        "hardware": hardware(),
        "seeds": seeds if isinstance(seeds, dict) else list(seeds),
        **extra,
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


@dataclass
class Timings:
    """Seconds per call of each variant: ``wall`` (elapsed) and ``cpu`` (this process, all threads).

    On a loaded machine wall time includes waiting for a core; ``cpu / threads`` estimates the
    wall time on an idle machine (exact only for perfectly parallel work).
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def median(self, name: str, clock: str = "wall") -> float:
        return median(getattr(self, clock)[name])


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 1) -> Timings:
    """Time each of ``fns`` once per round, in turn, for ``rounds`` rounds (after ``warmup`` rounds).

    Interleaving puts every variant under the same background load, so ratios of the medians are
    much steadier than timings taken one variant after another.
    """
    out = Timings({k: [] for k in fns}, {k: [] for k in fns})
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r >= warmup:
                out.wall[name].append(time.perf_counter() - w0)
                out.cpu[name].append(time.process_time() - c0)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 1e7 or (v != 0 and abs(v) < 1e-3):
            return f"{v:.3g}"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts), one column per key of ``columns`` (default: the first row's)."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _plain(v: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null, tensors and numpy scalars become numbers."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _plain(v.tolist())
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_results(
    name: str,
    title: str,
    meta: dict[str, Any],
    sections: dict[str, Any],
    *,
    notes: str = "",
    section_notes: dict[str, str] | None = None,
    raw: dict[str, Any] | None = None,
) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md``; returns the JSON path.

    ``sections`` maps a section title to its data: a list of row dicts becomes a table, a dict becomes
    a two-column table, anything else is written as text; ``section_notes`` adds a paragraph under a
    section's table. The JSON holds all of it plus ``raw`` (measurements too long for the Markdown
    file, e.g. every timing); the Markdown file is rendered from the JSON alone (:func:`render`).
    """
    json_path = RESULTS / f"{name}.json"
    section_notes = section_notes or {}
    payload = {
        "title": title,
        "meta": meta,
        "notes": notes.strip(),
        "sections": sections,
        "section_notes": {k: v for k, v in section_notes.items() if k in sections},
        "raw": raw or {},
    }
    _atomic_write(json_path, json.dumps(_plain(payload), indent=1) + "\n")
    render(name)
    return json_path


def render(name: str) -> Path:
    """(Re)write ``results/<name>.md`` from ``results/<name>.json``; returns the Markdown path."""
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    meta, hw = payload["meta"], payload["meta"]["hardware"]
    load = ""
    if "load_average_1min_start" in hw:
        load = f", 1-min load average {hw['load_average_1min_start']} at start, {hw['load_average_1min']} at end"
    elif "load_average_1min" in hw:
        load = f", 1-min load average {hw['load_average_1min']}"
    md = [
        f"# {payload.get('title', name)}\n",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- git revision: {meta['git_revision']}",
        f"- hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs, torch {hw['torch']} with "
        f"{hw['torch_threads']} threads"
        + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
        + (f", OMP_WAIT_POLICY={hw['omp_wait_policy']}" if "omp_wait_policy" in hw else "")
        + load,
        f"- seeds: {meta['seeds']}",
    ]
    if "rendered" in meta:  # tables recomputed later from the measurements, by a newer script
        md.append(f"- rendered again: {meta['rendered']}")
    md.append("")
    if payload.get("notes"):
        md += [payload["notes"], ""]
    section_notes = payload.get("section_notes", {})
    for heading, data in payload["sections"].items():
        md.append(f"## {heading}\n")
        if isinstance(data, list) and data and isinstance(data[0], dict):
            md.append(markdown_table(data))
        elif isinstance(data, dict):
            md.append(markdown_table([{"quantity": k, "value": v} for k, v in data.items()]))
        else:
            md.append(f"{data}\n")
        if heading in section_notes:
            md.append(section_notes[heading].strip() + "\n")
    md_path = RESULTS / f"{name}.md"
    _atomic_write(md_path, "\n".join(md))
    return md_path


if __name__ == "__main__":
    # python benchmarks/_common.py NAME...: re-render results/NAME.md from results/NAME.json.
    for arg in sys.argv[1:]:
        print(render(arg))
