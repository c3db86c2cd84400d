"""Gather the latest benchmark tables into BENCHMARKS.md (full runs first, then quick smoke runs).

python benchmarks/collect.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SMOKE = ("quick", "tiny")  # CI smoke runs: listed, not gathered

# Issue 5's comparison suites: the sections whose figures lead the page.
HEADLINES = {
    "2d_300s_lfm-dopri5_arch_per-dataset": (
        "Suite 1, 2-D densities at 300 s, each contender's learning rate chosen per dataset on validation "
        "(seed 0 tunes, seed 1 repeats), LFM pushing with dopri5",
        ["Gap to the true entropy per dataset (paired gap, nats; lower is better)", "The issue's figures"],
    ),
    "2d_300s_lfm-dopri5_arch_sweep-rings-8gaussians": (
        "Suite 1, 2-D densities at 300 s, learning rate swept on rings and 8gaussians with subnormals flushed "
        "(architectures from the rings sweep), LFM pushing with dopri5",
        ["The issue's figures"],
    ),
    "2d_300s_lfm-dopri5_arch": (
        "Suite 1, 2-D densities at 300 s, architecture swept, LFM pushing with dopri5 (the likelihood's solver)",
        ["The issue's figures"],
    ),
    "2d": ("Suite 1, 2-D densities", ["The issue's figures"]),
    "2d_300s": ("Suite 1, 2-D densities at 300 s, swept at 300 s", ["The issue's figures"]),
    "2d_300s_arch": (
        "Suite 1, 2-D densities at 300 s, the sweep also over the architecture (LFM's blocks and depth, FM's depth)",
        ["The issue's figures"],
    ),
    "power": ("Suite 2, POWER", ["Summary"]),
    "power_lfm-dopri5": (
        "Suite 2, POWER, LFM with a consistent (dopri5) pushforward",
        ["Test NLL (full test split unless n_test says otherwise)"],
    ),
    "ablation_power": ("Suite 2, POWER, ablation of LFM's ingredients", ["Variants"]),
}


def more_commands(meta: dict) -> str:
    """`` and N more commands`` where the results merge several runs (each listed in its section)."""
    n = len(meta.get("all_commands", [])) - 1
    return f" and {n} more command{'s' if n > 1 else ''}" if n > 0 else ""


def headlines() -> list[str]:
    """The issue-5 figures, copied from the suites' results files (when they exist)."""
    from _common import markdown_table

    parts = []
    for name, (title, wanted) in HEADLINES.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        for heading in wanted:
            data = payload["sections"].get(heading)
            if not data:
                continue
            rows = [{"quantity": k, "value": v} for k, v in data.items()] if isinstance(data, dict) else data
            parts += [
                f"### {title}: {heading}",
                "",
                f"From `{payload['meta']['command']}`{more_commands(payload['meta'])} ({payload['meta']['date']}); "
                "details in its section below.",
                "",
                markdown_table(rows),
            ]
    if parts:
        parts = ["## Comparison suites (issue 5): headline figures", ""] + parts
    return parts


def findings() -> list[str]:
    """``benchmarks/findings.md``: the hand-written reading of the results, if present."""
    path = ROOT / "benchmarks" / "findings.md"
    if not path.is_file():
        return []
    text = path.read_text().strip()
    return ["\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()), ""]


def main() -> Path:
    tables = sorted(RESULTS.glob("*.md"))
    full = [p for p in tables if not any(k in p.stem for k in SMOKE)]
    quick = [p for p in tables if any(k in p.stem for k in SMOKE)]
    parts = [
        "# localfm benchmarks\n",
        "Each section is a results file from `benchmarks/results/`, written by the script named in it",
        "(hardware, command, date and git revision included). Regenerate this page with",
        "`python benchmarks/collect.py`. Quick runs are CI smoke runs on tiny budgets, not results.\n",
        *headlines(),
        *findings(),
    ]
    for p in full:
        text = p.read_text().strip()
        # Demote the file's own headings one level so the page has one title.
        text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        pngs = [png for png in [RESULTS / f"{p.stem}.png"] if png.is_file()]
        parts += [text, ""] + [f"![{png.name}](benchmarks/results/{png.name})\n" for png in pngs]
    if quick:
        parts += ["## Quick smoke runs", ""] + [f"- `benchmarks/results/{p.name}`" for p in quick]
    out = ROOT / "BENCHMARKS.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(main())
