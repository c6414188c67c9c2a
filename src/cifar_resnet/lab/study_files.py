"""A seed study's files in studies/<name>/: runs.csv (one row per seed), summary.json (computed from runs.csv
alone, so a test recomputes it), config.json (the one configuration the study holds) and seeds.png."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cifar_resnet.atomic import write_json
from cifar_resnet.lab import tables
from cifar_resnet.lab.command import LabError
from cifar_resnet.lab.dvc_runs import Config
from cifar_resnet.lab.params import flatten, unflatten
from cifar_resnet.lab.seeds_figure import seeds_figure
from cifar_resnet.lab.stats import describe

STUDIES = Path("studies")
COLUMNS = ["seed", "test_accuracy", "val_accuracy", "lr_max", "train_seconds", "device", "hardware", "code_hash",
           "source"]
TEXT_COLUMNS = {"device": str, "hardware": str, "code_hash": str, "source": str}
SUMMARISED = ["test_accuracy", "val_accuracy", "lr_max", "train_seconds"]
SPLIT_NAMES = {"test_accuracy": "test", "val_accuracy": "validation"}  # in the lines and the figure a person reads


class StudyError(LabError):
    """A study cannot go on: bad arguments, another configuration than the study's, a failed run."""


def headline(has_test: bool) -> str:
    """The column a study is judged by: the test accuracy, or the validation accuracy for a configuration whose
    evaluate stage reports the validation split (data.val_size > 0 and evaluate.split auto or val)."""
    return "test_accuracy" if has_test else "val_accuracy"


def read_rows(path: Path) -> pd.DataFrame:
    return tables.read_rows(path, COLUMNS, TEXT_COLUMNS)


def load_study(folder: Path, config: Config) -> pd.DataFrame:
    """The study's rows; refuses when the study was made under another configuration."""
    stored = stored_config(folder, config)
    if stored is None:
        return pd.DataFrame(columns=COLUMNS)
    return refuse_stray(read_rows(folder / "runs.csv"), stored, folder)


def stored_config(folder: Path, config: Config, check=lambda stored: None) -> dict | None:
    """A study's config.json (None when it has no runs.csv yet), after `check(stored)`; refuses another
    configuration than `config`."""
    runs, stored_path = folder / "runs.csv", folder / "config.json"
    if not runs.is_file():
        return None
    if not stored_path.is_file():
        raise StudyError(f"{runs} exists without {stored_path}: restore it from git or use another study name")
    stored = json.loads(stored_path.read_text())
    check(stored)
    refuse_other(Config(flatten(stored["params"]), stored["code"]), config, f"study {folder.name}")
    return stored


def refuse_stray(rows: pd.DataFrame, stored: dict, folder: Path) -> pd.DataFrame:
    """`rows` when they are all of the study's code."""
    stray = sorted(set(rows["code_hash"]) - {stored["code_hash"]})
    if stray:
        raise StudyError(f"{folder / 'runs.csv'}: rows with code hash {', '.join(stray)}, not the study's "
                         f"{stored['code_hash']}")
    return rows


def refuse_other(theirs: Config, ours: Config, what: str, us: str = "this command") -> None:
    """One line naming what differs between two configurations (`what`'s and `us`'s), or nothing when they are the
    same."""
    keys, paths = theirs.differences(ours)
    if keys:
        k = keys[0]
        more = f" (and {len(keys) - 1} more: {', '.join(keys[1:])})" if len(keys) > 1 else ""
        raise StudyError(f"{what} has {k}={_show(theirs.params, k)} but {us} has {k}={_show(ours.params, k)}"
                         f"{more}: a study holds one configuration; use another study name")
    if paths:
        more = f" (and {len(paths) - 1} more: {', '.join(paths[1:])})" if len(paths) > 1 else ""
        raise StudyError(f"{what} was run on other code than {us}: {paths[0]} differs{more}; "
                         "a study holds one version of the code: use another study name")


def _show(params: dict, key: str) -> str:
    return json.dumps(params[key]) if key in params else "(absent)"


def write_study(folder: Path, name: str, config: Config, rows: pd.DataFrame) -> None:
    """Every file of the study, each atomically: rows first, so an interruption never loses a finished seed."""
    rows = rows.sort_values("seed", kind="stable").reset_index(drop=True)[COLUMNS]
    tables.write_rows(folder / "runs.csv", rows)
    summary = summarise(read_rows(folder / "runs.csv"))
    write_json(folder / "summary.json", summary)
    write_json(folder / "config.json", {"study": name, "params": unflatten(config.params), "code": config.code,
                                        "code_hash": config.code_hash})
    column = headline("test_accuracy" in summary)
    seeds_figure(folder / "seeds.png", name, rows, summary, column, SPLIT_NAMES[column])


def summarise(rows) -> dict:
    """n, seeds, the hardware, and per numeric column its `stats.describe`. A column with no values is left out."""
    rows = pd.DataFrame(rows)
    summary = {"n": int(len(rows)), "seeds": sorted(int(s) for s in rows["seed"]),
               "hardware": sorted({str(h) for h in rows["hardware"]})}
    for column in SUMMARISED:
        values = pd.to_numeric(rows[column], errors="coerce").dropna() if column in rows else pd.Series([])
        if len(values):
            summary[column] = describe(values.astype(float))
    return summary
