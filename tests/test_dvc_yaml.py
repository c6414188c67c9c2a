"""dvc.yaml wiring: stage order, commands that import their own tree, exact code deps, declared outputs."""

from pathlib import Path

import yaml

from closure import import_closure
from conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]
DATA_INPUTS = {"data/cifar-10-batches-py", "metrics/lr_range_test.json", "models/model.pt", "models/predictions.npz",
               "plots/history.tsv", "metrics/train.json"}


def test_stage_names_in_order():
    assert list(STAGES) == ["download", "lr_range_test", "train", "evaluate", "gallery"]


def test_commands_import_the_library_from_the_tree_they_run_in():
    for name, stage in STAGES.items():
        assert stage["cmd"] == f"PYTHONPATH=src python stages/{name}.py", name
        assert ".venv" not in stage["cmd"]


def test_code_deps_are_exactly_each_stages_import_closure():
    for name, stage in STAGES.items():
        script = REPO / "stages" / f"{name}.py"
        code_deps = {d for d in stage["deps"] if d not in DATA_INPUTS}
        expected = {f"stages/{name}.py"} | import_closure(script)
        assert code_deps == expected, f"{name}: extra {code_deps - expected}, missing {expected - code_deps}"


def test_closure_follows_imports_between_library_modules():
    closure = import_closure(REPO / "stages" / "train.py")
    assert "src/cifar_resnet/model.py" in closure and "src/cifar_resnet/schedule.py" in closure
    # The gallery's plotting never reruns training.
    assert "src/cifar_resnet/report.py" not in closure


def test_every_dep_exists_in_the_repo_or_is_a_stage_output():
    outputs = set()
    for stage in STAGES.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                outputs.add(out if isinstance(out, str) else next(iter(out)))
    for name, stage in STAGES.items():
        for dep in stage["deps"]:
            assert dep in outputs or (REPO / dep).exists(), f"{name}: {dep}"


def test_train_reads_the_range_test_pick_and_tracks_lr_max():
    train = STAGES["train"]
    assert "metrics/lr_range_test.json" in train["deps"] and "lr_max" in train["params"]
    assert "lr_max" not in STAGES["lr_range_test"]["params"]  # -S lr_max=... never reruns the range test


def test_download_gates_the_whole_params_file():
    assert STAGES["download"]["params"] == [{"params.yaml": None}]


def test_small_outputs_are_git_files_and_big_ones_are_cached():
    for stage in STAGES.values():
        for kind in ("metrics", "plots"):
            for out in stage.get(kind, []):
                path, opts = next(iter(out.items()))
                assert opts.get("cache") is False, path
        for out in stage.get("outs", []):
            path = out if isinstance(out, str) else next(iter(out))
            if path.startswith(("data/", "models/")):
                assert isinstance(out, str), path  # cached by DVC, git-ignored
    assert "analytics = false" in (REPO / ".dvc/config").read_text()


def test_declared_image_plots_and_metrics():
    declared = {next(iter(o)) if isinstance(o, dict) else o for s in STAGES.values() for o in s.get("plots", [])}
    assert {"plots/gallery.png", "plots/curves.png", "plots/lr_schedule.png", "plots/lr_range_test.png",
            "plots/confusion.csv", "plots/history.tsv"} <= declared
    metrics = {next(iter(o)) for s in STAGES.values() for o in s.get("metrics", [])}
    assert {"metrics/train.json", "metrics/evaluate.json", "metrics/lr_range_test.json"} <= metrics


def test_committed_lock_matches_the_tree():
    """dvc.lock records a real run of main: every dependency file's md5 and every param match what is committed."""
    import hashlib

    lock_path = REPO / "dvc.lock"
    if not lock_path.exists():
        return
    lock = yaml.safe_load(lock_path.read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in lock["stages"].items():
        for dep in stage.get("deps", []):
            path = REPO / dep["path"]
            if path.is_file() and not str(dep.get("md5", "")).endswith(".dir") and Path(dep["path"]).parts[0] in (
                    "src", "stages"):
                assert hashlib.md5(path.read_bytes()).hexdigest() == dep["md5"], f"{name}: {dep['path']}"
            elif dep["path"].startswith("metrics/") or dep["path"].startswith("plots/"):
                assert hashlib.md5(path.read_bytes()).hexdigest() == dep["md5"], f"{name}: {dep['path']}"
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            node = params
            for part in key.split("."):
                node = node[part]
            assert node == value, f"{name}: params {key}"


def test_no_plain_uncached_out_switches_the_run_cache_off():
    # DVC skips saving a stage to its run-cache when an `outs:` entry has cache: false (metrics/plots may).
    for name, stage in STAGES.items():
        for out in stage.get("outs", []):
            assert isinstance(out, str) or next(iter(out.values())).get("cache", True), name
