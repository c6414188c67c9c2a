"""The README is a manual that states only what the committed files hold: its numbers are checked against them, its
length is bounded, and no file of the project says how or by whom it was made."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
ONE_LINE = " ".join(README.split())


def _summary(study: str) -> dict:
    return json.loads((REPO / "studies" / study / "summary.json").read_text())


def _pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f} %"


def test_the_readme_is_a_manual_of_bounded_length():
    assert len(README.splitlines()) < 350


@pytest.mark.parametrize(("row", "study"), [("default recipe", "default"), ("tricks set", "tricks")])
def test_the_results_table_is_the_committed_summaries(row, study):
    line = next(line for line in README.splitlines() if line.startswith(f"| {row} |"))
    cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
    acc = _summary(study)["test_accuracy"]
    assert cells[2] == str(acc["n"])
    assert cells[3:8] == [_pct(acc["median"]), _pct(acc["mean"]), _pct(acc["std"]), _pct(acc["min"]),
                          _pct(acc["max"])]
    assert cells[8] == f"{_pct(acc['ci95_low'])[:-2]}-{_pct(acc['ci95_high'])}"


def test_the_headline_numbers_are_the_committed_ones():
    default, tricks = _summary("default")["test_accuracy"], _summary("tricks")["test_accuracy"]
    assert f"median {_pct(default['median'])} over {default['n']} seeds" in ONE_LINE
    assert f"{_pct(tricks['median'])} with the opt-in tricks set" in ONE_LINE
    lr = _summary("default")["lr_max"]
    assert f"({lr['min']:.2f}-{lr['max']:.2f}, in `runs.csv`)" in ONE_LINE
    code_hashes = {json.loads((REPO / "studies" / s / "config.json").read_text())["code_hash"]
                   for s in ("default", "tricks")}
    assert len(code_hashes) == 1 and f"code hash {code_hashes.pop()} on every row" in ONE_LINE


def test_the_records_numbers_are_the_committed_metrics():
    evaluate = json.loads((REPO / "metrics/evaluate.json").read_text())
    range_test = json.loads((REPO / "metrics/lr_range_test.json").read_text())
    assert f"Test accuracy **{_pct(evaluate['accuracy'])}** (`metrics/evaluate.json`)" in ONE_LINE
    assert f"LRMAX {range_test['lr_max']:.4f} from the range test" in ONE_LINE


def test_the_networks_size_is_the_models():
    from cifar_resnet.config import ModelParams
    from cifar_resnet.model import build_model

    total = sum(p.numel() for p in build_model(ModelParams()).parameters())
    assert f"**Network** ({total:,} params)" in ONE_LINE


HOW_IT_WAS_MADE = re.compile(r"\blent\b|\bborrow|\bissues?\b|\bwork items?\b|\bdevice minutes\b|\bminutes of (device|machine|GPU) time\b|"
                             r"\b(this|previous|earlier) session\b", re.I)


def test_no_file_says_how_or_by_whom_it_was_made():
    files = [REPO / "README.md", REPO / "Makefile", *REPO.glob("studies/**/*.md"), *REPO.glob("src/**/*.py"),
             *REPO.glob("stages/*.py"), *REPO.glob("tests/*.py"), *REPO.glob(".ci/*")]
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in files if path.name != "test_readme.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if HOW_IT_WAS_MADE.search(line)]
    assert not found, "\n".join(found)
