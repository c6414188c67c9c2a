"""The grid-study command: its good-region rule, its summary and figure from synthetic rows, and (slow, real data)
the whole command through DVC's queue with three workers in a fresh git copy of the repo on the tiny configuration:
two LR values x two seeds, then the same command again."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from conftest import copy_repo, stage_env, tiny_set
from cifar_resnet.lab import grid_files, grid_study
from cifar_resnet.lab.dvc_runs import Config
from cifar_resnet.lab.study_files import StudyError


def row(value, seed, acc, pick=0.49, climb=0.61, status="ok"):
    return {"lr_max": value, "seed": seed, "status": status, "val_accuracy": acc, "pick": pick,
            "lr_at_climb": climb, "train_seconds": 60.0, "hardware": "Some GPU", "code_hash": "0123456789abcdef",
            "source": f"experiment s-lr_max{value:g}-seed{seed}"}


def test_the_region_is_every_value_within_two_tenths_of_a_point_of_the_best_median():
    region = grid_files.good_region({0.1: 0.930, 0.2: 0.938, 0.4: 0.940, 0.8: 0.9385, 1.0: 0.9379})
    assert region["best_median"] == 0.940 and region["values"] == [0.2, 0.4, 0.8]  # 0.2 points exactly is in
    assert region["low"] == 0.2 and region["high"] == 0.8 and region["centre"] == 0.4
    # A value with a failed run is never in the region, whatever its surviving seeds say.
    assert grid_files.good_region({0.4: 0.94, 0.8: 0.95}, failed={0.8})["values"] == [0.4]
    assert grid_files.good_region({0.4: 0.94}, failed={0.4}) is None


def test_the_verdict_moves_the_divisor_only_when_the_median_pick_is_outside():
    region = grid_files.good_region({0.2: 0.939, 0.4: 0.940, 0.8: 0.941})
    picks = [{"pick": p, "lr_at_climb": p * 1.25} for p in (0.3, 0.5, 0.6)]
    assert grid_files.verdict(region, picks, 1.25) == {"median_pick": 0.5, "inside": True, "divisor": 1.25,
                                                       "new_divisor": None}
    low = [{"pick": p, "lr_at_climb": p * 1.25} for p in (0.05, 0.1)]
    v = grid_files.verdict(region, [*low, {"pick": None, "lr_at_climb": None}], 1.25)  # no pick: left out
    # median pick 0.075 -> the centre 0.4 needs lr_at_climb's median (0.09375) / 0.4.
    assert v["median_pick"] == 0.075 and not v["inside"] and v["new_divisor"] == pytest.approx(0.234375)
    assert 0.09375 / v["new_divisor"] == pytest.approx(region["centre"])


def test_summary_and_files_from_synthetic_rows(tmp_path):
    rows = [row(v, s, acc) for s, accs in enumerate([(0.90, 0.93, 0.92), (0.91, 0.935, 0.925), (0.89, 0.94, 0.93)])
            for v, acc in zip((0.1, 0.4, 1.0), accs)]
    rows[0]["pick"] = 0.45  # seed 0's smallest value stands for the seed; its other runs picked 0.49
    rows.append(row(2.0, 0, None, pick=None, climb=None, status="failed"))
    config = Config({"lr_range_test.divisor": 1.25, "data.val_size": 5000}, {"src/a.py": "0" * 32})
    folder = tmp_path / "s"
    written = grid_files.write_study(folder, "s", "lr_max", config, pd.DataFrame(rows))
    back = grid_files.read_rows(folder / "runs.csv", "lr_max")
    assert list(back.columns) == grid_files.columns("lr_max") and len(back) == 10
    summary = json.loads((folder / "summary.json").read_text())
    assert summary == written == grid_files.summarise(back, "lr_max", 1.25)
    assert summary["n"] == 10 and summary["failed"] == 1 and summary["seeds"] == [0, 1, 2]
    by_value = {v["lr_max"]: v for v in summary["values"]}
    assert by_value[0.4]["val_accuracy"]["median"] == 0.935 and by_value[0.4]["val_accuracy"]["n"] == 3
    assert by_value[2.0]["failed"] == 1 and "val_accuracy" not in by_value[2.0]
    assert summary["region"]["values"] == [0.4] and summary["region"]["centre"] == 0.4  # 1.0: 0.5 points short
    assert [(p["seed"], p["pick"], p["agree"]) for p in summary["picks"]] == [(0, 0.45, False), (1, 0.49, True),
                                                                             (2, 0.49, True)]
    assert summary["verdict"]["median_pick"] == 0.49 and not summary["verdict"]["inside"]
    assert summary["verdict"]["new_divisor"] == pytest.approx(0.61 / 0.4)
    png = (folder / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    grid_files.write_study(folder, "s", "lr_max", config, back)
    assert (folder / "sweep.png").read_bytes() == png  # same rows, same bytes
    with pytest.raises(StudyError, match="a grid over lr_max, not train.epochs"):
        grid_files.load_study(folder, "train.epochs", config)


def test_grid_and_names_parse():
    assert grid_study.parse_grid("lr_max=0.4,0.1, 1e-1,1") == ("lr_max", [0.1, 0.4, 1.0])
    for bad in ("lr_max", "lr_max=", "lr_max=0.1,x", "lr_max=0,0.1", "=0.1"):
        with pytest.raises(StudyError, match="--grid"):
            grid_study.parse_grid(bad)
    assert grid_study.exp_name("lr-sweep", "lr_max", 0.3, 1) == "lr-sweep-lr_max0.3-seed1"
    assert grid_study.exp_name("s", "train.weight_decay", 1.0, 0) == "s-weight_decay1-seed0"


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_grid_runs_through_the_queue_with_three_workers_and_a_rerun_runs_nothing(tmp_path, mirror):
    env = stage_env(tmp_path / "cache", CIFAR10_MIRROR=str(mirror), PYTHONPATH=str(tmp_path / "repo" / "src"))
    repo = copy_repo(tmp_path / "repo", env)
    repo.dvc("repro", "download")  # the data once, in the DVC cache: each queued run checks it out
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "data")
    command = [sys.executable, "-m", "cifar_resnet.lab.grid_study", "tiny", "--grid", "lr_max=0.1,0.2",
               "--seeds", "0-1", "--jobs", "3", *[a for s in tiny_set("data.val_size=256") for a in ("--set", s)]]
    try:
        out = repo.run(*command, timeout=1200).stdout
    finally:
        repo.dvc("queue", "stop", "--kill", check=False)
    folder = repo.path / "studies/tiny"
    rows = grid_files.read_rows(folder / "runs.csv", "lr_max")
    assert sorted(zip(rows["lr_max"], rows["seed"])) == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)], out
    assert set(rows["status"]) == {"ok"} and rows["val_accuracy"].between(0, 1).all(), out
    assert "dvc queue start -j 3" in out and out.count("validation accuracy") == 4, out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary == grid_files.summarise(rows, "lr_max", 10)  # TINY_SET's divisor
    baseline = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    for seed, pick in ((0, summary["picks"][0]), (1, summary["picks"][1])):
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/tiny-lr_max0.1-seed{seed}"
        test = json.loads(repo.run("git", "show", f"{ref}:metrics/lr_range_test.json").stdout)
        assert pick["seed"] == seed and pick["pick"] == test["lr_max"] > 0 and pick["agree"], summary
        curve = repo.run("git", "show", f"{ref}:plots/lr_range_test.tsv").stdout
        assert (folder / f"curves/seed{seed}.tsv").read_text() == curve and curve.startswith("iteration\tlr\t")
    assert summary["region"]["values"] and summary["verdict"]["median_pick"] > 0
    assert (folder / "sweep.png").read_bytes().startswith(b"\x89PNG")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    again = repo.run(*command).stdout
    assert "4 run(s) already recorded, not run again" in again and "queue start" not in again, again
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
