"""params.yaml -> typed, validated objects.

Every stage calls `load_params()` before it does any work. A wrong type, an out-of-range value or an unknown key
(a typo such as `lr_mx`, which DVC lets through with `-S +lr_mx=...` or a hand edit) raises `ParamsError` naming
the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cifar_resnet.errors import ParamsError


def _check(rule: str):
    """Attach a rule (checked by `_validate_value`) and its human wording to a dataclass field."""
    return {"rule": rule}


@dataclass(frozen=True)
class DataParams:
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    train_limit: int | None = field(default=None, metadata=_check("positive"))
    test_limit: int | None = field(default=None, metadata=_check("positive"))
    val_size: int = field(default=0, metadata=_check("non_negative"))


@dataclass(frozen=True)
class ModelParams:
    channels: tuple[int, int, int, int] = (64, 128, 256, 512)
    logit_scale: float = field(default=0.125, metadata=_check("positive"))
    activation: str = field(default="relu", metadata=_check("one_of:relu,celu"))
    celu_alpha: float = field(default=0.075, metadata=_check("positive"))
    whitening: bool = False


@dataclass(frozen=True)
class AugmentParams:
    pad: int = field(default=4, metadata=_check("non_negative"))
    pad_mode: str = field(default="reflect", metadata=_check("one_of:reflect,constant,replicate"))
    crop: int = field(default=32, metadata=_check("positive"))
    flip_p: float = field(default=0.5, metadata=_check("probability"))
    cutout: int = field(default=8, metadata=_check("non_negative"))
    backend: str = field(default="batched", metadata=_check("one_of:batched,albumentations"))
    flip: str = field(default="random", metadata=_check("one_of:random,alternate"))


@dataclass(frozen=True)
class LrRangeTestParams:
    start_lr: float = field(default=1e-4, metadata=_check("positive"))
    end_lr: float = field(default=10.0, metadata=_check("positive"))
    num_iter: int = field(default=100, metadata=_check("positive"))
    window: int = field(default=5, metadata=_check("odd"))
    divisor: float = field(default=1.25, metadata=_check("positive"))
    stop_at_climb: bool = True  # false: sweep to num_iter (the pick is the same), for curves judged by other rules


@dataclass(frozen=True)
class TrainParams:
    epochs: int = field(default=24, metadata=_check("positive"))
    peak_epoch: int = field(default=5, metadata=_check("non_negative"))  # 0: the cycle starts at LRMAX
    batch_size: int = field(default=512, metadata=_check("positive"))
    momentum: float = field(default=0.9, metadata=_check("fraction"))
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=_check("non_negative"))
    device: str = field(default="auto", metadata=_check("one_of:auto,cpu,cuda,mps"))
    precision: str = field(default="auto", metadata=_check("one_of:auto,fp32,bf16,fp16"))
    channels_last: bool | str = field(default="auto", metadata=_check("auto_or_bool"))
    compile: bool = False
    nproc: int = field(default=1, metadata=_check("positive"))
    sync_bn: bool = False
    threads: int = field(default=0, metadata=_check("non_negative"))
    max_loss: float = field(default=1000.0, metadata=_check("positive"))
    eval_split: str = field(default="auto", metadata=_check("one_of:auto,none,val,test"))
    eval_every: int = field(default=1, metadata=_check("positive"))
    checkpoint_every: int = field(default=1, metadata=_check("positive"))
    label_smoothing: float = field(default=0.0, metadata=_check("fraction"))
    ema_decay: float = field(default=0.0, metadata=_check("fraction"))
    ema_every: int = field(default=5, metadata=_check("positive"))
    frozen_bn_scales: bool = False
    bn_bias_lr_factor: float = field(default=64.0, metadata=_check("positive"))
    cycle_momentum: bool = False


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = field(default=1000, metadata=_check("positive"))
    split: str = field(default="auto", metadata=_check("one_of:auto,val,test"))
    tta: str = field(default="none", metadata=_check("one_of:none,flip,flip+translate"))


@dataclass(frozen=True)
class GalleryParams:
    num_images: int = field(default=36, metadata=_check("positive"))
    columns: int = field(default=6, metadata=_check("positive"))


@dataclass(frozen=True)
class Params:
    seed: int = field(default=0, metadata=_check("seed"))
    lr_max: float | str = field(default="auto", metadata=_check("auto_or_positive"))
    lr_min_factor: float = field(default=0.01, metadata=_check("open_unit"))
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    augment: AugmentParams = AugmentParams()
    lr_range_test: LrRangeTestParams = LrRangeTestParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    gallery: GalleryParams = GalleryParams()


_RULES = {
    "positive": ("a number > 0", lambda v: v > 0),
    "non_negative": ("a number >= 0", lambda v: v >= 0),
    "probability": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "fraction": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "open_unit": ("a number in (0, 1)", lambda v: 0 < v < 1),
    "odd": ("an odd integer > 0 (a centred window)", lambda v: v > 0 and v % 2 == 1),
    "seed": ("an integer in [0, 2**64)", lambda v: 0 <= v < 2**64),  # what torch.manual_seed takes
}

# The network halves the image three times (Layer1, Layer2, Layer3) and then max-pools 4 x 4 into one 512-wide
# vector for its linear layer: a training crop must be 32 to 63 pixels wide to come out as exactly one pixel.
NETWORK_INPUT = (32, 63)


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(args)} integers"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _is_instance(value, tp) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _validate_value(key: str, value, tp, rule: str | None):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        if not (isinstance(value, list) and len(value) == len(args) and all(_is_instance(v, int) and v > 0 for v in value)):
            raise ParamsError(f"{key}: expected {_type_name(tp)} > 0, got {value!r}")
        return tuple(value)
    if rule == "auto_or_positive":
        if value == "auto" or (_is_instance(value, float) and value > 0):
            return float(value) if value != "auto" else value
        raise ParamsError(f"{key}: expected 'auto' or a number > 0, got {value!r}")
    if rule == "auto_or_bool":
        if value == "auto" or isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: expected 'auto', true or false, got {value!r}")
    candidates = args or (tp,)
    if not any(_is_instance(value, t) for t in candidates):
        raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if value is None:
        return value
    if rule and rule.startswith("one_of:"):
        allowed = rule.split(":", 1)[1].split(",")
        if value not in allowed:
            raise ParamsError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    elif rule:
        wording, ok = _RULES[rule]
        if not ok(value):
            raise ParamsError(f"{key}: expected {wording}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params.yaml'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be bools or ints (`on:`, `1:`)
    if unknown:
        name = f"{prefix}{unknown[0]}"
        raise ParamsError(f"{name}: unknown key (allowed here: {', '.join(sorted(fields))})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            continue  # the default applies
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], f"{key}.")
        else:
            values[name] = _validate_value(key, raw[name], tp, f.metadata.get("rule"))
    return cls(**values)


def _cross_checks(p: Params) -> None:
    t, a = p.train, p.augment
    if t.peak_epoch >= t.epochs:
        raise ParamsError(f"train.peak_epoch: expected less than train.epochs ({t.epochs}), got {t.peak_epoch}")
    if t.nesterov and t.momentum == 0 and not t.cycle_momentum:
        raise ParamsError("train.nesterov: Nesterov momentum needs train.momentum above 0; set nesterov to false")
    if t.batch_size % t.nproc:
        raise ParamsError(f"train.batch_size: expected a multiple of train.nproc ({t.nproc}), got {t.batch_size}")
    if not NETWORK_INPUT[0] <= a.crop <= NETWORK_INPUT[1]:
        raise ParamsError(f"augment.crop: the network takes {NETWORK_INPUT[0]} to {NETWORK_INPUT[1]} pixels, "
                          f"got {a.crop}")
    if a.crop > 32 + 2 * a.pad:
        raise ParamsError(f"augment.crop: expected at most 32 + 2 * augment.pad = {32 + 2 * a.pad}, got {a.crop}")
    if a.cutout > a.crop:
        raise ParamsError(f"augment.cutout: expected at most augment.crop ({a.crop}), got {a.cutout}")
    if a.pad_mode == "reflect" and a.pad >= 32:
        raise ParamsError(f"augment.pad: reflect padding needs a value below 32, got {a.pad}")
    r = p.lr_range_test
    if r.end_lr <= r.start_lr:
        raise ParamsError(f"lr_range_test.end_lr: expected more than start_lr ({r.start_lr}), got {r.end_lr}")
    if r.num_iter < 10:
        raise ParamsError(f"lr_range_test.num_iter: expected at least 10, got {r.num_iter}")
    if a.flip == "alternate" and a.backend != "batched":
        raise ParamsError("augment.flip: 'alternate' needs augment.backend batched")
    if p.evaluate.split == "val" and p.data.val_size == 0:
        raise ParamsError("evaluate.split: 'val' needs a validation split; set data.val_size above 0")
    if t.eval_split == "val" and p.data.val_size == 0:
        raise ParamsError("train.eval_split: 'val' needs a validation split; set data.val_size above 0")
    if t.sync_bn and t.device == "cpu":
        raise ParamsError("train.sync_bn: SyncBatchNorm runs on GPUs only; set it to false with train.device=cpu")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers: DVC writes `-S train.weight_decay=1e-5` as `1e-05`, a float
    in YAML 1.2 and a string in PyYAML's YAML 1.1 (which wants a dot in a float)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# YAML 1.2's integers: 012 is twelve (1.1: octal ten), 0o12 octal, 0x12 hex; no 1_000 and no 1:30 (sexagesimal).
_Yaml12Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))


def _yaml12_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)


_Yaml12Loader.add_constructor(_INT, _yaml12_int)
_Yaml12Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?   # 1.5, 1., .5, 1.5e-3
    |[-+]?[0-9]+[eE][-+]?[0-9]+                        # 1e-05, 1E5 (a plain 15 stays an integer)
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def read_yaml(text: str):
    """YAML text (params.yaml, dvc.lock) -> Python objects, numbers read by YAML 1.2's rules, as DVC writes them."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_params(raw) -> Params:
    params = _build(Params, raw if raw is not None else {}, "")
    _cross_checks(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot be read ({exc})") from None
    return parse_params(raw)


def held_out_split(params: Params) -> str:
    """What `auto` means for evaluate.split and train.eval_split: the validation split when there is one (recipes
    are chosen there: no test number exists while choosing), else the test split."""
    return "val" if params.data.val_size else "test"


def evaluation_split(params: Params) -> str:
    """The split the evaluate stage reports: `evaluate.split` (auto: `held_out_split`)."""
    return held_out_split(params) if params.evaluate.split == "auto" else params.evaluate.split


def resolve_lr_max(params: Params, range_test_result: dict | None) -> tuple[float, float, str]:
    """(LRMAX, LRMIN, where LRMAX came from). LRMIN follows one rule: LRMAX * lr_min_factor."""
    if params.lr_max == "auto":
        if range_test_result is None:
            raise ParamsError("lr_max: 'auto' needs metrics/lr_range_test.json; run the lr_range_test stage first")
        if range_test_result.get("lr_max") is None and range_test_result.get("no_pick"):
            raise ParamsError(f"lr_max: 'auto' has no LRMAX to take: the lr_range_test stage picked none "
                              f"({range_test_result['no_pick']}). See plots/lr_range_test.png; change "
                              "lr_range_test or set lr_max to a number (dvc exp run -S lr_max=0.4)")
        try:
            lr_max, source = float(range_test_result["lr_max"]), "lr_range_test"
        except (KeyError, TypeError, ValueError):
            raise ParamsError("lr_max: 'auto' needs a number under 'lr_max' in metrics/lr_range_test.json; "
                              "run the lr_range_test stage again") from None
    else:
        lr_max, source = float(params.lr_max), "params.yaml"
    return lr_max, lr_max * params.lr_min_factor, source
