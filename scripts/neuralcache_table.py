"""Gather the neural-caching tables (paper Table 1, Table 2, Fig. 11) from several runs.

    python scripts/train.py -m experiment=neuralcache_synthetic \\
        model.variant=dnr,dnr_plus,dnr_plus_plus,explicit_warp,ours
    python scripts/neuralcache_table.py outputs/train/multirun_<date_time>

Each run's ``metrics.json`` holds ``tables: {name: {"title", "columns", "rows"}}`` (written by
:func:`neuralcache.evaluate.evaluate_neural_cache`); rows of same-named tables from every run
under the given folders are concatenated, ordered by their ``order`` key (the paper's row
order), and printed as markdown; the result is also written to ``DIR/neuralcache_tables.md``
(or ``--out``). Runs without ``metrics.json`` are listed as unfinished. Works for any method
whose evaluation returns ``tables``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def markdown(columns: list[str], rows: list[dict]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def gather(roots: list[str | Path]) -> tuple[dict[str, dict], list[str]]:
    """``({table name: {"title", "columns", "rows"}}, [unfinished run folders])`` over ``roots``."""
    tables: dict[str, dict] = {}
    unfinished = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder (pass run or multirun folders, e.g. "
                                    f"outputs/train/multirun_<date_time>)")
        runs = sorted({p.parent for p in root.rglob("config.yaml") if ".hydra" not in p.parts}
                      | {p.parent for p in root.rglob("metrics.json")})
        for run in runs:
            path = run / "metrics.json"
            if not path.is_file():
                unfinished.append(str(run))
                continue
            for name, table in (json.loads(path.read_text()).get("tables") or {}).items():
                merged = tables.setdefault(name, {"title": table.get("title", name), "columns": [], "rows": []})
                merged["columns"] += [c for c in table["columns"] if c not in merged["columns"]]
                merged["rows"] += [{**row, "run": run.name} for row in table["rows"]]
    for table in tables.values():
        table["rows"].sort(key=lambda r: r.get("order", float("inf")))  # stable: run order otherwise
    return tables, unfinished


def main(argv: list[str] | None = None) -> int:
    """Print and write the gathered tables; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun folders")
    parser.add_argument("--out", help="markdown file (default: FIRST_DIR/neuralcache_tables.md)")
    args = parser.parse_args(argv)
    try:
        tables, unfinished = gather(args.dirs)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not tables:
        print(f"error: no metrics.json with tables under {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    text = "\n\n".join(f"### {t['title']}\n\n" + markdown(t["columns"], t["rows"]) for t in tables.values())
    if unfinished:
        text += "\n\nUnfinished runs (no metrics.json): " + ", ".join(unfinished)
    print(text)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "neuralcache_tables.md"
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
