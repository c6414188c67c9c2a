"""Choosing on the validation split sees no test number: the validation numbers of an ablation run, and the
refusal of any test number in the files its stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

from cifar_resnet.config import read_yaml
from cifar_resnet.lab.ablation_table import AblationError
from cifar_resnet.lab.dvc_graph import code_hash
from cifar_resnet.lab.dvc_runs import git, git_reader, hardware_of, load_file
from cifar_resnet.lab.params import flatten
from cifar_resnet.paths import EVALUATE_JSON, TRAIN_HISTORY, TRAIN_JSON, TRAIN_TIMING


def validation_numbers(read, code: dict, source: str) -> dict:
    """The validation numbers of a run whose files `read` gives; AblationError if it holds any test number."""
    evaluate, train, timing = (load_file(read, rel.as_posix(), json.loads, source)
                               for rel in (EVALUATE_JSON, TRAIN_JSON, TRAIN_TIMING))
    history = read(TRAIN_HISTORY.as_posix())
    columns = history.decode().split("\n", 1)[0].split("\t") if history is not None else []
    tests = sorted({k for k in evaluate if k in ("accuracy", "loss")} | {k for k in train if k.startswith("test_")}
                   | {c for c in columns if c.startswith("test_")})
    if tests:
        raise AblationError(f"{source} holds test numbers ({', '.join(tests)}): choosing must not see the test "
                            "split; the row is not written")
    if history is None or "val_accuracy" not in evaluate or evaluate.get("split") != "val":
        raise AblationError(f"{source}: no validation accuracy in {EVALUATE_JSON} (or no {TRAIN_HISTORY})")
    return {"val_accuracy": float(evaluate["val_accuracy"]), "tta": evaluate.get("tta", "none"),
            "lr_max": float(train["lr_max"]), "train_seconds": float(timing["seconds_total"]),
            "device": str(timing.get("device", "")), "hardware": hardware_of(timing),
            "code_hash": code_hash(code)}


def test_numbers(read, paths: list[str]) -> list[str]:
    """'file: what' for each test number in the text files `paths` (read by `read`): a file or column named test_*,
    a JSON key test_* at any depth or a top-level accuracy or loss (the evaluate stage's test keys), a TSV or CSV
    column test_*."""
    found = []
    for path in paths:
        data = read(path)
        if data is None:
            continue
        if Path(path).name.startswith("test_"):
            found.append(f"{path}: its name")
        elif path.endswith(".json"):
            try:
                tree = json.loads(data.decode())
            except ValueError:
                continue
            keys = [k for k in (flatten(tree) if isinstance(tree, dict) else {})
                    if k in ("accuracy", "loss") or any(part.startswith("test_") for part in k.split("."))]
            found += [f"{path}: {k}" for k in keys]
        elif path.endswith((".tsv", ".csv")):
            header = data.decode(errors="replace").split("\n", 1)[0].replace(",", "\t").split("\t")
            found += [f"{path}: column {c}" for c in header if c.strip().startswith("test_")]
    return found


def row_output_files(ref: str, names=("train", "evaluate")) -> list[str]:
    """The git files (uncached metrics and plots) among the outputs that the row's stages wrote in experiment
    `ref`, folders listed file by file."""
    lock = read_yaml(git("show", f"{ref}:dvc.lock").stdout) or {}
    outs = [o["path"] for name in names for o in (lock.get("stages") or {}).get(name, {}).get("outs") or []]
    if not outs:
        return []
    return git("ls-tree", "-r", "--name-only", ref, "--", *outs).stdout.split()


def refuse_test_numbers(ref: str, name: str) -> None:
    found = test_numbers(git_reader(ref), row_output_files(ref))
    if found:
        raise AblationError(f"experiment {name} holds test numbers ({'; '.join(found)}): choosing must not see the "
                            "test split; the row is not written")
