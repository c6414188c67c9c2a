"""Same params, same code, same data: every output of every stage is the same bytes, the weights included.

Names, times and paths must not leak into an output (a temporary file's name inside a zip, a timestamp in a
member's header), or DVC sees a new file where nothing changed and reruns what depends on it. The one exception is
timing/<stage>.json, whose job is to record how long the run took: only its measured fields may differ. The train
stage's live files (dvclive/) are compared too, with no exception: DVCLive writes its wall-clock `timestamp` column
only when asked, and cifar_resnet.live never asks.
"""

import json

import pytest

from conftest import make_workspace, run_stage, stage_env

STAGES = ["check_params", "lr_range_test", "train", "evaluate", "gallery"]
MEASURED = {"seconds_total", "seconds_training", "seconds_per_epoch", "per_epoch", "images_per_second", "parts",
            "per_part", "total"}


FOLDERS = ("data", "metrics", "plots", "models", "timing", "dvclive")


def _outputs(ws):
    return {str(p.relative_to(ws)): p.read_bytes() for folder in FOLDERS
            for p in sorted((ws / folder).rglob("*")) if p.is_file() and "cifar-10-batches-py" not in p.parts}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = []
    for name in ("first", "second"):
        root = tmp_path_factory.mktemp(name)
        ws = make_workspace(root / "ws", train={"epochs": 2}, lr_range_test={"num_iter": 20, "end_lr": 100.0})
        for stage in STAGES:
            result = run_stage(stage, ws, stage_env(root / "cache"))
            assert result.returncode == 0, f"{stage}: {result.stderr}"
        runs.append(_outputs(ws))
    return runs


@pytest.mark.slow
def test_every_output_is_written(two_runs):
    first, _ = two_runs
    assert {"data/params_checked.txt", "models/model.pt", "models/predictions.npz", "models/summary.txt",
            "metrics/train.json", "metrics/evaluate.json", "plots/history.tsv", "plots/gallery.png",
            "timing/train.json", "dvclive/metrics.json", "dvclive/plots/metrics/test_acc.tsv"} <= set(first)
    for path, data in first.items():
        if path.startswith("dvclive/"):
            assert b"timestamp" not in data, path  # no wall-clock column in the live files


@pytest.mark.slow
def test_two_identical_runs_give_the_same_bytes(two_runs):
    first, second = two_runs
    assert set(first) == set(second)
    differ = [path for path in first if not path.startswith("timing/") and first[path] != second[path]]
    assert differ == []


@pytest.mark.slow
def test_timing_differs_only_in_what_it_measures(two_runs):
    for stage in STAGES[1:]:  # check_params keeps no timing file
        first, second = (json.loads(run[f"timing/{stage}.json"]) for run in two_runs)
        assert {k: v for k, v in first.items() if k not in MEASURED} == {k: v for k, v in second.items()
                                                                          if k not in MEASURED}, stage


@pytest.mark.slow
def test_every_stage_times_its_parts(two_runs):
    """Each stage's timing file: the process start first, then the parts its work has, none negative, summing to at
    most the stage's total (what is left is glue)."""
    expected = {"lr_range_test": ["data", "range_test", "figures"],
                "train": ["data", "training", "outputs"], "evaluate": ["data", "evaluation", "outputs"],
                "gallery": ["data", "figures"]}
    first, _ = two_runs
    assert "timing/check_params.json" not in first  # its run-cache record must restore on another machine
    for stage in expected:
        timing = json.loads(first[f"timing/{stage}.json"])
        parts = timing["parts"]
        assert sorted(parts) == sorted(["process_start", *expected[stage]]), stage
        if stage != "train":  # the train file's only list is its per-epoch chart's
            assert [r["part"] for r in timing["per_part"]] == ["process_start", *expected[stage]], stage
        assert all(v >= 0 for v in parts.values()) and sum(parts.values()) <= timing["total"], (stage, timing)
        assert parts["process_start"] > 0, stage
