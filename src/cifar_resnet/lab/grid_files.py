"""A grid study's files in studies/<name>/: runs.csv (one row per grid value and seed), summary.json (computed
from runs.csv alone, so a test recomputes it), config.json (the one configuration the study holds, the grid key
aside), curves/seed<N>.tsv (each seed's LR range-test curve) and sweep.png.

The good region and the verdict on the range test's pick are computed here, each in one function: the rule a
study's README states before its first run."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from cifar_resnet.atomic import write_json
from cifar_resnet.lab import tables
from cifar_resnet.lab.dvc_runs import Config
from cifar_resnet.lab.grid_figure import sweep_figure
from cifar_resnet.lab.params import unflatten
from cifar_resnet.lab.stats import DIGITS, describe
from cifar_resnet.lab.study_files import StudyError, refuse_stray, stored_config

# Per run: status is "ok" or "failed" (a failed run has no numbers and is never run again). pick and lr_at_climb
# are that run's own range test (lr_max and lr_at_climb of metrics/lr_range_test.json; empty when it picked none).
ROW_COLUMNS = ["seed", "status", "val_accuracy", "pick", "lr_at_climb", "train_seconds", "hardware", "code_hash",
               "source"]
TEXT_COLUMNS = {"status": str, "hardware": str, "code_hash": str, "source": str}
OK, FAILED = "ok", "failed"

# The good region (studies/lr-sweep/README.md states it before any run): the grid values whose median validation
# accuracy is within 0.2 points of the best median. A value with a failed run is never in it.
REGION_POINTS = 0.2
REGION_RULE = (f"the values whose median validation accuracy is within {REGION_POINTS:g} points of the best "
               "median (a value with a failed run excluded)")


def columns(key: str) -> list[str]:
    return [key, *ROW_COLUMNS]


def read_rows(path: Path, key: str) -> pd.DataFrame:
    return tables.read_rows(path, columns(key), TEXT_COLUMNS)


def empty_rows(key: str) -> pd.DataFrame:
    return pd.DataFrame(columns=columns(key))


# ---------------------------------------------------------------------------------------------- the rule


def good_region(medians: dict[float, float], failed: set[float] = frozenset()) -> dict | None:
    """The good region of `medians` ({grid value: median validation accuracy, 0-1}): the values within
    REGION_POINTS points of the best median, their ends and centre (the geometric mean of the ends: the grid is
    read on a log scale). None when no value qualifies (no value without a failure)."""
    eligible = {v: m for v, m in medians.items() if v not in failed}
    if not eligible:
        return None
    best = max(eligible.values())
    # In points, rounded: 0.2 points below the best is in, whatever the float noise of the subtraction.
    values = sorted(v for v, m in eligible.items() if round((best - m) * 100, 9) <= REGION_POINTS)
    low, high = values[0], values[-1]
    return {"rule": REGION_RULE, "best_median": best, "values": values, "low": low, "high": high,
            "centre": _round(math.sqrt(low * high))}


def verdict(region: dict | None, picks: list[dict], divisor: float) -> dict | None:
    """Whether the median of the seeds' picks falls in the good region. Outside it, the divisor that puts the
    median pick at the region's centre, on these curves: a pick is lr_at_climb / divisor, so the median pick is
    median(lr_at_climb) / divisor. None without a region or without a pick."""
    picked = [p for p in picks if p["pick"] is not None]
    if region is None or not picked:
        return None
    median_pick = float(pd.Series([p["pick"] for p in picked]).median())
    inside = region["low"] <= median_pick <= region["high"]
    climb = float(pd.Series([p["lr_at_climb"] for p in picked]).median())
    return {"median_pick": _round(median_pick), "inside": inside, "divisor": divisor,
            "new_divisor": None if inside else _round(climb / region["centre"])}


def _round(x: float) -> float:
    return round(x, DIGITS)


# ---------------------------------------------------------------------------------------------- summary


def curve_rows(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per seed, the run whose range test stands for the seed: its successful run of the smallest grid value (all
    of a seed's runs run the same range test: it does not read the grid key)."""
    ok = rows[rows["status"] == OK].sort_values([key, "seed"], kind="stable")
    return ok.drop_duplicates("seed").sort_values("seed").reset_index(drop=True)


def summarise(rows, key: str, divisor: float) -> dict:
    """The study's summary from its rows alone (and the range test's divisor of its configuration)."""
    rows = pd.DataFrame(rows, columns=columns(key))
    ok = rows[rows["status"] == OK]
    per_value, medians, failed = [], {}, set()
    for value, group in rows.groupby(key, sort=True):
        good = pd.to_numeric(group.loc[group["status"] == OK, "val_accuracy"], errors="coerce").dropna()
        fails = int((group["status"] == FAILED).sum())
        entry = {key: float(value), "failed": fails, "seeds": sorted(int(s) for s in group["seed"])}
        if len(good):
            entry["val_accuracy"] = describe(good.astype(float))
            medians[float(value)] = entry["val_accuracy"]["median"]
        if fails:
            failed.add(float(value))
        per_value.append(entry)
    picks = [{"seed": int(r["seed"]), "pick": _number(r["pick"]), "lr_at_climb": _number(r["lr_at_climb"]),
              "agree": _agree(ok[ok["seed"] == r["seed"]]["pick"]), "source": r["source"]}
             for _, r in curve_rows(rows, key).iterrows()]
    region = good_region(medians, failed)
    return {"key": key, "n": int(len(rows)), "failed": int((rows["status"] == FAILED).sum()),
            "seeds": sorted({int(s) for s in rows["seed"]}),
            "hardware": sorted({str(h) for h in ok["hardware"]}), "values": per_value, "picks": picks,
            "region": region, "verdict": verdict(region, picks, divisor)}


def _number(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _agree(picks: pd.Series) -> bool:
    """Whether every run of a seed picked the same LRMAX (its range test, rerun or restored, is the same)."""
    return len({None if pd.isna(p) else float(p) for p in picks}) <= 1


# ---------------------------------------------------------------------------------------------- on disk


def load_study(folder: Path, key: str, config: Config) -> pd.DataFrame:
    """The study's rows; refuses when the study was made under another configuration or another grid key."""
    def same_key(stored: dict) -> None:
        if stored.get("grid_key") != key:
            raise StudyError(f"study {folder.name} is a grid over {stored.get('grid_key')}, not {key}: use another "
                             "study name")

    stored = stored_config(folder, config, same_key)
    if stored is None:
        return empty_rows(key)
    return refuse_stray(read_rows(folder / "runs.csv", key), stored, folder)


def write_study(folder: Path, name: str, key: str, config: Config, rows: pd.DataFrame) -> dict:
    """Every file but the curves, each atomically: rows first, so an interruption never loses a finished run.
    Returns the summary."""
    rows = rows.sort_values([key, "seed"], kind="stable").reset_index(drop=True)[columns(key)]
    tables.write_rows(folder / "runs.csv", rows)
    summary = summarise(read_rows(folder / "runs.csv", key), key, config.params["lr_range_test.divisor"])
    write_json(folder / "summary.json", summary)
    write_json(folder / "config.json", {"study": name, "grid_key": key, "params": unflatten(config.params),
                                        "code": config.code, "code_hash": config.code_hash})
    sweep_figure(folder / "sweep.png", name, key, rows, summary)
    return summary


def curve_path(folder: Path, seed: int) -> Path:
    return folder / "curves" / f"seed{seed}.tsv"
