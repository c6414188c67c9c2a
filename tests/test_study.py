"""The seed-study command: its statistics, its files, its reading of runs, and (slow, real data) the whole command
through DVC in a fresh git copy of the repo on the tiny configuration: two seeds, resume, one more seed, refusals.
The committed studies under studies/ are checked against a recomputation of their summaries."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from dvc.utils.hydra import apply_overrides

from conftest import RECORD, REPO, Repo, copy_repo, file_at, stage_env, tiny_set
from cifar_resnet import atomic
from cifar_resnet.lab import dvc_graph, dvc_runs, seed_study, stats, study_files, validation_only
from cifar_resnet.lab.dvc_graph import StaleRun
from cifar_resnet.lab.dvc_runs import Config
from cifar_resnet.lab.params import flatten
from cifar_resnet.lab.study_files import StudyError

# Student's t, 0.975 quantile, from the usual tables.
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281, 19: 2.0930, 29: 2.0452,
           30: 2.0423, 49: 2.0096, 60: 2.0003, 120: 1.9799}


def row(seed, acc, **extra):
    return {"seed": seed, "test_accuracy": acc, "val_accuracy": None, "lr_max": 0.4, "train_seconds": 60.0,
            "device": "cpu", "hardware": "Some CPU", "code_hash": "0123456789abcdef", "source": "test", **extra}


# ---------------------------------------------------------------------------------------------- statistics


def test_seeds_parse_as_ranges_and_lists():
    assert seed_study.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert seed_study.parse_seeds("7, 0,3-4,3") == [0, 3, 4, 7]
    for bad in ("", "a", "4-2", "-1", "1-"):
        with pytest.raises(StudyError, match="--seeds"):
            seed_study.parse_seeds(bad)


@pytest.mark.parametrize("df,expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert stats.t95(df) == pytest.approx(expected, abs=6e-5)


def test_summary_of_four_seeds():
    s = study_files.summarise([row(i, a) for i, a in enumerate([0.93, 0.96, 0.94, 0.95])])
    acc = s["test_accuracy"]
    std = math.sqrt(0.0005 / 3)
    half = 3.182446305 * std / 2
    assert s["n"] == 4 and s["seeds"] == [0, 1, 2, 3] and s["hardware"] == ["Some CPU"]
    assert acc["n"] == 4 and acc["median"] == 0.945 and acc["mean"] == 0.945 and acc["min"] == 0.93
    assert acc["max"] == 0.96 and acc["std"] == pytest.approx(std, abs=1e-6)
    assert acc["ci95_low"] == pytest.approx(0.945 - half, abs=1e-6)
    assert acc["ci95_high"] == pytest.approx(0.945 + half, abs=1e-6)
    assert "val_accuracy" not in s  # no seed had a validation split
    assert s["lr_max"]["std"] == 0.0 and s["train_seconds"]["mean"] == 60.0


def test_one_seed_has_no_spread_and_validation_accuracy_is_summarised_when_present():
    s = study_files.summarise([row(0, 0.94, val_accuracy=0.92)])
    assert s["test_accuracy"]["std"] is None and s["test_accuracy"]["ci95_low"] is None
    assert s["val_accuracy"]["mean"] == 0.92


def test_study_files_round_trip(tmp_path):
    config = Config({"train.epochs": 2, "model.channels": [8, 16]}, {"src/a.py": "0" * 32})
    rows = pd.DataFrame([row(1, 0.5, code_hash=config.code_hash), row(0, 0.25, val_accuracy=0.125,
                                                                        code_hash="1e55555555555555")],
                        columns=study_files.COLUMNS)
    folder = tmp_path / "s"
    study_files.write_study(folder, "s", config, rows)
    back = study_files.read_rows(folder / "runs.csv")
    assert list(back.columns) == study_files.COLUMNS and list(back["seed"]) == [0, 1]
    assert back["code_hash"][0] == "1e55555555555555" and math.isnan(back["val_accuracy"][1])
    assert json.loads((folder / "summary.json").read_text()) == study_files.summarise(back)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["params"] == {"train": {"epochs": 2}, "model": {"channels": [8, 16]}}
    assert saved["code_hash"] == config.code_hash
    png = (folder / "seeds.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    study_files.write_study(folder, "s", config, back)
    assert (folder / "seeds.png").read_bytes() == png  # same rows, same bytes


def test_another_configuration_is_refused_naming_the_difference():
    ours = Config({"seedless": 1, "model.channels": [8, 16]}, {"src/a.py": "a", "src/b.py": "b"})
    study_files.refuse_other(ours, Config(dict(ours.params), dict(ours.code)), "study s")  # the same: no error
    with pytest.raises(StudyError, match=r"study s has model\.channels=\[8, 16\] but this command has "
                                         r"model\.channels=\[4, 8\]"):
        study_files.refuse_other(ours, Config({"seedless": 1, "model.channels": [4, 8]}, ours.code), "study s")
    with pytest.raises(StudyError, match=r"study s was run on other code than this command: src/b\.py differs"):
        study_files.refuse_other(ours, Config(ours.params, {"src/a.py": "a", "src/b.py": "c"}), "study s")


# ---------------------------------------------------------------------------------------------- reading a run


def fake_run(seed=0, accuracy=0.9, evaluate=None) -> dict[str, bytes]:
    """The files of a finished run with a dvc.lock that records them: download -> train -> evaluate. `evaluate`:
    metrics/evaluate.json's keys (default: the test split's `accuracy`)."""
    evaluate = {"accuracy": accuracy} if evaluate is None else evaluate
    files = {"params.yaml": yaml.safe_dump({"seed": seed, "train": {"epochs": 2}}).encode(),
             "src/train.py": b"code", "metrics/evaluate.json": json.dumps(evaluate).encode(),
             "metrics/train.json": json.dumps({"lr_max": 0.3, "val_acc": 0.8, "new_key": 1}).encode(),
             "timing/train.json": json.dumps({"seconds_total": 12.5, "device": "cuda", "gpu": "Some GPU"}).encode()}
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}

    def entry(path):
        return {"path": path, "hash": "md5", "md5": md5.get(path, "d" * 32 + ".dir")}
    lock = {"schema": "2.0", "stages": {
        "download": {"deps": [], "outs": [entry("data")]},
        "train": {"deps": [entry("data"), entry("src/train.py")], "params": {"params.yaml": {
                  "seed": seed, "train": {"epochs": 2}}}, "outs": [entry("metrics/train.json"),
                                                                    entry("timing/train.json"), entry("model")]},
        "evaluate": {"deps": [{"path": "model", "md5": md5.get("model", "d" * 32 + ".dir")}],
                     "outs": [entry("metrics/evaluate.json")]},
        "gallery": {"deps": [entry("src/gallery.py")], "params": {"params.yaml": {"gallery.columns": 99}},
                    "outs": []}}}
    files["dvc.lock"] = yaml.safe_dump(lock).encode()
    return files


def test_a_run_makes_a_row_with_its_code_hash():
    run = dvc_runs.read_run(fake_run(seed=3).get, "fake", seed_study.make_row)
    assert run.code == {"src/train.py": hashlib.md5(b"code").hexdigest()}  # not data, not the gallery's code
    assert run.params == {"seed": 3, "train.epochs": 2}
    assert run.row == {"seed": 3, "test_accuracy": 0.9, "val_accuracy": 0.8, "lr_max": 0.3, "train_seconds": 12.5,
                       "device": "cuda", "hardware": "Some GPU", "code_hash": dvc_graph.code_hash(run.code),
                       "source": "fake"}


def test_a_validation_run_makes_a_row_and_a_study_without_test_numbers(tmp_path):
    """A configuration chosen on validation (data.val_size > 0): evaluate reports `val_accuracy` and no `accuracy`;
    the row has the validation accuracy and no test accuracy, and the study's files are made from those."""
    runs = [dvc_runs.read_run(fake_run(seed, evaluate={"val_accuracy": acc, "val_loss": 0.4, "split": "val"}).get,
                              f"fake {seed}", seed_study.make_row) for seed, acc in ((0, 0.85), (1, 0.87))]
    assert runs[0].row["val_accuracy"] == 0.85 and runs[0].row["test_accuracy"] is None
    config = seed_study.as_config(runs[0])
    rows = pd.DataFrame([r.row for r in runs], columns=study_files.COLUMNS)
    study_files.write_study(tmp_path / "v", "v", config, rows)
    summary = json.loads((tmp_path / "v/summary.json").read_text())
    assert "test_accuracy" not in summary and summary["val_accuracy"]["median"] == 0.86
    assert summary == study_files.summarise(study_files.read_rows(tmp_path / "v/runs.csv"))
    assert (tmp_path / "v/seeds.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_without_an_accuracy_is_stale():
    with pytest.raises(StaleRun, match=r"fake: its metrics lack accuracy or val_accuracy in metrics/evaluate\.json"):
        dvc_runs.read_run(fake_run(evaluate={"loss": 0.3}).get, "fake", seed_study.make_row)
    with pytest.raises(StaleRun, match="fake: a metric that is not a number"):
        dvc_runs.read_run(fake_run(evaluate={"accuracy": "high"}).get, "fake", seed_study.make_row)


def test_any_error_ends_in_one_line(monkeypatch, capsys):
    def broken(*_args, **_kwargs):
        return {}["accuracy"]

    monkeypatch.setattr(seed_study, "run_study", broken)
    assert seed_study.main(["s", "--seeds", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected KeyError: 'accuracy' (at test_study.py:") and err.count("\n") == 1, err


def _with_dep(stage: str, path: str, md5: str) -> dict[str, bytes]:
    """fake_run's files with one more dep of `stage` in dvc.lock."""
    files = fake_run()
    lock = yaml.safe_load(files["dvc.lock"])
    lock["stages"][stage]["deps"].append({"path": path, "hash": "md5", "md5": md5})
    files["dvc.lock"] = yaml.safe_dump(lock).encode()
    return files


def test_a_stale_gallery_entry_is_not_the_runs_code():
    """`dvc exp run ... train evaluate` leaves the gallery's lock entry as it was: an older version of a file the
    train stage also reads must not become the run's code (it made the study refuse every experiment)."""
    files = _with_dep("gallery", "src/train.py", "0" * 32)
    run = dvc_runs.read_run(files.get, "fake", seed_study.make_row)
    assert run.code == {"src/train.py": hashlib.md5(b"code").hexdigest()}


def test_row_stages_that_record_two_versions_of_a_file_are_stale():
    files = _with_dep("evaluate", "src/train.py", "0" * 32)
    with pytest.raises(StaleRun, match=r"two versions of src/train\.py"):
        dvc_runs.read_run(files.get, "fake", seed_study.make_row)


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.update({"metrics/evaluate.json": b'{"accuracy": 1.0}'}), "metrics/evaluate.json is not the file"),
    (lambda f: f.pop("timing/train.json"), "timing/train.json is not the file"),
    (lambda f: f.update({"params.yaml": b"seed: 0\ntrain: {epochs: 3}\n"}), "train.epochs=2, params.yaml has 3"),
])
def test_a_run_whose_files_are_not_its_locks_is_stale(damage, message):
    files = fake_run()
    damage(files)
    with pytest.raises(StaleRun, match=message.replace(".", r"\.").replace("{", r"\{")):
        dvc_runs.read_run(files.get, "fake", seed_study.make_row)


def test_help_says_how_and_runs_nothing():
    result = subprocess.run([sys.executable, "-m", "cifar_resnet.lab.seed_study", "--help"], capture_output=True, text=True,
                            env=stage_env(), timeout=60)
    assert result.returncode == 0 and "--seeds" in result.stdout and "dvc exp run --temp" in result.stdout


# ---------------------------------------------------------------------------------------------- committed studies


# studies/ also holds the tricks' ablation (its own table), the GPU check's output and the LR sweep (a grid study).
NOT_SEED_STUDIES = {"ablation", "gpu_check", "lr-sweep"}
COMMITTED = sorted(p for p in (REPO / "studies").glob("*/runs.csv") if p.parent.name not in NOT_SEED_STUDIES)


def test_committed_studies_summaries_are_their_rows_summaries():
    """Every committed study (none is no failure): its summary recomputed from runs.csv, its rows of one code."""
    for runs in COMMITTED:
        folder = runs.parent
        rows = study_files.read_rows(runs)
        assert json.loads((folder / "summary.json").read_text()) == study_files.summarise(rows), folder.name
        assert list(rows["seed"]) == sorted(set(rows["seed"])), f"{folder.name}: one row per seed, sorted"
        config = json.loads((folder / "config.json").read_text())
        assert set(rows["code_hash"]) == {config["code_hash"]} == {dvc_graph.code_hash(config["code"])}, folder.name
        assert "seed" not in config["params"] and (folder / "seeds.png").is_file(), folder.name


def _make_n(*args) -> str:
    result = subprocess.run(["make", "-n", "-o", ".venv/.installed", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_tricks_study_is_the_makefiles_tricks_set(tmp_path):
    """The set is written once (the Makefile's TRICKS): `make tricks` and `make tricks-study` pass the same overrides,
    and the committed studies/tricks/ is params.yaml with them applied."""
    experiment = re.findall(r"-S '([^']*)'", _make_n("tricks"))
    study_command = _make_n("tricks-study", "SEEDS=0-4")
    assert "python -m cifar_resnet.lab.seed_study 'tricks' --seeds '0-4'" in study_command
    assert re.findall(r"--set '([^']*)'", study_command) == experiment
    assert "evaluate.tta=flip+translate" in experiment
    config = json.loads((REPO / "studies/tricks/config.json").read_text())
    params = tmp_path / "params.yaml"
    params.write_bytes(_params_the_study_ran(config))
    apply_overrides(params, experiment)  # DVC's own `-S`, as `make tricks` applies them
    wanted = {k: v for k, v in flatten(yaml.safe_load(params.read_text())).items() if k != "seed"}
    assert flatten(config["params"]) == wanted


def _params_the_study_ran(config: dict) -> bytes:
    """params.yaml of the code the study ran: the record's commit (metrics/record.json), which the studies share.
    main's code may be ahead of both until the evidence is remade on it."""
    made_from = RECORD["made_from_commit"]
    for path, md5 in config["code"].items():
        assert hashlib.md5(file_at(made_from, path)).hexdigest() == md5, f"the study ran another {path} than {made_from[:7]}'s"
    return file_at(made_from, "params.yaml")


def test_every_study_folder_has_rows():
    folders = [p for p in (REPO / "studies").glob("*") if p.is_dir() and p.name not in NOT_SEED_STUDIES]
    assert {p / "runs.csv" for p in folders} == set(COMMITTED)


# ---------------------------------------------------------------------------------------------- end to end


# The tiny configuration: the study's logic needs no more, and every seed runs the range test again (it depends on
# the seed).
TINY = tiny_set()


class StudyRepo(Repo):
    def study(self, *args, check=True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "cifar_resnet.lab.seed_study", "tiny", *args, check=check)

    def experiments(self) -> set[str]:
        return set(self.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split())

    def rows(self) -> pd.DataFrame:
        return study_files.read_rows(self.path / "studies/tiny/runs.csv")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    """The repo's files in a new git repository, with the tiny configuration run and committed (seed 0)."""
    root = tmp_path_factory.mktemp("study")
    env = stage_env(root / "cache", CIFAR10_MIRROR=str(mirror), PYTHONPATH=str(root / "repo" / "src"))
    r = copy_repo(root / "repo", env, StudyRepo)
    env = r.env
    r.run("dvc", "exp", "run", *[a for s in TINY for a in ("-S", s)])
    r.run("git", "add", "-A")
    r.run("git", "commit", "-qm", "tiny record")
    r.env = {k: v for k, v in env.items() if k != "CIFAR10_MIRROR"}  # no later run may fetch the data
    return r


@pytest.mark.slow
def test_two_seeds_take_seed_0_from_the_record_and_run_seed_1(repo):
    before = repo.experiments()
    result = repo.study("--seeds", "0-1")
    out = result.stdout
    assert "seed 0: test accuracy" in out and "from workspace at" in out, out
    assert "seed 0: running" not in out and "seed 1: running dvc exp run --temp -n tiny-seed1" in out, out
    assert "Running stage 'train'" in out and "Running stage 'gallery'" not in out, out  # only what makes a row
    assert len(repo.experiments() - before) == 1
    rows = repo.rows()
    assert list(rows["seed"]) == [0, 1]
    record = json.loads((repo.path / "metrics/evaluate.json").read_text())
    assert rows["test_accuracy"][0] == record["accuracy"]
    assert rows["lr_max"][0] == json.loads((repo.path / "metrics/train.json").read_text())["lr_max"]
    assert rows["source"][1] == "experiment tiny-seed1" and rows["source"][0].startswith("workspace at ")
    for _, r in rows.iterrows():
        assert 0 <= r["test_accuracy"] <= 1 and r["lr_max"] > 0 and r["train_seconds"] > 0
        assert r["device"] == "cpu" and r["hardware"] and math.isnan(r["val_accuracy"])
    folder = repo.path / "studies/tiny"
    assert json.loads((folder / "summary.json").read_text()) == study_files.summarise(rows)
    config = json.loads((folder / "config.json").read_text())
    params = yaml.safe_load((repo.path / "params.yaml").read_text())
    params.pop("seed")
    assert config["params"] == params and set(rows["code_hash"]) == {config["code_hash"]}
    assert "src/cifar_resnet/train.py" in config["code"] and "stages/evaluate.py" in config["code"]
    assert (folder / "seeds.png").read_bytes().startswith(b"\x89PNG")
    status = repo.run("git", "status", "--porcelain").stdout
    assert status == "?? studies/\n", status  # the workspace is as it was


@pytest.mark.slow
def test_a_rerun_runs_no_seed_again(repo):
    before, files = repo.experiments(), _study_bytes(repo)
    result = repo.study("--seeds", "0-1")
    assert "seed(s) 0, 1 already done, not run again" in result.stdout, result.stdout
    assert "running" not in result.stdout and "Running stage" not in result.stdout
    assert repo.experiments() == before and _study_bytes(repo) == files


@pytest.mark.slow
def test_one_more_seed_runs_only_that_seed(repo):
    old = repo.rows()
    result = repo.study("--seeds", "0-2")
    out = result.stdout
    assert "seed(s) 0, 1 already done" in out and "seed 2: running" in out, out
    assert "seed 0: running" not in out and "seed 1: running" not in out
    rows = repo.rows()
    assert list(rows["seed"]) == [0, 1, 2]
    pd.testing.assert_frame_equal(rows.iloc[:2], old)
    assert json.loads((repo.path / "studies/tiny/summary.json").read_text()) == study_files.summarise(rows)


@pytest.mark.slow
def test_a_finished_experiment_whose_row_was_lost_is_not_run_again(repo):
    full = repo.rows()
    with atomic.atomic_path(repo.path / "studies/tiny/runs.csv") as tmp:
        full[full["seed"] != 2].to_csv(tmp, index=False)  # as if the study stopped between the run and its row
    before = repo.experiments()
    result = repo.study("--seeds", "0-2")
    assert "(from experiment tiny-seed2, already run)" in result.stdout and "running" not in result.stdout, \
        result.stdout
    assert repo.experiments() == before
    pd.testing.assert_frame_equal(repo.rows(), full)


@pytest.mark.slow
def test_other_params_are_refused_naming_the_param(repo):
    before, files = repo.experiments(), _study_bytes(repo)
    result = repo.study("--seeds", "0-3", "--set", "model.channels=[16,32,64,128]", check=False)
    assert result.returncode == 1
    expected = ("error: study tiny has model.channels=[8, 16, 32, 64] but this command has "
                "model.channels=[16, 32, 64, 128]: a study holds one configuration")
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and repo.experiments() == before and _study_bytes(repo) == files


@pytest.mark.slow
def test_other_code_is_refused_naming_the_file(repo):
    module = repo.path / "src/cifar_resnet/evaluate.py"
    original = module.read_text()
    module.write_text(original + "\n# changed\n")
    try:
        result = repo.study("--seeds", "0-3", check=False)
    finally:
        module.write_text(original)
    assert result.returncode == 1
    expected = "error: study tiny was run on other code than this command: src/cifar_resnet/evaluate.py differs"
    assert expected in result.stderr, result.stderr


def _study_bytes(repo) -> dict:
    return {p.name: p.read_bytes() for p in sorted((repo.path / "studies/tiny").iterdir())}


@pytest.mark.slow
def test_a_study_chosen_on_validation_has_validation_rows_and_reruns(repo):
    """data.val_size > 0: the evaluate stage reports the validation split, so each row holds that accuracy and no
    test accuracy; the summary is of those; the same command again runs nothing."""
    command = (sys.executable, "-m", "cifar_resnet.lab.seed_study", "tiny-val", "--seeds", "0-1", "--set", "data.val_size=256")
    out = repo.run(*command).stdout
    assert "seed 0: validation accuracy" in out and "seed 1: validation accuracy" in out, out
    rows = study_files.read_rows(repo.path / "studies/tiny-val/runs.csv")
    assert list(rows["seed"]) == [0, 1] and rows["test_accuracy"].isna().all()
    baseline = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    for seed, accuracy in zip(rows["seed"], rows["val_accuracy"]):
        ref = dvc_runs.exp_ref(baseline, f"tiny-val-seed{seed}")
        evaluate = json.loads(repo.run("git", "show", f"{ref}:metrics/evaluate.json").stdout)
        assert evaluate["split"] == "val" and evaluate["val_accuracy"] == accuracy
        files = repo.run("git", "ls-tree", "-r", "--name-only", ref, "--", "metrics", "plots", "dvclive").stdout.split()
        assert "plots/history.tsv" in files and "metrics/train.json" in files
        assert validation_only.test_numbers(_reader(repo, ref), files) == []  # none computed while choosing
    summary = json.loads((repo.path / "studies/tiny-val/summary.json").read_text())
    assert summary == study_files.summarise(rows) and "test_accuracy" not in summary and summary["val_accuracy"]["n"] == 2
    again = repo.run(*command).stdout
    assert "seed(s) 0, 1 already done" in again and "running" not in again, again


def _reader(repo, ref: str):
    """dvc_runs.git_reader for a repo other than the current folder's."""
    def read(rel: str) -> bytes | None:
        shown = subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=repo.path, env=repo.env, capture_output=True)
        return shown.stdout if shown.returncode == 0 else None
    return read
