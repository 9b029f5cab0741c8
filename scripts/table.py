"""Paper-style tables from any set of runs: mean ± std over subjects and seeds, CSV and plots.

    python scripts/train.py -m ablation=full,no_ggo data=subject data.root=data/a,data/b seed=0,1,2
    python scripts/table.py runs=outputs/train/multirun_<date_time> group=ablation_name
    python scripts/table.py 'runs=[outputs/train/multirun_A,outputs/train/multirun_B]' \\
        group=model.variant 'where={experiment_name:neuralcache_synthetic}'

Every run folder under ``runs`` (``config.yaml`` or ``metrics.json``; evaluation folders
``RUN/eval/<name>/`` are not runs, :func:`headkit.engine.runs.find_runs`) is read: its newest
metrics (``RUN/eval/<name>/metrics.json`` from ``scripts/eval.py``, else the training's,
:func:`headkit.engine.runs.latest_metrics`) and its values for ``group``, ``subject`` and ``seed``
(``config.yaml``, else ``metrics.json``, else ``.hydra/overrides.yaml``:
:func:`headkit.engine.runs.run_value`). Runs sharing a ``group`` value form one row; each column
is the mean ± sample standard deviation over the row's finished runs, i.e. over its subjects and
seeds together (``runs``, ``subjects`` and ``seeds`` columns say how many). A value some runs lack
(LPIPS without weights) is averaged over the others and marked ``(k/n)``. Written to ``out``
(default: the first folder of ``runs``): ``NAME.md`` (the table, a PSNR-per-subject table when
there are several subjects, notes), ``NAME.csv`` (one line per row: mean, std, count per metric),
``NAME_runs.csv`` (one line per run) and ``NAME_<y>_vs_<x>.svg`` (each row's mean ± std as a
labelled point with its runs as faint dots; PSNR against stored size and against time per frame
by default). Settings: ``configs/table.yaml``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from headkit.cli import user_errors_exit
from headkit.engine.runs import RunNotFound, find_runs, latest_metrics, run_value
from headkit.errors import InvalidConfigValue
from headkit.plot import scatter_plot_svg

# metrics.json key -> (column header, decimals); other keys: the key itself, 4 significant digits
COLUMNS = {"psnr": ("PSNR ↑", 2), "ssim": ("SSIM ↑", 4), "lpips": ("LPIPS ↓", 4), "l2": ("L2 ↓", 5),
           "time_per_frame_ms": ("Time (ms) ↓", 1), "fps": ("FPS ↑", 1), "model_size_mb": ("Size (MB) ↓", 2),
           "model_size_fp16_mb": ("Size fp16 (MB) ↓", 2), "train_seconds": ("Train (s)", 0)}
AXES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "l2": "L2 (MSE)",
        "time_per_frame_ms": "time per frame (ms)", "fps": "frames per second",
        "model_size_mb": "stored size (MB)", "model_size_fp16_mb": "stored size at fp16 (MB)"}
HIGHER_BETTER, LOWER_BETTER = {"psnr", "ssim", "fps"}, {"lpips", "l2", "time_per_frame_ms", "model_size_mb",
                                                        "model_size_fp16_mb"}
NONE = "(none)"  # the group, subject or seed of a run that has no value for the key


def _text(value: Any) -> str:
    return NONE if value is None else str(value)


def _number(value: Any) -> float | None:
    """A metrics.json value as a float; None for missing, null, non-numbers and booleans."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, (list, tuple)):
        return any(_matches(value, w) for w in wanted)
    return (value is None) if wanted is None else _text(value) == str(wanted)


def gather(roots: str | Path | Sequence[str | Path], group: str, subject: str = "subject", seed: str = "seed",
           where: Mapping[str, Any] | None = None) -> list[dict]:
    """One record per run folder under ``roots``: ``{"run", "group", "subject", "seed",
    "metrics" (None: unfinished), "source", "experiment"}``; ``where`` keeps runs whose key has the given value
    (or one of a list). Raises :class:`RunNotFound` for a missing folder."""
    try:
        runs = find_runs([roots] if isinstance(roots, (str, Path)) else list(roots))
    except FileNotFoundError as exc:
        raise RunNotFound(str(exc)) from exc
    records = []
    for run in runs:
        try:
            metrics, source = latest_metrics(run)
        except FileNotFoundError:
            metrics, source = None, None
        if not all(_matches(run_value(run, key, metrics), wanted) for key, wanted in (where or {}).items()):
            continue
        records.append({"run": run, "group": _text(run_value(run, group, metrics)),
                        "subject": _text(run_value(run, subject, metrics)),
                        "seed": _text(run_value(run, seed, metrics)), "metrics": metrics, "source": source,
                        "experiment": _text(run_value(run, "experiment_name", metrics))})
    return records


def stats(values: Iterable[float]) -> dict:
    """``{"mean", "std", "n"}``: the sample standard deviation (n - 1), None below two values."""
    values = list(values)
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def summarise(records: list[dict], metrics: Sequence[str], order: Sequence[str] = (),
              labels: Mapping[str, str] | None = None) -> list[dict]:
    """One row per group: ``{"group", "label", "runs" (finished records), "unfinished" (folders),
    "subjects", "seeds", "sources", "devices", "stats": {metric: stats()}}``, ordered by
    ``order`` first, then alphabetically."""
    labels = {str(k): str(v) for k, v in (labels or {}).items()}
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["group"], []).append(record)
    rank = {str(name): i for i, name in enumerate(order)}
    rows = []
    for name in sorted(groups, key=lambda g: (rank.get(g, len(rank)), g)):
        done = [r for r in groups[name] if r["metrics"] is not None]
        rows.append({
            "group": name, "label": labels.get(name, name), "runs": done,
            "unfinished": [str(r["run"]) for r in groups[name] if r["metrics"] is None],
            "subjects": sorted({r["subject"] for r in done}), "seeds": sorted({r["seed"] for r in done}),
            "sources": sorted({r["source"] for r in done}),
            "devices": sorted({str(r["metrics"]["device"]) for r in done if r["metrics"].get("device")}),
            "stats": {key: stats(v for r in done if (v := _number(r["metrics"].get(key))) is not None)
                      for key in metrics}})
    return rows


def _decimals(key: str) -> int | None:
    return COLUMNS[key][1] if key in COLUMNS else None


def _fmt(value: float, decimals: int | None) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{decimals}f}" if decimals is not None else f"{value:.4g}"


def cell(stat: dict, key: str, runs: int) -> str:
    """``mean ± std`` (only the mean for one value), ``(k/n)`` when k of the n runs have it."""
    if stat["n"] == 0:
        return "n/a"
    digits = _decimals(key)
    text = _fmt(stat["mean"], digits)
    if stat["std"] is not None:
        text += " ± " + _fmt(stat["std"], digits)
    return text + (f" ({stat['n']}/{runs})" if stat["n"] < runs else "")


def _md(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def markdown(rows: list[dict], metrics: Sequence[str], group: str) -> str:
    """The table (one line per group), a per-subject table of the first metric when the runs
    hold several subjects, and notes: what ± means, where the metrics came from, devices,
    unfinished runs, groups mixing experiments and why LPIPS is missing."""
    finished = [r for row in rows for r in row["runs"]]
    sources = sorted({s for row in rows for s in row["sources"]})
    per_row_source = len(sources) > 1
    header = [group, "runs", "subjects", "seeds", *(COLUMNS.get(k, (k,))[0] for k in metrics)]
    header += ["metrics from"] if per_row_source else []
    lines = []
    for row in rows:
        n = len(row["runs"])
        line = [row["label"], str(n), str(len(row["subjects"])), str(len(row["seeds"]))]
        line += [cell(row["stats"][k], k, n) if n else "not finished" for k in metrics]
        line += [", ".join(row["sources"])] if per_row_source else []
        lines.append(line)
    text = _md(header, lines)
    subjects = sorted({r["subject"] for r in finished})
    if len(subjects) > 1 and metrics:
        key = metrics[0]
        text += ["", f"{COLUMNS.get(key, (key,))[0]} per subject (mean ± std over seeds):", ""]
        body = []
        for row in rows:
            line = [row["label"]]
            for subject in subjects:
                values = [v for r in row["runs"] if r["subject"] == subject
                          and (v := _number(r["metrics"].get(key))) is not None]
                line.append(cell(stats(values), key, len(values)) if values else "")
            body.append(line)
        text += _md([group, *subjects], body)
    notes = ["mean ± sample std over each row's finished runs (its subjects x seeds); (k/n): only k of "
             "the row's n runs report that value"]
    if len(sources) == 1:
        notes.append(f"metrics from: {sources[0]}")
    devices = sorted({d for row in rows for d in row["devices"]})
    if len(devices) > 1 and any(k in metrics for k in ("time_per_frame_ms", "fps")):
        notes.append("times were measured on different devices (" + ", ".join(devices) + "): compare them "
                     "within one device only")
    elif devices:
        notes.append(f"device: {devices[0]}")
    for row in rows:
        experiments = sorted({r.get("experiment", NONE) for r in row["runs"]})
        if len(experiments) > 1 and group != "experiment_name":
            notes.append(f"{row['label']} mixes experiments ({', '.join(experiments)}): narrow the runs with "
                         "where={experiment_name:NAME} or group=experiment_name")
    unfinished = [u for row in rows for u in row["unfinished"]]
    if unfinished:
        notes.append("unfinished runs (no metrics.json): " + ", ".join(unfinished))
    reasons = sorted({str(r["metrics"]["lpips_unavailable_reason"]) for r in finished
                      if r["metrics"].get("lpips") is None and r["metrics"].get("lpips_unavailable_reason")})
    notes += [f"LPIPS n/a: {reason}" for reason in reasons]
    return "\n".join(text + [""] + [f"- {note}" for note in notes]) + "\n"


def write_csv(rows: list[dict], metrics: Sequence[str], path: str | Path, group: str) -> Path:
    """One line per group: ``group, label, runs, subjects, seeds, <m>_mean, <m>_std, <m>_n ...``
    (subjects and seeds as ``;``-joined names)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([group, "label", "runs", "subjects", "seeds",
                         *(f"{k}_{s}" for k in metrics for s in ("mean", "std", "n")), "metrics_from"])
        for row in rows:
            values = [row["stats"][k][s] for k in metrics for s in ("mean", "std", "n")]
            writer.writerow([row["group"], row["label"], len(row["runs"]), ";".join(row["subjects"]),
                             ";".join(row["seeds"]), *("" if v is None else v for v in values),
                             ";".join(row["sources"])])
    return path


def write_runs_csv(records: list[dict], metrics: Sequence[str], path: str | Path, group: str) -> Path:
    """One line per run: ``group, subject, seed, run, metrics_from`` and each metric (empty: missing)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([group, "subject", "seed", "run", "metrics_from", *metrics])
        for r in records:
            values = [_number((r["metrics"] or {}).get(k)) for k in metrics]
            writer.writerow([r["group"], r["subject"], r["seed"], str(r["run"]), r["source"] or "unfinished",
                             *("" if v is None else v for v in values)])
    return path


def write_plots(rows: list[dict], y: str, xs: Sequence[str], out: str | Path,
                name: str) -> tuple[list[Path], list[str]]:
    """One scatter plot per x in ``xs``: each group's mean ± std of ``y`` against ``x``, with its runs
    as faint dots; a log x axis when x spans more than a factor of 10. Returns ``(written, skipped
    reasons)``."""
    written, skipped = [], []
    for x in xs:
        points = []
        for row in rows:
            members = [(_number(r["metrics"].get(x)), _number(r["metrics"].get(y))) for r in row["runs"]]
            members = [(a, b) for a, b in members if a is not None and b is not None]
            if members:
                mx, my = stats(a for a, _ in members), stats(b for _, b in members)
                points.append({"label": row["label"], "x": mx["mean"], "y": my["mean"], "xerr": mx["std"],
                               "yerr": my["std"], "members": members if len(members) > 1 else []})
        if not points:
            skipped.append(f"{y} against {x}: no finished run has both values")
            continue
        values = [p["x"] for p in points] + [m[0] for p in points for m in p["members"]]
        xlog = min(values) > 0 and max(values) / min(values) > 10
        runs = sum(len(row["runs"]) for row in rows)
        path = Path(out) / f"{name}_{y}_vs_{x}.svg"
        scatter_plot_svg(path, points, title=f"{AXES.get(y, y)} against {AXES.get(x, x)}",
                         xlabel=AXES.get(x, x), ylabel=AXES.get(y, y), xlog=xlog,
                         note=f"mean ± std per group; faint dots: single runs ({runs} runs)"
                              + ("; better: up and to the left" if y in HIGHER_BETTER and x in LOWER_BETTER else ""))
        written.append(path)
    return written, skipped


def make_table(cfg: Mapping) -> dict:
    """Everything ``main`` does, from a config mapping (``configs/table.yaml``'s keys); returns
    ``{"markdown", "files", "skipped"}``."""
    runs = cfg["runs"]
    roots = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if not roots:
        raise InvalidConfigValue("runs=[] names no folder; pass runs=DIR or runs=[DIR1,DIR2]")
    metrics = [str(k) for k in cfg.get("metrics") or ()]
    if not metrics:
        raise InvalidConfigValue("metrics=[] names no column; e.g. metrics=[psnr,ssim,lpips]")
    group = str(cfg.get("group") or "")
    if not group:
        raise InvalidConfigValue("group is empty; name the config key of a row, e.g. group=ablation_name")
    records = gather(roots, group, str(cfg.get("subject", "subject")), str(cfg.get("seed", "seed")),
                     cfg.get("where") or {})
    if not records:
        where = f" matching where={dict(cfg.get('where'))}" if cfg.get("where") else ""
        raise RunNotFound(f"no run folders (config.yaml / metrics.json){where} under {', '.join(map(str, roots))}")
    y = str(cfg.get("plot_y") or "psnr")
    xs = [str(x) for x in cfg.get("plot_x") or ()]
    rows = summarise(records, list(dict.fromkeys([*metrics, y, *xs])), cfg.get("order") or (), cfg.get("labels"))
    out = Path(cfg.get("out") or roots[0])
    out.mkdir(parents=True, exist_ok=True)
    name = str(cfg.get("name") or "table")
    text = markdown(rows, metrics, group)
    (out / f"{name}.md").write_text(text)
    files = [out / f"{name}.md", write_csv(rows, metrics, out / f"{name}.csv", group),
             write_runs_csv(records, list(dict.fromkeys([*metrics, y, *xs])), out / f"{name}_runs.csv", group)]
    plots, skipped = write_plots(rows, y, xs, out, name)
    return {"markdown": text, "files": files + plots, "skipped": skipped}


@hydra.main(version_base="1.3", config_path="../configs", config_name="table")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: print the table and the files written."""
    with user_errors_exit():  # no such folder, no runs, an empty setting: one "error:" line, exit code 2
        result = make_table(OmegaConf.to_container(cfg, resolve=True))
    print(result["markdown"])
    for reason in result["skipped"]:
        print(f"no plot of {reason}")
    print("written: " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    main()
