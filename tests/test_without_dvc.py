"""The stage commands without DVC (cifar_resnet.without_dvc): overrides as `dvc exp run -S KEY=VALUE` applies them
(fast), and (slow, real data) the pipeline's stages run in a scratch folder on the tiny configuration, with no
live metrics (DVCLive needs DVC) and the same files the stages write under DVC."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import REPO, stage_env, tiny_set
from cifar_resnet import without_dvc
from cifar_resnet.errors import CifarResnetError


@pytest.fixture
def params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_an_override_sets_a_nested_key_to_a_yaml_value(params):
    out = without_dvc.apply_overrides(params, ["train.label_smoothing=0.2", "model.channels=[8, 16, 32, 64]",
                                               "augment.flip=alternate", "seed=3", "model.whitening=true"])
    assert out["train"]["label_smoothing"] == 0.2 and out["model"]["channels"] == [8, 16, 32, 64]
    assert out["augment"]["flip"] == "alternate" and out["seed"] == 3 and out["model"]["whitening"] is True
    assert params["train"]["label_smoothing"] == 0 and params["seed"] == 0  # the caller's mapping is untouched
    rest = {k: v for k, v in out.items() if k not in ("seed", "train", "model", "augment")}
    assert rest == {k: v for k, v in params.items() if k not in ("seed", "train", "model", "augment")}


@pytest.mark.parametrize("override,message", [
    ("train.label_smoothin=0.2", "params.yaml has no key train.label_smoothin"),
    ("trian.epochs=2", "params.yaml has no section trian"),
    ("seed.x=1", "params.yaml has no section seed"),
    ("+train.new=1", r"\+key and ~key are not supported"),
    ("~train.epochs", "expected KEY=VALUE"),
    ("train.epochs", "expected KEY=VALUE"),
    ("train.label_smoothing=2", "label_smoothing"),  # the params gate's own check
])
def test_a_bad_override_fails_naming_it_before_anything_runs(params, override, message):
    with pytest.raises(CifarResnetError, match=message):
        without_dvc.apply_overrides(params, [override])


def test_stage_commands_come_from_dvc_yaml_in_its_order(monkeypatch):
    monkeypatch.chdir(REPO)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = without_dvc.stage_commands({"train", "check_params", "evaluate"})
    assert commands == [(n, stages[n]["cmd"]) for n in ("check_params", "train", "evaluate")]
    with pytest.raises(CifarResnetError, match="dvc.yaml has no stage trian"):
        without_dvc.stage_commands({"trian"})


TINY = tiny_set("train.batch_size=128", "train.threads=1", "train.device=cpu")


@pytest.mark.slow
def test_the_stages_run_in_a_scratch_folder_with_no_live_metrics(tmp_path, monkeypatch, mirror):
    monkeypatch.chdir(REPO)
    for key, value in stage_env(tmp_path / "cache", CIFAR10_MIRROR=str(mirror)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CIFAR10_MD5SUMS", raising=False)
    # `python` on PATH is not this interpreter: the stages must still run with it (the scratch folder's launcher).
    monkeypatch.setenv("PATH", os.pathsep.join(["/nonexistent", os.environ["PATH"]]))
    folder = tmp_path / "scratch"
    lines = []
    without_dvc.run_stages(folder, {"check_params", "download", "lr_range_test", "train"}, TINY, say=lines.append)
    assert [line.split()[1] for line in lines] == ["check_params", "download", "lr_range_test", "train"]
    assert yaml.safe_load((folder / "params.yaml").read_text())["train"]["epochs"] == 2
    train = json.loads((folder / "metrics" / "train.json").read_text())
    assert train["epochs"] == 2 and train["lr_source"] == "lr_range_test"
    assert (folder / "models" / "model.pt").is_file() and not (folder / "dvclive").exists()
    assert not (folder / "metrics" / "evaluate.json").exists()  # only the stages named ran
    without_dvc.run_stages(folder, {"evaluate"}, [*TINY, "evaluate.tta=flip"], say=lines.append)
    evaluate = json.loads((folder / "metrics" / "evaluate.json").read_text())
    assert evaluate["tta"] == "flip" and evaluate["num_images"] == 512
    (folder / "metrics" / "lr_range_test.json").unlink()  # lr_max auto without the range test's pick: train fails
    with pytest.raises(CifarResnetError, match=r"stage train failed \(exit code 1\)"):
        without_dvc.run_stages(folder, {"train"}, TINY, say=lines.append)
