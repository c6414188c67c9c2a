"""The ablation command: its rows, refusals and table (fast), and (slow, real data) one whole row through DVC in a
fresh git copy of the repo on the tiny configuration: one training run, three evaluations, no test number."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, Repo, copy_repo, stage_env, tiny_set
from cifar_resnet.lab import ablation, ablation_table, validation_only
from cifar_resnet.lab.ablation_table import AblationError


CODE = "1e55555555555555"


def row(name, sets="", seed=0, acc=0.9, **extra):
    return {"row": name, "set": sets, "seed": seed, "val_size": 5000, "val_accuracy_none": acc,
            "val_accuracy_flip": acc + 0.004, "val_accuracy_flip_translate": acc + 0.006, "lr_max": 0.4,
            "train_seconds": 3612.5, "device": "cpu", "hardware": "Some CPU", "runner": "dvc exp run",
            "code_hash": "1e55555555555555",
            "commit": "a" * 40, **extra}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------- params of a row


def test_sets_round_trip_through_one_string():
    sets = ["train.label_smoothing=0.2", "model.channels=[8, 16, 32, 64]", "augment.flip=alternate"]
    text = ablation_table.join_sets(sets)
    assert text == "train.label_smoothing=0.2 'model.channels=[8, 16, 32, 64]' augment.flip=alternate"
    assert ablation_table.parse_sets(text) == sets and ablation_table.parse_sets("") == []


def test_sets_are_cumulative_and_a_later_value_wins():
    earlier = ["train.label_smoothing=0.2", "train.ema_decay=0.99"]
    assert ablation.cumulative_sets(earlier, ["train.frozen_bn_scales=true"]) == [*earlier,
                                                                                   "train.frozen_bn_scales=true"]
    assert ablation.cumulative_sets(earlier, ["train.label_smoothing=0.1"]) == ["train.label_smoothing=0.1",
                                                                                "train.ema_decay=0.99"]


@pytest.mark.parametrize("override,message", [
    ("seed=1", "seed is the command's own (--seed)"), ("data.val_size=10", "(--val-size)"),
    ("evaluate.split=test", "evaluate.split is the command's own"), ("evaluate.tta=flip", "all three"),
    ("train.eval_split=auto", "(always val)"), ("train.device=cuda", "(--device)"), ("lr_max", "expected KEY=VALUE")])
def test_keys_the_command_sets_are_refused(override, message):
    with pytest.raises(AblationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ablation.check_sets([override])


def test_every_evaluation_is_of_the_validation_split_with_its_tta():
    overrides = ablation.row_overrides(["train.ema_decay=0.99"], 3, 5000, "cuda", "flip+translate")
    assert overrides == ["train.ema_decay=0.99", "seed=3", "data.val_size=5000", "train.eval_split=val",
                         "evaluate.split=val", "train.device=cuda", "evaluate.tta=flip+translate"]
    assert ablation.row_overrides([], 0, 5000, None, "none")[-2:] == ["evaluate.split=val", "evaluate.tta=none"]


def test_experiment_names_cannot_collide_across_rows():
    assert [ablation.experiment_name("ema", t) for t in ablation.TTAS] == [
        "ablation-ema", "ablation-ema--flip", "ablation-ema--flip-translate"]
    for bad in ("ema--flip", "ema-", "-ema", "a b", ""):
        with pytest.raises(AblationError, match="row name"):
            ablation.run_row(bad, [])


def test_the_overrides_are_valid_params(monkeypatch):
    """What the command gives DVC passes the params gate with the repo's params.yaml."""
    from cifar_resnet.lab.params import wanted_params

    monkeypatch.chdir(REPO)
    for tta in ablation.TTAS:
        params = wanted_params(ablation.row_overrides(["train.label_smoothing=0.2"], 0, 5000, None, tta))
        assert params["evaluate.tta"] == tta and params["evaluate.split"] == "val" and params["data.val_size"] == 5000
        assert params["train.eval_split"] == "val" and params["train.label_smoothing"] == 0.2


# ---------------------------------------------------------------------------------------------- rows and table


def test_an_existing_row_name_or_configuration_is_refused():
    rows = pd.DataFrame([row("baseline"), row("ls", "train.label_smoothing=0.2")], columns=ablation_table.COLUMNS)
    with pytest.raises(AblationError, match=r"row baseline is already in studies/ablation/runs\.csv \(seed 0\)"):
        ablation_table.refuse_existing(rows, "baseline", ["train.ema_decay=0.99"], 1, 5000, CODE)
    with pytest.raises(AblationError, match="row ls in .* already has this set, seed 0 and val_size 5000 on this"):
        ablation_table.refuse_existing(rows, "ls-again", ["train.label_smoothing=0.2"], 0, 5000, CODE)
    ablation_table.refuse_existing(rows, "ls-seed1", ["train.label_smoothing=0.2"], 1, 5000, CODE)  # another seed
    ablation_table.refuse_existing(rows, "ls-val", ["train.label_smoothing=0.2"], 0, 1000, CODE)
    ablation_table.refuse_existing(rows, "ls-fixed", ["train.label_smoothing=0.2"], 0, 5000, "2" * 16)  # other code


def test_the_table_names_the_gpus_of_rows_written_with_a_list():
    assert ablation_table.hardware_name("['NVIDIA H200']") == "NVIDIA H200"
    assert ablation_table.hardware_name("['NVIDIA H100', 'NVIDIA H100']") == "NVIDIA H100, NVIDIA H100"
    assert ablation_table.hardware_name("AMD EPYC") == "AMD EPYC"
    from cifar_resnet.lab.dvc_runs import hardware_of

    assert hardware_of({"device": "cuda", "gpu": ["NVIDIA H200", "NVIDIA H200"]}) == "NVIDIA H200, NVIDIA H200"
    assert hardware_of({"device": "cpu", "cpu": "AMD EPYC", "gpu": None}) == "AMD EPYC"


def test_rows_and_table_round_trip(in_tmp):
    rows = pd.DataFrame([row("baseline"), row("ls|x", "train.label_smoothing=0.2", train_seconds=61.0)],
                        columns=ablation_table.COLUMNS)
    ablation_table.write_rows(rows)
    back = ablation_table.read_rows()
    assert list(back.columns) == ablation_table.COLUMNS and list(back["row"]) == ["baseline", "ls|x"]
    assert back["set"][0] == "" and back["code_hash"][0] == "1e55555555555555"  # text stays text
    assert back["val_accuracy_flip"][0] == 0.904 and back["commit"][0] == "a" * 40
    table = (in_tmp / "studies/ablation/table.md").read_text()
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "row", "cumulative set", "seed", "val images", "val acc, no TTA", "flip TTA", "flip+translate TTA",
        "LRMAX", "train wall time", "hardware", "run by"]
    body = [line for line in lines if line.startswith("| ") and line is not header]
    assert len(body) == 2
    assert "| baseline " in body[0] and "(params.yaml)" in body[0] and "90.00 %" in body[0]
    assert "90.40 %" in body[0] and "90.60 %" in body[0] and "3612 s (60.2 min)" in body[0]
    assert "ls\\|x" in body[1] and "`train.label_smoothing=0.2`" in body[1] and "| 61 s " in body[1]
    assert all(line.rstrip().endswith("| dvc exp run |") for line in body)
    assert "no test accuracy was computed" in table
    ablation_table.write_rows(back)
    assert (in_tmp / "studies/ablation/table.md").read_text() == table  # the same rows, the same bytes


# ---------------------------------------------------------------------------------------------- reading a run


def fake_experiment(evaluate=None, train=None, history="epoch\ttrain_loss\tval_acc\n1\t2.0\t0.5\n",
                    timing_seconds=12.5) -> dict[str, bytes]:
    files = {"metrics/evaluate.json": json.dumps(evaluate or {"val_accuracy": 0.81, "split": "val",
                                                              "tta": "flip"}).encode(),
             "metrics/train.json": json.dumps(train or {"lr_max": 0.3, "val_acc": 0.8}).encode(),
             "timing/train.json": json.dumps({"seconds_total": timing_seconds, "device": "cuda",
                                              "gpu": "Some GPU"}).encode(),
             "plots/history.tsv": history.encode()}
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}
    files["dvc.lock"] = yaml.safe_dump({"stages": {"train": {"outs": [
        {"path": p, "md5": md5[p]} for p in ("metrics/train.json", "timing/train.json")]}}}).encode()
    return files


def test_an_experiment_gives_its_validation_numbers():
    numbers = ablation.make_numbers(fake_experiment().get, 0, {"src/a.py": "0" * 32}, "fake")
    assert numbers["val_accuracy"] == 0.81 and numbers["tta"] == "flip" and numbers["lr_max"] == 0.3
    assert numbers["train_seconds"] == 12.5 and numbers["hardware"] == "Some GPU" and numbers["device"] == "cuda"
    assert set(numbers["train_outs"]) == {"metrics/train.json", "timing/train.json"}


@pytest.mark.parametrize("files,message", [
    (fake_experiment(evaluate={"accuracy": 0.9, "loss": 0.3}), r"holds test numbers \(accuracy, loss\)"),
    (fake_experiment(train={"lr_max": 0.3, "test_acc": 0.9}), r"holds test numbers \(test_acc\)"),
    (fake_experiment(history="epoch\ttest_acc\n1\t0.5\n"), r"holds test numbers \(test_acc\)"),
    (fake_experiment(evaluate={"val_accuracy": 0.8}), "no validation accuracy"),
])
def test_a_test_number_is_refused(files, message):
    with pytest.raises(AblationError, match=message):
        ablation.make_numbers(files.get, 0, {}, "fake")


def test_test_numbers_are_found_in_any_output_file():
    files = {"metrics/evaluate.json": b'{"val_accuracy": 0.8, "per_class_accuracy": {"cat": 0.5}, "split": "val"}',
             "dvclive/metrics.json": b'{"step": 2, "val_acc": 0.8, "train_loss": 1.0}',
             "plots/history.tsv": b"epoch\tval_acc\n1\t0.5\n", "plots/confusion.csv": b"actual,predicted\ncat,dog\n",
             "models/summary.txt": b"test_acc is not looked for in text"}
    assert validation_only.test_numbers(files.get, [*files, "missing.json"]) == []
    files.update({"metrics/evaluate.json": b'{"accuracy": 0.9, "loss": 0.3, "val_accuracy": 0.8}',
                  "dvclive/metrics.json": b'{"step": 2, "nested": {"test_acc": 0.5}}',
                  "dvclive/plots/metrics/test_acc.tsv": b"step\ttest_acc\n", "plots/c.csv": b"epoch,test_loss\n"})
    assert validation_only.test_numbers(files.get, sorted(files)) == [
        "dvclive/metrics.json: nested.test_acc", "dvclive/plots/metrics/test_acc.tsv: its name",
        "metrics/evaluate.json: accuracy", "metrics/evaluate.json: loss", "plots/c.csv: column test_loss"]


def test_the_output_files_of_an_experiment_are_its_stages_git_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lock = {"stages": {"train": {"outs": [{"path": "models/model.pt"}, {"path": "dvclive/plots/metrics"},
                                          {"path": "metrics/train.json"}]},
                       "evaluate": {"outs": [{"path": "metrics/evaluate.json"}]},
                       "gallery": {"outs": [{"path": "plots/gallery.png"}]}}}
    for rel, text in {"dvc.lock": yaml.safe_dump(lock), "dvclive/plots/metrics/val_acc.tsv": "step\tval_acc\n",
                      "dvclive/plots/metrics/lr.tsv": "step\tlr\n", "metrics/train.json": "{}",
                      "metrics/evaluate.json": "{}", "plots/gallery.png": "png", "other.txt": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *args], check=True, env={**os.environ, **env})
    assert validation_only.row_output_files("HEAD") == ["dvclive/plots/metrics/lr.tsv", "dvclive/plots/metrics/val_acc.tsv",
                                                 "metrics/evaluate.json", "metrics/train.json"]
    validation_only.refuse_test_numbers("HEAD", "x")
    (tmp_path / "metrics/evaluate.json").write_text('{"accuracy": 0.9}')
    subprocess.run(["git", "commit", "-qam", "y"], check=True, env={**os.environ, **env})
    with pytest.raises(AblationError, match=r"experiment x holds test numbers \(metrics/evaluate\.json: accuracy\)"):
        validation_only.refuse_test_numbers("HEAD", "x")


def test_evaluations_of_two_training_runs_are_refused():
    numbers = {tta: ablation.make_numbers(fake_experiment(evaluate={"val_accuracy": 0.8, "split": "val",
                                                                    **({"tta": tta} if tta != "none" else {})}).get,
                                          0, {}, "fake") for tta in ablation.TTAS}
    ablation.check_trained_once(numbers, "r")
    numbers["flip"] = ablation.make_numbers(fake_experiment(timing_seconds=13.0).get, 0, {}, "fake")
    with pytest.raises(AblationError, match=r"evaluate\.tta=flip \(ablation-r--flip\) was not of the same training "
                                            r"run \(timing/train\.json differ\)"):
        ablation.check_trained_once(numbers, "r")


# ---------------------------------------------------------------------------------------------- command line


def test_an_existing_row_is_refused_in_one_line_before_any_run(in_tmp, capsys):
    for name in ("dvc.yaml", "params.yaml"):
        (in_tmp / name).write_text((REPO / name).read_text())
    ablation_table.write_rows(pd.DataFrame([row("baseline")], columns=ablation_table.COLUMNS))
    assert ablation.main(["baseline"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: row baseline is already in studies/ablation/runs.csv") and err.count("\n") == 1
    assert ablation.main(["more", "--on", "nothing"]) == 1
    assert "--on nothing: no such row" in capsys.readouterr().err


def test_an_unexpected_error_ends_in_one_line(monkeypatch, capsys):
    def broken(*_args, **_kwargs):
        return {}["stages"]  # as a file no check foresaw would fail

    monkeypatch.setattr(ablation, "run_row", broken)
    assert ablation.main(["baseline"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected KeyError: 'stages' (at test_ablation.py:") and err.count("\n") == 1, err


def test_help_gives_the_plan_and_runs_nothing():
    result = subprocess.run([sys.executable, "-m", "cifar_resnet.lab.ablation", "--help"], capture_output=True,
                            text=True, env=stage_env(), timeout=60, check=False)
    out = result.stdout
    assert result.returncode == 0 and "dvc exp run --temp" in out and "--val-size" in out, out
    plan = ["flip TTA needs no training", "label smoothing", "EMA", "frozen BN scales with the bias rule",
            "multi-view TTA", "alternating flip", "whitening", "CELU, only if still short"]
    where = [out.index(step) for step in plan]
    assert where == sorted(where), out


@pytest.mark.slow
def test_make_ablation_runs_the_command():
    result = subprocess.run(["make", "-n", "-o", ".venv/.installed", "ablation", "ROW=ema", "ON=ls",
                             "SET=train.ema_decay=0.99 train.ema_every=4", "SEED=1", "DEVICE=cuda"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    command = " ".join(result.stdout.replace("\\\n", " ").split())
    assert ("python -m cifar_resnet.lab.ablation 'ema' --set 'train.ema_decay=0.99' --set 'train.ema_every=4' "
            "--on 'ls' --seed '1' --device 'cuda'") in command, result.stdout + result.stderr
    missing = subprocess.run(["make", "-n", "-o", ".venv/.installed", "ablation"], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=False)
    assert missing.returncode != 0 and "ROW is required" in missing.stderr


# ---------------------------------------------------------------------------------------------- end to end


# The tiny configuration with smaller batches (a quicker range test): a row's logic needs no more. The validation
# split comes out of the 50,000 training images before train_limit takes its 1,024.
TINY = tiny_set("train.batch_size=128")


class AblationRepo(Repo):
    def ablation(self, *args, check=True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "cifar_resnet.lab.ablation", *args, check=check)

    def experiments(self) -> dict[str, str]:
        refs = self.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
        return {ref.rsplit("/", 1)[1]: ref for ref in refs}

    def show(self, ref: str, rel: str) -> str:
        return self.run("git", "show", f"{ref}:{rel}").stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("ablation")
    env = stage_env(root / "cache", CIFAR10_MIRROR=str(mirror), PYTHONPATH=str(root / "repo" / "src"))
    return copy_repo(root / "repo", env, AblationRepo)


@pytest.mark.slow
def test_a_row_trains_once_evaluates_three_times_and_sees_no_test_number(repo):
    sets = [a for s in TINY for a in ("--set", s)]
    result = repo.ablation("tiny", *sets, "--val-size", "256", "--device", "cpu")
    out = result.stdout + result.stderr
    assert out.count("Running stage 'train'") == 1, out  # the two TTA evaluations took the model from the run-cache
    assert out.count("Stage 'train' is cached - skipping run") == 2, out
    assert out.count("Running stage 'evaluate'") == 3, out
    assert "Running stage 'gallery'" not in out, out
    exps = repo.experiments()
    assert set(exps) == {"ablation-tiny", "ablation-tiny--flip", "ablation-tiny--flip-translate"}, exps
    locks = {name: yaml.safe_load(repo.show(ref, "dvc.lock"))["stages"] for name, ref in exps.items()}
    assert len({json.dumps(lock["train"], sort_keys=True) for lock in locks.values()}) == 1  # one training run
    for name, ref in exps.items():
        evaluate = json.loads(repo.show(ref, "metrics/evaluate.json"))
        assert "accuracy" not in evaluate and "loss" not in evaluate and evaluate["split"] == "val", name
        assert evaluate["num_images"] == 256, name
        assert not any(k.startswith("test") for k in json.loads(repo.show(ref, "metrics/train.json"))), name
        assert "test_" not in repo.show(ref, "plots/history.tsv").splitlines()[0], name
        assert yaml.safe_load(repo.show(ref, "params.yaml"))["data"]["val_size"] == 256
    for name, ref in exps.items():  # the copy's commit has no outputs: every one in the experiment is from this row
        files = repo.run("git", "ls-tree", "-r", "--name-only", ref, "--", "metrics", "plots", "timing",
                         "dvclive").stdout.split()
        assert "metrics/evaluate.json" in files and "plots/history.tsv" in files, files
        for rel in files:
            if rel.endswith((".json", ".tsv", ".csv")):
                text = repo.show(ref, rel)
                assert "test_" not in text and '"accuracy"' not in text, (name, rel)
    rows = ablation_table.read_rows(repo.path / "studies/ablation/runs.csv")
    assert len(rows) == 1
    r = rows.iloc[0]
    assert r["row"] == "tiny" and ablation_table.parse_sets(r["set"]) == TINY and r["seed"] == 0 and r["val_size"] == 256
    for column in ("val_accuracy_none", "val_accuracy_flip", "val_accuracy_flip_translate"):
        assert 0 <= r[column] <= 1, column
    evaluated = {name: json.loads(repo.show(ref, "metrics/evaluate.json"))["val_accuracy"]
                 for name, ref in exps.items()}
    assert [r["val_accuracy_none"], r["val_accuracy_flip"], r["val_accuracy_flip_translate"]] == [
        evaluated["ablation-tiny"], evaluated["ablation-tiny--flip"], evaluated["ablation-tiny--flip-translate"]]
    head = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    assert r["commit"] == head and r["lr_max"] > 0 and r["train_seconds"] > 0 and r["device"] == "cpu"
    assert r["hardware"] and len(r["code_hash"]) == 16
    table = (repo.path / "studies/ablation/table.md").read_text()
    assert "| tiny " in table and f"{100 * r['val_accuracy_flip']:.2f} %" in table
    status = repo.run("git", "status", "--porcelain").stdout
    assert status == "?? studies/\n", status  # the workspace is as it was: no metrics, no test number in it


@pytest.mark.slow
def test_running_a_row_again_is_refused_and_runs_nothing(repo):
    before = repo.experiments()
    files = {p.name: p.read_bytes() for p in (repo.path / "studies/ablation").iterdir()}
    result = repo.ablation("tiny", "--set", "train.epochs=3", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == "error: row tiny is already in studies/ablation/runs.csv (seed 0): a row is run once, " \
                            "never again to improve its number; choose another row name\n", result.stderr
    assert repo.experiments() == before
    assert {p.name: p.read_bytes() for p in (repo.path / "studies/ablation").iterdir()} == files


@pytest.mark.slow
def test_a_row_whose_write_was_lost_reuses_its_experiments_and_other_params_are_refused(repo):
    folder = repo.path / "studies/ablation"
    before, files = repo.experiments(), {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "runs.csv").unlink()  # as if the command stopped between the last evaluation and the row
    sets = [a for s in TINY for a in ("--set", s)]
    other = repo.ablation("tiny", *sets, "--set", "train.epochs=3", "--val-size", "256", "--device", "cpu",
                          check=False)
    assert other.returncode == 1 and other.stderr.startswith(
        "error: experiment ablation-tiny exists with other params or code (train.epochs): remove it"), other.stderr
    result = repo.ablation("tiny", *sets, "--val-size", "256", "--device", "cpu")
    assert result.stdout.count("already run with these params and code, not run again") == 3, result.stdout
    assert "Running stage" not in result.stdout and repo.experiments() == before
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # the same row, byte for byte


# ---------------------------------------------------------------------------------------------- --on best


def test_on_best_takes_the_set_of_the_row_with_the_best_flip_tta_accuracy(in_tmp):
    with pytest.raises(AblationError, match="--on best: no row"):
        ablation.resolve_sets(ablation_table.read_rows(), ["train.ema_decay=0.99"], "best")
    rows = pd.DataFrame([row("baseline", acc=0.90), row("ls", "train.label_smoothing=0.2", acc=0.91),
                         row("ema", "train.label_smoothing=0.2 train.ema_decay=0.99", acc=0.905),
                         row("tie", "train.frozen_bn_scales=true", acc=0.91)], columns=ablation_table.COLUMNS)
    assert ablation.best_row(rows) == "ls"  # the earlier of two equal rows
    assert ablation.resolve_sets(rows, ["augment.flip=alternate"], "best") == [
        "train.label_smoothing=0.2", "augment.flip=alternate"]
    with pytest.raises(AblationError, match="row name 'best'"):
        ablation.run_row("best", [])


def test_the_committed_table_is_made_from_the_committed_rows():
    """Rows recorded by another runner (the `runner` column says which) still read, and make the committed table."""
    rows = ablation_table.read_rows(REPO / "studies/ablation/runs.csv")
    assert not rows.empty and set(rows["runner"]) <= {"dvc exp run", "stage commands without DVC"}
    assert ablation_table.markdown_table(rows) == (REPO / "studies/ablation/table.md").read_text()
