"""dvc.yaml wiring: stage order, commands that import their own tree, exact code deps, declared outputs, and the
committed record of a real run."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cifar_resnet import paths

from closure import import_closure
from conftest import RECORD, REPO, file_at

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]
DATA_INPUTS = {"data/params_checked.txt", "data/cifar-10-batches-py", "metrics/lr_range_test.json", "models/model.pt", "models/predictions.npz",
               "plots/history.tsv", "metrics/train.json"}


def test_stage_names_in_order():
    assert list(STAGES) == ["check_params", "download", "lr_range_test", "train", "evaluate", "gallery"]


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
    assert "src/cifar_resnet/figures.py" not in closure
    # A change to the training loop never reruns evaluation.
    evaluate = import_closure(REPO / "stages" / "evaluate.py")
    assert not {f"src/cifar_resnet/{m}.py" for m in ("train", "schedule", "checkpoint", "step")} & evaluate


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


def test_the_gate_tracks_the_whole_params_file_and_download_only_its_url():
    assert STAGES["check_params"]["params"] == [{"params.yaml": None}]
    assert STAGES["check_params"]["outs"] == [str(paths.PARAMS_CHECKED)]
    assert STAGES["download"]["params"] == ["data.url"]
    # Every other stage comes after the gate: download depends on it, and everything else on download.
    assert str(paths.PARAMS_CHECKED) in STAGES["download"]["deps"]
    for name in ("lr_range_test", "train", "evaluate", "gallery"):
        assert str(paths.DATA_DIR) in STAGES[name]["deps"], name


def _declared_outputs() -> set[str]:
    found = set()
    for stage in STAGES.values():
        for kind in ("outs", "metrics", "plots"):
            found |= {out if isinstance(out, str) else next(iter(out)) for out in stage.get(kind, [])}
    return found


def test_paths_module_and_dvc_yaml_name_the_same_outputs():
    in_paths = {str(v) for k, v in vars(paths).items() if k.isupper() and isinstance(v, Path)}
    assert in_paths == _declared_outputs()


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


LOCK = yaml.safe_load((REPO / "dvc.lock").read_text())
# (stage, path, md5) of every code file the record's stages read
CODE_DEPS = [(name, dep["path"], dep["md5"]) for name, stage in LOCK["stages"].items() for dep in stage.get("deps", [])
             if dep["path"].startswith(("src/", "stages/"))]


def _param(params: dict, key: str):
    for part in key.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def _locked_params():
    """(stage, key, value) of every param dvc.lock records."""
    return [(name, key, value) for name, stage in LOCK["stages"].items()
            for key, value in stage.get("params", {}).get("params.yaml", {}).items()]


def test_committed_lock_is_the_record_of_the_commit_it_names():
    """dvc.lock records a real run of the code and params.yaml of the commit metrics/record.json names
    (`made_from_commit`): every dependency file's md5 and every param match that commit, and every small output it
    lists matches the committed file. main's code may move ahead of the record (`dvc status` lists the stages that
    would rerun); remaking it (`make repro`, then commit dvc.lock, metrics/, plots/, timing/, dvclive/ and
    metrics/record.json naming the commit it ran) moves the record forward."""
    made_from = RECORD["made_from_commit"]
    params = yaml.safe_load(file_at(made_from, "params.yaml"))
    for name, path, md5 in CODE_DEPS:
        assert hashlib.md5(file_at(made_from, path)).hexdigest() == md5, f"{made_from[:7]}: {name}: {path}"
    for name, key, value in _locked_params():
        assert _param(params, key) == value, f"{made_from[:7]}: {name}: params {key}"
    for name, stage in LOCK["stages"].items():
        for out in stage.get("outs", []):
            if out["path"].startswith(("metrics/", "plots/", "timing/", "dvclive/")):
                assert _md5_as_dvc_hashes(REPO / out["path"]) == out["md5"], out["path"]


def _md5_as_dvc_hashes(path: Path) -> str:
    """A file's md5, or a folder's as DVC writes it in dvc.lock: the md5 of its sorted file list, plus '.dir'."""
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    entries = [{"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()}
               for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


@pytest.mark.slow
def test_a_fresh_clone_shows_the_records_metrics_without_an_error(tmp_path):
    """Every metric and plot the record's lock declares is a git file (dvclive/ too), so `dvc metrics show` and
    `dvc exp show` on a fresh clone load them all."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for command in (["dvc", "metrics", "show"], ["dvc", "exp", "show", "--csv"]):
        shown = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and "failed to load" not in shown.stdout + shown.stderr, shown.stderr
        assert "0.9385" in shown.stdout, shown.stdout  # the record's test accuracy, from dvclive/ and metrics/


def test_the_record_and_the_readme_name_the_same_commit():
    readme = (REPO / "README.md").read_text()
    assert RECORD["made_from_commit"][:7] in readme
    assert file_at(RECORD["committed_in"], "dvc.lock") == (REPO / "dvc.lock").read_bytes()


def test_no_plain_uncached_out_switches_the_run_cache_off():
    # DVC skips saving a stage to its run-cache when an `outs:` entry has cache: false (metrics/plots may).
    for name, stage in STAGES.items():
        for out in stage.get("outs", []):
            assert isinstance(out, str) or next(iter(out.values())).get("cache", True), name


def test_timing_is_a_plot_and_the_live_files_are_declared():
    """timing/train.json is kept out of `dvc metrics diff` and `dvc exp show` by being a plot (wall time per epoch),
    uncached like the metrics: a git file of every experiment, and the stage keeps its run-cache. The train stage's
    live files (cifar_resnet.live) are an uncached metric (for `dvc exp show`) and an uncached plot folder."""
    metrics = {next(iter(o)) for s in STAGES.values() for o in s.get("metrics", [])}
    assert str(paths.TRAIN_TIMING) not in metrics
    train = STAGES["train"]
    plots = {next(iter(o)): next(iter(o.values())) for o in train["plots"]}
    timing = plots[str(paths.TRAIN_TIMING)]
    assert (timing["cache"], timing["x"], timing["y"]) == (False, "epoch", "seconds")
    assert str(paths.LIVE_METRICS) in {next(iter(o)) for o in train["metrics"]}
    assert plots[str(paths.LIVE_PLOTS)]["x"] == "step" and plots[str(paths.LIVE_PLOTS)]["cache"] is False


def test_the_readme_says_when_mains_code_is_ahead_of_the_record():
    """While a file or param the record's stages read differs between HEAD and the record's commit, the README's
    Results say so in one line naming that commit."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    ahead = any(not (REPO / path).exists() or hashlib.md5((REPO / path).read_bytes()).hexdigest() != md5
                for _, path, md5 in CODE_DEPS) or any(_param(params, key) != value for _, key, value in _locked_params())
    line = f"**main's code is ahead of the record**, which ran the code of commit {RECORD['made_from_commit'][:7]}"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert (line in readme) == ahead
