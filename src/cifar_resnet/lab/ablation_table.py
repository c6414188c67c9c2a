"""The ablation's files: studies/ablation/runs.csv (one row per recipe variant, never run twice) and table.md,
the README's table, made from runs.csv."""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd

from cifar_resnet.atomic import write_text
from cifar_resnet.lab import tables
from cifar_resnet.lab.command import LabError
from cifar_resnet.lab.study_files import STUDIES

FOLDER = STUDIES / "ablation"
RUNS = FOLDER / "runs.csv"
TABLE = FOLDER / "table.md"
# evaluate.tta value -> the runs.csv column suffix and the experiment name suffix (none: the row's own name)
TTAS = {"none": "none", "flip": "flip", "flip+translate": "flip_translate"}
COLUMNS = ["row", "set", "seed", "val_size", *(f"val_accuracy_{c}" for c in TTAS.values()), "lr_max",
           "train_seconds", "device", "hardware", "runner", "code_hash", "commit"]
TEXT_COLUMNS = {"row": str, "set": str, "device": str, "hardware": str, "runner": str, "code_hash": str,
                "commit": str}
RUNNER = "dvc exp run"  # runs.csv's `runner`: earlier rows name another way they ran


class AblationError(LabError):
    """A row cannot be made: bad arguments, a row that exists, a run that trained twice or made a test number."""


def parse_sets(text: str) -> list[str]:
    """runs.csv's `set` cell back to the list of overrides (shlex: quoting survives the round trip)."""
    return shlex.split(text)


def join_sets(sets: list[str]) -> str:
    return shlex.join(sets)


def read_rows(path: Path = RUNS) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return tables.read_rows(path, COLUMNS, TEXT_COLUMNS)


def refuse_existing(rows: pd.DataFrame, row: str, sets: list[str], seed: int, val_size: int,
                    code_hash: str) -> None:
    """A row name is used once; a configuration (set, seed, val_size, code) is run once, whatever the row's name.
    The same set on other code (a fixed bug) is a new row beside the old one, which stays in the table."""
    refuse_name(rows, row)
    for _, r in rows.iterrows():
        if sorted(parse_sets(r["set"])) == sorted(sets) and int(r["seed"]) == seed and \
                int(r["val_size"]) == val_size and r["code_hash"] == code_hash:
            raise AblationError(f"row {r['row']} in {RUNS} already has this set, seed {seed} and val_size "
                                f"{val_size} on this code ({code_hash}): a configuration is run once")


def refuse_name(rows: pd.DataFrame, row: str) -> None:
    same = rows[rows["row"] == row]
    if not same.empty:
        raise AblationError(f"row {row} is already in {RUNS} (seed {same['seed'].iloc[0]}): a row is run once, "
                            "never again to improve its number; choose another row name")


def write_rows(rows: pd.DataFrame) -> None:
    """runs.csv (first: the row is what matters), then table.md made from runs.csv as written; each atomic."""
    tables.write_rows(RUNS, rows[COLUMNS])
    write_text(TABLE, markdown_table(read_rows(RUNS)))


def table_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The README's columns, as text: accuracies in %, the wall time in seconds (and minutes)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    def percent(value) -> str:
        return "" if pd.isna(value) else f"{100 * float(value):.2f} %"

    def seconds(value) -> str:
        if pd.isna(value):
            return ""
        s = float(value)
        return f"{s:.0f} s" + (f" ({s / 60:.1f} min)" if s >= 120 else "")

    return pd.DataFrame({
        "row": [cell(r) for r in rows["row"]],
        "cumulative set": [cell(f"`{s}`") if s else "(params.yaml)" for s in rows["set"]],
        "seed": [str(int(s)) for s in rows["seed"]],
        "val images": [str(int(n)) for n in rows["val_size"]],
        "val acc, no TTA": [percent(v) for v in rows["val_accuracy_none"]],
        "flip TTA": [percent(v) for v in rows["val_accuracy_flip"]],
        "flip+translate TTA": [percent(v) for v in rows["val_accuracy_flip_translate"]],
        "LRMAX": [f"{float(v):.4g}" for v in rows["lr_max"]],
        "train wall time": [seconds(v) for v in rows["train_seconds"]],
        "hardware": [cell(hardware_name(h)) for h in rows["hardware"]],
        "run by": [cell(r) for r in rows["runner"]],
    }, columns=["row", "cumulative set", "seed", "val images", "val acc, no TTA", "flip TTA", "flip+translate TTA",
                "LRMAX", "train wall time", "hardware", "run by"])


def hardware_name(text: str) -> str:
    """runs.csv's hardware cell for the table: rows written before dvc_runs.hardware_of joined a GPU list hold the
    list's repr (['NVIDIA H200']); the table shows the names."""
    if text.startswith("[") and text.endswith("]"):
        return ", ".join(name.strip().strip("'\"") for name in text[1:-1].split(","))
    return text


def markdown_table(rows: pd.DataFrame) -> str:
    return (f"<!-- Made by `python -m cifar_resnet.lab.ablation` from {RUNS.name}; do not edit: run a row instead. "
            "-->\n\n" + tables.pipe_table(table_frame(rows)) + "\n\n"
            "Validation accuracy on the `val images` held out of the training set (data.val_size), for one seed, "
            "with the model of one training run evaluated without test-time augmentation, with flip TTA and with "
            "flip x {0, +-1 px} TTA; no test accuracy was computed for any row. Each row's set is cumulative "
            f"(params.yaml, then these overrides). LRMAX, code hash and commit of each row: {RUNS.name}.\n")
