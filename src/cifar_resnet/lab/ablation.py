"""Ablation: one row per recipe variant, chosen on the validation split, into studies/ablation/ (runs.csv, table.md).

    python -m cifar_resnet.lab.ablation ROW [--set key=value ...] [--on EARLIER_ROW] [--seed 0] [--device cuda]
    make ablation ROW=baseline [SET="train.label_smoothing=0.2"] [ON=EARLIER_ROW] [SEED=0] [DEVICE=cuda]

A row is one training run of params.yaml with the `--set` overrides (`--on ROW` puts that earlier row's set first:
the sets are cumulative), always with data.val_size=5000 (`--val-size`: 45,000 training images), train.eval_split=val
and evaluate.split=val, so no test number exists while choosing: no test accuracy is computed, per epoch or at the
end. It runs `dvc exp run --temp -n ablation-ROW -S ... -S evaluate.tta=none train evaluate` (DVC's experiment
machinery in a temporary copy of the repo, in the foreground: the workspace does not change), then the same with
evaluate.tta=flip (experiment ablation-ROW--flip) and flip+translate (ablation-ROW--flip-translate): those only
rerun the evaluate stage, the trained model comes from DVC's run-cache. The command checks that: the three
experiments' dvc.lock must record the same train outputs (timing/train.json holds the run's wall time, so a second
training could not match), and no experiment may hold a test number (metrics/evaluate.json has val_accuracy and no
accuracy; no git file that train or evaluate wrote has a test_ key or column or is named test_*).

Then it appends one row to studies/ablation/runs.csv (row, set, seed, val_size, val_accuracy_none,
val_accuracy_flip, val_accuracy_flip_translate, lr_max, train_seconds, device, hardware, code_hash, commit) and
rewrites studies/ablation/table.md (the README's table) from runs.csv, each file atomically. A row name already in
runs.csv is refused, as is a row with another row's set, seed and val_size: a configuration is run once, never again
to improve a number. An experiment left by an interrupted row is reused when its params and code are this command's
(nothing trains twice), and refused otherwise.

The plan: at most about five 24-epoch training runs, cumulative (each row adds one trick to
the best set so far: `--on` the best row), cheapest and most certain first:
  1. flip TTA needs no training: the baseline row's val_accuracy_none and val_accuracy_flip are the baseline
     validation model without and with it
       make ablation ROW=baseline
  2. label smoothing      make ablation ROW=label-smoothing ON=baseline SET="train.label_smoothing=0.2"
  3. EMA                  make ablation ROW=ema ON=label-smoothing SET="train.ema_decay=0.99"
  4. frozen BN scales with the bias rule (BN biases get LR x train.bn_bias_lr_factor and WD / it)
                          make ablation ROW=frozen-bn ON=ema SET="train.frozen_bn_scales=true"
  5. multi-view TTA (flip x {0, +-1 px}): every row's val_accuracy_flip_translate column, no run of its own
  6. alternating flip     make ablation ROW=alternate-flip ON=frozen-bn SET="augment.flip=alternate"
  7. whitening            make ablation ROW=whitening ON=alternate-flip SET="model.whitening=true"
  8. CELU, only if still short:  SET="model.activation=celu"
(Where a trick does not help, the next row goes `--on` the row before it: `--on best` picks the row with the
highest validation accuracy with flip TTA so far.)

The table's numbers are validation accuracies; the test split is for the one final run of the chosen recipe,
outside this command.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from cifar_resnet.config import read_yaml
from cifar_resnet.stage_door import run_command
from cifar_resnet.lab.ablation_table import (COLUMNS, RUNNER, RUNS, TABLE, TTAS, AblationError, join_sets,
                                             parse_sets, read_rows, refuse_existing, refuse_name, write_rows)
from cifar_resnet.lab.command import one_line
from cifar_resnet.stage_door import log
from cifar_resnet.lab.dvc_graph import StaleRun, current_code, dvc_yaml_graph, row_targets
from cifar_resnet.lab.dvc_runs import (Config, check_tracked, exp_ref, git_reader, head, read_run, ref_exists,
                                       run_experiment)
from cifar_resnet.lab.params import set_key, wanted_params
from cifar_resnet.lab.validation_only import refuse_test_numbers, validation_numbers

PREFIX = "ablation-"
VAL_SIZE = 5000
BEST = "best"  # --on best: the row with the highest validation accuracy with flip TTA so far
# Keys this command sets itself: --set may not give them.
CONTROLLED = {"seed": "--seed", "data.val_size": "--val-size", "train.eval_split": "(always val)",
              "evaluate.split": "(always val)", "evaluate.tta": "(every row has all three)", "train.device": "--device"}
# Row names: study names without doubled or trailing separators, so ROW--flip can never be another row's name.
ROW_NAME = r"[A-Za-z0-9]+(?:[_.-][A-Za-z0-9]+)*"


def cumulative_sets(earlier: list[str], sets: list[str]) -> list[str]:
    """`earlier` then `sets`; a key given again takes the later value, in the place of its first mention."""
    merged: dict[str, str] = {}
    for override in [*earlier, *sets]:
        merged[set_key(override)] = override
    return list(merged.values())


def check_sets(sets: list[str]) -> None:
    for override in sets:
        if "=" not in override and not override.startswith("~"):
            raise AblationError(f"--set {override}: expected KEY=VALUE")
        key = set_key(override)
        if key in CONTROLLED:
            raise AblationError(f"--set {override}: {key} is the command's own ({CONTROLLED[key]})")


def row_overrides(sets: list[str], seed: int, val_size: int, device: str | None, tta: str) -> list[str]:
    """What `dvc exp run -S` gets for one evaluation of the row: its set, then the keys the command controls."""
    return [*sets, f"seed={seed}", f"data.val_size={val_size}", "train.eval_split=val", "evaluate.split=val",
            *([f"train.device={device}"] if device else []), f"evaluate.tta={tta}"]


def experiment_name(row: str, tta: str) -> str:
    return PREFIX + row + ("" if tta == "none" else "--" + tta.replace("+", "-"))


# ---------------------------------------------------------------------------------------------- reading a run


def make_numbers(read, seed, code: dict, source: str) -> dict:
    """`read_run`'s row maker for an ablation experiment: its validation numbers (a refusal of any test number
    it holds), and the train stage's outputs as its dvc.lock records them."""
    lock = read_yaml(read("dvc.lock").decode())["stages"]["train"]
    return {**validation_numbers(read, code, source), "train_outs": {o["path"]: o.get("md5") for o in lock["outs"]}}


def experiment(name: str, overrides: list[str], wanted: Config, targets: list[str], baseline: str) -> dict:
    """The numbers of experiment `name`: a finished one with exactly these params and code, else a new run."""
    ref = exp_ref(baseline, name)
    if ref_exists(ref):
        try:
            run = read_run(git_reader(ref), f"experiment {name}", make=make_numbers)
        except StaleRun as exc:
            raise AblationError(f"experiment {name} exists but is not usable ({exc}): remove it "
                                f"(`dvc exp remove {name}`) and run the row again") from None
        diff = sum(Config(run.params, run.code).differences(wanted), [])
        if diff:
            raise AblationError(f"experiment {name} exists with other params or code ({', '.join(diff)}): remove it "
                                f"(`dvc exp remove {name}`) or choose another row name")
        refuse_test_numbers(ref, name)
        log(f"{name}: already run with these params and code, not run again")
        return run.row
    ref = run_experiment(name, name, overrides, targets, baseline)
    run = read_run(git_reader(ref), f"experiment {name}", make=make_numbers)
    diff = sum(Config(run.params, run.code).differences(wanted), [])
    if diff:
        raise AblationError(f"experiment {name} ran with other params or code than asked ({', '.join(diff)})")
    refuse_test_numbers(ref, name)
    return run.row


def check_trained_once(numbers: dict[str, dict], row: str) -> None:
    """The three evaluations must be of one training run: the same train outputs in every dvc.lock."""
    first, *others = numbers.items()
    for tta, n in others:
        if n["train_outs"] != first[1]["train_outs"]:
            changed = sorted(p for p in n["train_outs"].keys() | first[1]["train_outs"].keys()
                             if n["train_outs"].get(p) != first[1]["train_outs"].get(p))
            raise AblationError(f"row {row}: the evaluation with evaluate.tta={tta} ({experiment_name(row, tta)}) "
                                f"was not of the same training run ({', '.join(changed)} differ): the train stage "
                                "ran again instead of coming from DVC's run-cache; the row is not written")
        if n["tta"] != tta:
            raise AblationError(f"{experiment_name(row, tta)}: evaluated with TTA {n['tta']}, not {tta}")


# ---------------------------------------------------------------------------------------------- one row


def best_row(rows: pd.DataFrame) -> str:
    """`--on best`: the row with the highest validation accuracy with flip TTA (the earlier one on a tie)."""
    if rows.empty:
        raise AblationError(f"--on {BEST}: no row in {RUNS} yet")
    return str(rows.loc[rows["val_accuracy_flip"].astype(float).idxmax(), "row"])


def resolve_sets(rows: pd.DataFrame, sets: list[str], on: str | None) -> list[str]:
    if on is None:
        return cumulative_sets([], sets)
    if on == BEST:
        on = best_row(rows)
        log(f"--on {BEST}: row {on}")
    earlier = rows[rows["row"] == on]
    if earlier.empty:
        raise AblationError(f"--on {on}: no such row in {RUNS}")
    return cumulative_sets(parse_sets(earlier["set"].iloc[0]), sets)


def run_row(row: str, sets: list[str], seed: int = 0, val_size: int = VAL_SIZE, device: str | None = None,
            on: str | None = None) -> dict:
    """Train and evaluate one row (three evaluations of one training run); append it to runs.csv, rewrite table.md."""
    if not re.fullmatch(ROW_NAME, row) or row == BEST:
        raise AblationError(f"row name {row!r}: letters and digits, single '_', '.' or '-' between them (it names "
                            f"DVC experiments), and not {BEST!r}")
    if not Path("dvc.yaml").is_file() or not Path("params.yaml").is_file():
        raise AblationError("no dvc.yaml and params.yaml here: run the ablation from the repository root")
    if val_size <= 0:
        raise AblationError(f"--val-size: expected a number of images above 0, got {val_size}")
    check_sets(sets)
    rows = read_rows()
    refuse_name(rows, row)
    sets = resolve_sets(rows, sets, on)
    graph = dvc_yaml_graph()
    code = current_code(graph)
    code_hash = Config({}, code).code_hash
    refuse_existing(rows, row, sets, seed, val_size, code_hash)
    wanted = {tta: row_overrides(sets, seed, val_size, device, tta) for tta in TTAS}
    numbers, commit = numbers_with_dvc(row, wanted, code, graph)
    base = numbers["none"]
    new = {"row": row, "set": join_sets(sets), "seed": seed, "val_size": val_size,
           **{f"val_accuracy_{c}": numbers[tta]["val_accuracy"] for tta, c in TTAS.items()},
           "lr_max": base["lr_max"], "train_seconds": base["train_seconds"], "device": base["device"],
           "hardware": base["hardware"], "runner": RUNNER, "code_hash": code_hash, "commit": commit}
    rows = read_rows()  # again: another command may have added a row meanwhile
    refuse_existing(rows, row, sets, seed, val_size, code_hash)
    write_rows(pd.DataFrame(rows.to_dict("records") + [new], columns=COLUMNS))
    log(f"row {row}: validation accuracy " + ", ".join(f"{numbers[t]['val_accuracy']:.4f} ({t})" for t in TTAS)
        + f"; train {base['train_seconds']:.0f} s on {base['hardware']}; in {RUNS} and {TABLE}")
    return new


def numbers_with_dvc(row: str, wanted: dict[str, list[str]], code: dict, graph: dict) -> tuple[dict, str]:
    """The row's three evaluations as DVC experiments (one training run, from DVC's run-cache after the first)."""
    check_tracked(code)
    targets = row_targets(graph)
    configs = {tta: Config(wanted_params(o), code) for tta, o in wanted.items()}  # validates first
    baseline = head()
    numbers = {tta: experiment(experiment_name(row, tta), wanted[tta], configs[tta], targets, baseline)
               for tta in TTAS}
    check_trained_once(numbers, row)
    return numbers, baseline


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.lab.ablation", description=first, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", help="the row's name (letters, digits, single _ . -): experiments ablation-ROW...")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override, as `dvc exp run -S` takes it (repeatable): the trick(s) of the row")
    parser.add_argument("--on", metavar="ROW",
                        help="an earlier row whose set comes first (the cumulative set); `best`: the row with the "
                             "highest validation accuracy with flip TTA so far")
    parser.add_argument("--seed", type=int, default=0, help="the seed (default 0)")
    parser.add_argument("--val-size", type=int, default=VAL_SIZE,
                        help=f"data.val_size: training images held out for validation (default {VAL_SIZE})")
    parser.add_argument("--device", help="train.device for the run (cuda, cpu, mps, auto)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: one_line(lambda: run_row(args.row, args.set, args.seed, args.val_size,
                                                              args.device, args.on)),
                       f"no row written; run the same command again (finished experiments of row {args.row} "
                       "are reused)")


if __name__ == "__main__":
    sys.exit(main())
