"""Gather the latest benchmark tables into BENCHMARKS.md (full runs first, then quick smoke runs).

    python benchmarks/collect.py
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> Path:
    tables = sorted(RESULTS.glob("*.md"))
    full = [p for p in tables if "quick" not in p.stem]
    quick = [p for p in tables if "quick" in p.stem]
    parts = [
        "# localfm benchmarks\n",
        "Each section is a results file from `benchmarks/results/`, written by the script named in it",
        "(hardware, command, date and git revision included). Regenerate this page with",
        "`python benchmarks/collect.py`. Quick runs are CI smoke runs on tiny budgets, not results.\n",
    ]
    for p in full:
        text = p.read_text().strip()
        # Demote the file's own headings one level so the page has one title.
        text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        pngs = sorted(RESULTS.glob(p.stem + "*.png"))
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
