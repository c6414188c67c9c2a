"""params.yaml validation: every error path of cifar_resnet.config names the full dotted key, and the stage door turns
it into one line and exit code 1."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_resnet.config import Params, load_params, parse_params, resolve_lr_max
from cifar_resnet.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]


def nested(dotted: str, value) -> dict:
    """'train.epochs', 5 -> {'train': {'epochs': 5}}."""
    *parents, leaf = dotted.split(".")
    raw = {leaf: value}
    for part in reversed(parents):
        raw = {part: raw}
    return raw


def merge(*raws: dict) -> dict:
    out: dict = {}
    for raw in raws:
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def params_error(raw) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def dataclass_keys(cls, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or dataclasses.is_dataclass(f.default):
            keys |= dataclass_keys(type(f.default), f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def yaml_keys(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in raw.items():
        if isinstance(value, dict):
            keys |= yaml_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


# ------------------------------------------------------------------------------------------- the committed file


def test_committed_params_yaml_loads_with_the_recipe_values():
    p = load_params(REPO / "params.yaml")
    assert p.seed == 0
    assert p.lr_max == "auto"
    assert p.lr_min_factor == pytest.approx(0.01)
    assert p.train.batch_size == 512
    assert p.train.epochs == 24
    assert p.train.peak_epoch == 5
    assert p.train.momentum == pytest.approx(0.9)
    assert p.train.nesterov is True
    assert p.train.weight_decay == pytest.approx(5e-4)
    assert p.train.nproc == 1
    assert p.model.channels == (64, 128, 256, 512)
    assert isinstance(p.model.channels, tuple)
    assert p.model.logit_scale == pytest.approx(0.125)
    assert p.augment.pad == 4 and p.augment.pad_mode == "reflect" and p.augment.crop == 32
    assert p.augment.flip_p == pytest.approx(0.5) and p.augment.cutout == 8
    assert p.data.train_limit is None and p.data.test_limit is None and p.data.val_size == 0
    assert p.data.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert p.lr_range_test.divisor == pytest.approx(1.25) and p.lr_range_test.window == 5
    assert p.evaluate.batch_size == 1000
    # The committed file spells out the dataclass defaults.
    assert p == Params()


def test_committed_params_yaml_lists_every_key():
    # `dvc exp run -S key=value` only sets keys that already exist in params.yaml.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert yaml_keys(raw) == dataclass_keys(Params)


def test_empty_params_mean_the_defaults():
    assert parse_params(None) == Params()
    assert parse_params({}) == Params()
    assert parse_params({"train": {}}) == Params()


def test_params_are_frozen():
    p = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.epochs = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- one value at a time

BAD_VALUES = [
    # wrong type
    ("train.epochs", "ten"),
    ("train.epochs", 24.0),
    ("train.epochs", True),
    ("train.batch_size", "512"),
    ("train.nesterov", 3),
    ("train.nesterov", "yes"),
    ("train.compile", "false"),
    ("train.sync_bn", 0),
    ("train.channels_last", "yes"),
    ("train.channels_last", 1),
    ("train.momentum", "0.9"),
    ("train.weight_decay", "5e-4"),  # PyYAML (YAML 1.1) reads an unquoted 5e-4 as a string
    ("model.channels", [1, 2]),
    ("model.channels", [64, 128, 256, 512, 1024]),
    ("model.channels", [64, 128, 256, 0]),
    ("model.channels", [64, 128, 256, -512]),
    ("model.channels", [64, 128, 256, 512.0]),
    ("model.channels", [64, 128, 256, True]),
    ("model.channels", "64,128,256,512"),
    ("model.channels", 64),
    ("model.logit_scale", math.inf),
    ("model.logit_scale", math.nan),
    ("data.url", 5),
    ("data.train_limit", "all"),
    ("data.train_limit", 1000.0),
    ("data.test_limit", True),
    ("augment.pad", None),
    ("seed", "0"),
    ("seed", 1.5),
    # out of range
    ("train.batch_size", -5),
    ("train.batch_size", 0),
    ("train.epochs", 0),
    ("train.nproc", 0),
    ("train.threads", -1),
    ("train.weight_decay", -0.1),
    ("train.momentum", 1.0),
    ("train.momentum", -0.1),
    ("augment.flip_p", 1.5),
    ("augment.flip_p", -0.1),
    ("augment.pad", -1),
    ("augment.crop", 0),
    ("augment.cutout", -1),
    ("lr_min_factor", 0),
    ("lr_min_factor", 1),
    ("lr_min_factor", 1.5),
    ("lr_min_factor", -0.01),
    ("model.logit_scale", 0),
    ("data.train_limit", 0),
    ("data.test_limit", -10),
    ("data.val_size", -1),
    ("seed", -1),
    ("lr_range_test.start_lr", 0),
    ("lr_range_test.end_lr", -1),
    ("lr_range_test.num_iter", 0),
    ("lr_range_test.window", 4),
    ("lr_range_test.window", 0),
    ("lr_range_test.divisor", 0),
    ("evaluate.batch_size", 0),
    ("gallery.num_images", 0),
    ("gallery.columns", -6),
    # not one of the choices
    ("augment.pad_mode", "mirror"),
    ("augment.pad_mode", "Reflect"),
    ("augment.backend", "kornia"),
    ("train.device", "tpu"),
    ("train.device", "cuda:0"),
    ("train.precision", "fp8"),
    ("train.precision", 32),
    ("train.eval_split", "train"),
    ("train.eval_every", 0),
    ("train.checkpoint_every", 0),
    # lr_max: 'auto' or a number > 0
    ("lr_max", "x"),
    ("lr_max", "Auto"),
    ("lr_max", -1),
    ("lr_max", 0),
    ("lr_max", True),
    ("lr_max", None),
    ("lr_max", math.nan),
    ("lr_max", math.inf),
    ("lr_max", [0.3]),
    # the opt-in tricks
    ("model.activation", "gelu"),
    ("model.activation", "CELU"),
    ("model.celu_alpha", 0),
    ("model.celu_alpha", "0.075"),
    ("model.whitening", "yes"),
    ("model.whitening", 1),
    ("augment.flip", "always"),
    ("augment.flip", True),
    ("train.label_smoothing", 1.0),
    ("train.label_smoothing", -0.1),
    ("train.ema_decay", 1.0),
    ("train.ema_decay", -0.5),
    ("train.ema_every", 0),
    ("train.ema_every", 2.5),
    ("train.frozen_bn_scales", "true"),
    ("train.bn_bias_lr_factor", 0),
    ("train.bn_bias_lr_factor", -64),
    ("train.cycle_momentum", 1),
    ("evaluate.split", "train"),
    ("evaluate.split", "none"),
    ("evaluate.tta", "hflip"),
    ("evaluate.tta", "translate"),
    ("evaluate.tta", True),
    ("seed", 2**64),
    ("seed", -1),
    ("train.peak_epoch", -1),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_names_the_full_key(key, value):
    message = params_error(nested(key, value))
    assert message.startswith(f"{key}: expected "), message
    assert f"got {value!r}" in message


def test_bad_value_message_says_what_is_allowed():
    assert params_error(nested("train.batch_size", -5)) == "train.batch_size: expected a number > 0, got -5"
    assert params_error(nested("augment.flip_p", 1.5)) == "augment.flip_p: expected a number in [0, 1], got 1.5"
    assert params_error({"lr_min_factor": 1}) == "lr_min_factor: expected a number in (0, 1), got 1"
    assert params_error(nested("augment.pad_mode", "mirror")) == (
        "augment.pad_mode: expected one of reflect, constant, replicate, got 'mirror'")
    assert params_error(nested("train.device", "tpu")) == "train.device: expected one of auto, cpu, cuda, mps, got 'tpu'"
    assert params_error(nested("train.epochs", "ten")) == "train.epochs: expected an integer, got 'ten'"
    assert params_error(nested("train.nesterov", 3)) == "train.nesterov: expected true or false, got 3"
    assert params_error(nested("model.channels", [1, 2])) == (
        "model.channels: expected a list of 4 integers > 0, got [1, 2]")
    assert params_error({"lr_max": "x"}) == "lr_max: expected 'auto' or a number > 0, got 'x'"
    assert params_error({"lr_max": -1}) == "lr_max: expected 'auto' or a number > 0, got -1"
    assert params_error(nested("data.train_limit", 0)) == "data.train_limit: expected a number > 0, got 0"
    assert params_error(nested("data.train_limit", "all")) == (
        "data.train_limit: expected an integer or null, got 'all'")


GOOD_VALUES = [
    ("lr_max", 0.3, 0.3),
    ("lr_max", 1, 1.0),
    ("lr_max", "auto", "auto"),
    ("lr_min_factor", 0.5, 0.5),
    ("lr_min_factor", 1e-6, 1e-6),
    ("augment.flip_p", 0, 0.0),
    ("augment.flip_p", 1, 1.0),
    ("augment.pad_mode", "constant", "constant"),
    ("augment.pad", 0, 0),
    ("augment.cutout", 0, 0),
    ("train.device", "cpu", "cpu"),
    ("train.momentum", 0.5, 0.5),
    ("train.weight_decay", 0, 0.0),
    ("train.nesterov", False, False),
    ("train.channels_last", True, True),
    ("train.channels_last", "auto", "auto"),
    ("data.train_limit", None, None),
    ("data.train_limit", 1000, 1000),
    ("data.val_size", 5000, 5000),
    ("model.channels", [16, 32, 64, 128], (16, 32, 64, 128)),
    ("model.logit_scale", 1, 1.0),
    ("model.activation", "celu", "celu"),
    ("model.celu_alpha", 1, 1.0),
    ("model.whitening", True, True),
    ("augment.flip", "alternate", "alternate"),
    ("train.label_smoothing", 0.2, 0.2),
    ("train.label_smoothing", 0, 0.0),
    ("train.ema_decay", 0.99, 0.99),
    ("train.ema_every", 1, 1),
    ("train.frozen_bn_scales", True, True),
    ("train.bn_bias_lr_factor", 1, 1.0),
    ("train.cycle_momentum", True, True),
    ("evaluate.split", "test", "test"),
    ("evaluate.tta", "flip", "flip"),
    ("evaluate.tta", "flip+translate", "flip+translate"),
]


@pytest.mark.parametrize(("key", "value", "expected"), GOOD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in GOOD_VALUES])
def test_good_value_is_taken(key, value, expected):
    p = parse_params(nested(key, value))
    got = p
    for part in key.split("."):
        got = getattr(got, part)
    assert got == expected
    assert type(got) is type(expected)  # numbers given as ints for float keys come back as floats
    # Everything else keeps its default.
    assert dataclasses.replace(p, **{key.split(".")[0]: getattr(Params(), key.split(".")[0])}) == Params()


# ------------------------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("raw", "key", "allowed"), [
    ({"lr_mx": 0.3}, "lr_mx", "lr_max"),
    ({"Seed": 1}, "Seed", "seed"),
    ({"trian": {"epochs": 3}}, "trian", "train"),
    ({"train": {"batch_sze": 256}}, "train.batch_sze", "batch_size"),
    ({"data": {"foo": 1}}, "data.foo", "val_size"),
    ({"model": {"width": 2}}, "model.width", "channels"),
    ({"lr_range_test": {"divsor": 2}}, "lr_range_test.divsor", "divisor"),
    ({"train": {"batch_size": 256, "zz_extra": 1, "aa_extra": 2}}, "train.aa_extra", "batch_size"),
])
def test_unknown_key_names_the_full_key(raw, key, allowed):
    message = params_error(raw)
    assert message.startswith(f"{key}: unknown key"), message
    assert allowed in message  # the allowed keys at that level are listed


def test_unknown_key_is_caught_even_next_to_good_values():
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {"lr_mx": 0.3})
    assert params_error(raw).startswith("lr_mx: unknown key")


@pytest.mark.parametrize(("raw", "key"), [
    ([1, 2], "params.yaml"),
    ("seed: 0", "params.yaml"),
    ({"train": 5}, "train"),
    ({"data": None}, "data"),
    ({"model": [64, 128, 256, 512]}, "model"),
])
def test_section_that_is_not_a_mapping(raw, key):
    message = params_error(raw)
    head = message.split(":", 1)[0]
    assert head == key, message
    assert "expected a mapping" in message


def test_unknown_keys_of_mixed_types_are_a_params_error():
    raw = yaml.safe_load("on: 1\nlr_mx: 0.3\n")
    assert True in raw  # PyYAML reads `on` as a boolean key
    with pytest.raises(ParamsError):
        parse_params(raw)


# ------------------------------------------------------------------------------------------- cross checks


@pytest.mark.parametrize(("raw", "key"), [
    ({"train": {"epochs": 5, "peak_epoch": 5}}, "train.peak_epoch"),
    ({"train": {"epochs": 4, "peak_epoch": 5}}, "train.peak_epoch"),
    ({"train": {"peak_epoch": 24}}, "train.peak_epoch"),
    ({"train": {"batch_size": 512, "nproc": 3}}, "train.batch_size"),
    ({"train": {"batch_size": 100, "nproc": 8}}, "train.batch_size"),
    ({"lr_range_test": {"start_lr": 1.0, "end_lr": 1.0}}, "lr_range_test.end_lr"),
    ({"lr_range_test": {"start_lr": 1.0, "end_lr": 0.5}}, "lr_range_test.end_lr"),
    ({"lr_range_test": {"num_iter": 9}}, "lr_range_test.num_iter"),
    ({"augment": {"pad": 0, "crop": 33}}, "augment.crop"),
    ({"augment": {"crop": 32, "cutout": 33}}, "augment.cutout"),
    ({"augment": {"crop": 24}}, "augment.crop"),
    ({"augment": {"pad": 32, "pad_mode": "constant", "crop": 64}}, "augment.crop"),
    ({"train": {"momentum": 0, "nesterov": True}}, "train.nesterov"),
    ({"augment": {"pad": 32, "pad_mode": "reflect", "crop": 32}}, "augment.pad"),
    ({"train": {"sync_bn": True, "device": "cpu"}}, "train.sync_bn"),
    ({"augment": {"flip": "alternate", "backend": "albumentations"}}, "augment.flip"),
    ({"evaluate": {"split": "val"}}, "evaluate.split"),
    ({"evaluate": {"split": "val"}, "data": {"val_size": 0}}, "evaluate.split"),
])
def test_cross_check_names_the_key(raw, key):
    message = params_error(raw)
    assert message.startswith(f"{key}: "), message


def test_cross_check_messages_carry_the_numbers():
    assert params_error({"train": {"epochs": 5, "peak_epoch": 5}}) == (
        "train.peak_epoch: expected less than train.epochs (5), got 5")
    assert params_error({"train": {"batch_size": 512, "nproc": 3}}) == (
        "train.batch_size: expected a multiple of train.nproc (3), got 512")
    message = params_error({"lr_range_test": {"start_lr": 1.0, "end_lr": 0.5}})
    assert "start_lr (1.0)" in message and message.endswith("got 0.5")


def test_cross_checks_pass_at_their_edges():
    p = parse_params({"train": {"epochs": 6, "peak_epoch": 5, "batch_size": 512, "nproc": 4},
                      "augment": {"pad": 32, "pad_mode": "constant", "crop": 63, "cutout": 63},
                      "lr_range_test": {"start_lr": 0.5, "end_lr": 0.6, "num_iter": 10}})
    assert p.train.peak_epoch == 5 and p.train.nproc == 4
    assert p.augment.crop == 63
    assert parse_params({"augment": {"pad": 0, "crop": 32}}).augment.crop == 32
    assert parse_params({"train": {"momentum": 0, "nesterov": False}}).train.momentum == 0
    assert parse_params({"train": {"momentum": 0, "cycle_momentum": True}}).train.nesterov is True
    assert parse_params({"seed": 2**64 - 1}).seed == 2**64 - 1
    assert parse_params({"train": {"sync_bn": True, "device": "cuda"}}).train.sync_bn is True


# ------------------------------------------------------------------------------------------- hand-edited files


def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_hand_edit_with_unknown_top_level_key(tmp_path):
    committed = (REPO / "params.yaml").read_text()
    path = write_params(tmp_path, committed + "lr_mx: 0.3\n")
    with pytest.raises(ParamsError, match=r"^lr_mx: unknown key"):
        load_params(path)


def test_hand_edit_with_unknown_nested_key(tmp_path):
    path = write_params(tmp_path, "seed: 1\ntrain:\n  epochs: 10\n  batch_sze: 256\n")
    with pytest.raises(ParamsError, match=r"^train\.batch_sze: unknown key"):
        load_params(path)


def test_hand_edit_that_is_valid(tmp_path):
    path = write_params(tmp_path, "lr_max: 0.4\ntrain:\n  epochs: 10\n  peak_epoch: 2\n  batch_size: 256\n")
    p = load_params(path)
    assert p.lr_max == pytest.approx(0.4) and p.train.epochs == 10 and p.train.batch_size == 256
    assert p.train.momentum == pytest.approx(0.9)  # untouched keys keep their defaults


def test_load_params_accepts_a_str_path(tmp_path):
    path = write_params(tmp_path, "seed: 3\n")
    assert load_params(str(path)).seed == 3


def test_empty_file_means_the_defaults(tmp_path):
    assert load_params(write_params(tmp_path, "")) == Params()


@pytest.mark.parametrize("text", [
    "train: [1, 2\n",
    "train:\n  epochs: 3\n bad_indent: 1\n",
    "seed: 0\n\tlr_max: 0.3\n",
    "lr_max: 'auto\n",
])
def test_invalid_yaml(tmp_path, text):
    path = write_params(tmp_path, text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: not valid YAML")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: file not found")


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ParamsError, match=r"^params\.yaml: expected a mapping"):
        load_params(write_params(tmp_path, "- 1\n- 2\n"))


# ------------------------------------------------------------------------------------------- LRMAX and LRMIN


def test_resolve_lr_max_auto_takes_the_range_test_pick():
    lr_max, lr_min, source = resolve_lr_max(parse_params({"lr_max": "auto"}), {"lr_max": 0.42, "lr_min": 99})
    assert lr_max == pytest.approx(0.42)
    assert lr_min == pytest.approx(0.42 * 0.01)
    assert source == "lr_range_test"


def test_resolve_lr_max_number_overrides_the_range_test():
    params = parse_params({"lr_max": 0.3, "lr_min_factor": 0.1})
    lr_max, lr_min, source = resolve_lr_max(params, {"lr_max": 5.0})
    assert (lr_max, source) == (pytest.approx(0.3), "params.yaml")
    assert lr_min == pytest.approx(0.03)
    # A number needs no range-test result at all.
    assert resolve_lr_max(params, None) == (pytest.approx(0.3), pytest.approx(0.03), "params.yaml")


@pytest.mark.parametrize("factor", [0.01, 0.04, 0.5])
@pytest.mark.parametrize("lr_max", ["auto", 0.8])
def test_lr_min_is_lr_max_times_the_factor(lr_max, factor):
    params = parse_params({"lr_max": lr_max, "lr_min_factor": factor})
    got_max, got_min, _ = resolve_lr_max(params, {"lr_max": 2.5})
    assert got_max == pytest.approx(2.5 if lr_max == "auto" else lr_max)
    assert got_min == pytest.approx(got_max * factor)
    assert isinstance(got_max, float) and isinstance(got_min, float)


def test_resolve_lr_max_auto_with_no_pick_names_why_and_a_number_trains():
    no_pick = {"lr_max": None, "lr_min": None, "no_pick": "lr_range_test: the smoothed loss was still falling"}
    with pytest.raises(ParamsError) as info:
        resolve_lr_max(parse_params({"lr_max": "auto"}), no_pick)
    assert str(info.value).startswith("lr_max: 'auto' has no LRMAX to take: the lr_range_test stage picked none "
                                      "(lr_range_test: the smoothed loss was still falling)")
    assert "lr_max to a number" in str(info.value)
    assert resolve_lr_max(parse_params({"lr_max": 0.4}), no_pick) == (pytest.approx(0.4), pytest.approx(0.004),
                                                                       "params.yaml")


def test_resolve_lr_max_auto_without_range_test_result():
    with pytest.raises(ParamsError) as info:
        resolve_lr_max(Params(), None)
    assert str(info.value).startswith("lr_max: ")
    assert "lr_range_test" in str(info.value)


# ------------------------------------------------------------------------------------------- the stage door


def run_download_stage(tmp_path: Path, params_text: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(params_text)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src")
    # Should validation ever let the params through, fail fast instead of copying or downloading CIFAR-10.
    env["CIFAR10_MIRROR"] = str(tmp_path / "no-such-mirror")
    return subprocess.run([sys.executable, str(REPO / "stages" / "download.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(("params_text", "key"), [
    ("train: {batch_size: -5}\n", "train.batch_size"),
    ("lr_mx: 0.3\n", "lr_mx"),
])
def test_download_stage_rejects_bad_params_in_one_line(tmp_path, params_text, key):
    result = run_download_stage(tmp_path, params_text)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert key in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(f"error: {key}: ")
    assert not (tmp_path / "data").exists()  # refused before any data work


def test_eval_split_val_needs_a_validation_split():
    with pytest.raises(ParamsError, match="train.eval_split: 'val' needs a validation split"):
        parse_params({"train": {"eval_split": "val"}})
    assert parse_params({"train": {"eval_split": "val"}, "data": {"val_size": 10}}).train.eval_split == "val"


def test_the_tricks_are_off_by_default():
    p = Params()
    assert (p.model.activation, p.model.whitening, p.augment.flip) == ("relu", False, "random")
    assert (p.train.label_smoothing, p.train.ema_decay, p.train.frozen_bn_scales, p.train.cycle_momentum) == (
        0.0, 0.0, False, False)
    assert (p.evaluate.split, p.evaluate.tta) == ("auto", "none")


def test_the_tricks_need_what_they_name():
    assert params_error({"evaluate": {"split": "val"}}) == (
        "evaluate.split: 'val' needs a validation split; set data.val_size above 0")
    assert parse_params({"evaluate": {"split": "val"}, "data": {"val_size": 10}}).evaluate.split == "val"
    assert "batched" in params_error({"augment": {"flip": "alternate", "backend": "albumentations"}})
    assert parse_params({"augment": {"flip": "alternate", "backend": "batched"}}).augment.flip == "alternate"
    assert parse_params({"augment": {"flip": "random", "backend": "albumentations"}}).augment.flip == "random"


# ------------------------------------------------------------------------------------------- YAML 1.2 numbers


@pytest.mark.parametrize(("text", "value"), [
    ("1e-05", 1e-05), ("1e-5", 1e-05), ("1E5", 1e5), ("-2.5e-3", -2.5e-3), ("1.0e+3", 1000.0), (".5", 0.5),
    ("5.", 5.0), ("0.0005", 0.0005), (".inf", math.inf), ("15", 15), ("012", 12), ("0x1F", 31), ("0o17", 15),
    ("-3", -3), ("1_000", "1_000"), ("auto", "auto"), ("true", True), ("null", None)])
def test_params_read_numbers_by_yaml_1_2_rules_as_dvc_writes_them(text, value):
    from cifar_resnet.config import read_yaml

    got = read_yaml(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)


def test_small_floats_as_dvc_and_hands_write_them_are_numbers(tmp_path):
    """`dvc exp run -S train.weight_decay=1e-5` writes `1e-05`: PyYAML's YAML 1.1 reads that as a string."""
    assert isinstance(yaml.safe_load("x: 1e-05")["x"], str)  # why params.yaml is not read with safe_load
    path = write_params(tmp_path, "train:\n  weight_decay: 1e-05\nlr_range_test:\n  start_lr: 1e-4\n")
    p = load_params(path)
    assert p.train.weight_decay == 1e-05 and p.lr_range_test.start_lr == 1e-4


def test_a_one_epoch_run_starts_its_cycle_at_lr_max():
    from cifar_resnet.schedule import OneCycle

    p = parse_params({"train": {"epochs": 1, "peak_epoch": 0}})
    assert (p.train.epochs, p.train.peak_epoch) == (1, 0)
    schedule = OneCycle.for_run(0.004, 0.4, p.train.epochs, p.train.peak_epoch, 10)
    assert schedule(0) == 0.4 and schedule(9) == pytest.approx(0.004)
    assert all(schedule(i) > schedule(i + 1) for i in range(9))


def test_seed_beyond_what_torch_takes_fails_validation():
    import torch

    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(2**64)  # what the seed would have crashed with at the first stage
    assert params_error({"seed": 2**64}) == "seed: expected an integer in [0, 2**64), got 18446744073709551616"


@pytest.mark.parametrize("crop", [31, 64])
def test_a_crop_the_network_cannot_take_fails_validation(crop):
    """The crop bounds are the network's: 32 to 63 pixels come out of its last max-pool as one pixel."""
    import torch

    from cifar_resnet.model import build_model

    net = build_model(parse_params({"model": {"channels": [4, 4, 4, 4]}}).model).eval()
    with pytest.raises(RuntimeError):
        net(torch.zeros(1, 3, crop, crop))
    for good in (32, 63):
        assert net(torch.zeros(1, 3, good, good)).shape == (1, 10)
    assert params_error({"augment": {"pad": 16, "pad_mode": "constant", "crop": crop}}) == (
        f"augment.crop: the network takes 32 to 63 pixels, got {crop}")


def test_nesterov_without_momentum_fails_validation_as_sgd_would():
    import torch

    with pytest.raises(ValueError):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0, nesterov=True)
    assert params_error({"train": {"momentum": 0}}).startswith("train.nesterov: Nesterov momentum needs")


@pytest.mark.parametrize(("data", "key"), [({"train_limit": 5 * 64 - 100 + 1, "val_size": 100}, "data.train_limit"),
                                           ({"test_limit": 65}, "data.test_limit")])
def test_a_subset_limit_above_the_data_fails_naming_the_key(tmp_path, data, key):
    """A limit above what the files hold is refused, not quietly capped (64 images per batch file here)."""
    from conftest import write_cifar_folder
    from cifar_resnet.data import load_cifar10

    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=64)
    md5s = dict(line.split()[::-1] for line in (tmp_path / "MD5SUMS").read_text().splitlines())
    md5s = {Path(name).name: md5 for name, md5 in md5s.items()}
    with pytest.raises(ParamsError, match=f"^{key}: expected at most the "):
        load_cifar10(folder, md5s=md5s, **data)
    exact = {k: v - 1 if k.endswith("limit") else v for k, v in data.items()}
    whole = load_cifar10(folder, md5s=md5s, **exact)
    assert len(whole.train_images) + len(whole.test_images) > 0
