"""Gather the neural-caching tables (paper Table 1, Table 2, Fig. 11) from several runs.

    python scripts/train.py -m experiment=neuralcache_synthetic \\
        model.variant=dnr,dnr_plus,dnr_plus_plus,explicit_warp,ours
    python scripts/neuralcache_table.py outputs/train/multirun_<date_time>

Each run's ``metrics.json`` holds ``tables: {name: {"title", "columns", "rows"}}`` (written by
:func:`neuralcache.evaluate.evaluate_neural_cache`); rows of same-named tables from every run
under the given folders are concatenated, ordered by their ``order`` key (the paper's row
order), and printed as markdown; the result is also written to ``DIR/neuralcache_tables.md``
(or ``--out``). A run's metrics are its newest evaluation (``RUN/eval/<name>/metrics.json``,
from ``scripts/eval.py``), else the training's ``RUN/metrics.json``
(:func:`headkit.engine.runs.latest_metrics`); under each table a note states the source when
all its rows share one, else a ``metrics from`` column does. Evaluation folders are not runs
of their own (:func:`headkit.engine.runs.find_runs`, shared with ``scripts/table.py``). Runs
without metrics are listed as unfinished. Works for any method whose evaluation returns
``tables``. For mean ± std over subjects and seeds, CSV and plots: ``scripts/table.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from headkit.engine.runs import find_runs, latest_metrics

SOURCE = "metrics from"  # row key: latest_metrics' label of the run the row came from


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


def table_text(table: dict) -> str:
    """``### title``, the markdown table, and where its metrics came from: a note under it when
    all rows share one source, else a ``metrics from`` column."""
    sources = {r.get(SOURCE) for r in table["rows"]} - {None}
    columns = table["columns"] + ([SOURCE] if len(sources) > 1 and SOURCE not in table["columns"] else [])
    text = f"### {table['title']}\n\n" + markdown(columns, table["rows"])
    return text + (f"\n\n{SOURCE}: {sources.pop()}" if len(sources) == 1 else "")


def gather(roots: list[str | Path]) -> tuple[dict[str, dict], list[str]]:
    """``({table name: {"title", "columns", "rows"}}, [unfinished run folders])`` over ``roots``.

    Each row gets ``"run"`` (the folder name) and ``"metrics from"`` (its source label);
    ``RUN/eval/<name>/`` folders are not runs."""
    tables: dict[str, dict] = {}
    unfinished = []
    for root in map(Path, roots):
        for run in find_runs(root):  # raises FileNotFoundError naming a missing root
            try:
                metrics, source = latest_metrics(run)
            except FileNotFoundError:
                unfinished.append(str(run))
                continue
            for name, table in (metrics.get("tables") or {}).items():
                merged = tables.setdefault(name, {"title": table.get("title", name), "columns": [], "rows": []})
                merged["columns"] += [c for c in table["columns"] if c not in merged["columns"]]
                merged["rows"] += [{**row, "run": run.name, SOURCE: source} for row in table["rows"]]
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
    text = "\n\n".join(table_text(t) for t in tables.values())
    if unfinished:
        text += "\n\nUnfinished runs (no metrics.json): " + ", ".join(unfinished)
    print(text)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "neuralcache_tables.md"
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
