"""Ablation: one row per recipe variant, chosen on the validation split, into studies/ablation/ (runs.csv, table.md).

    python -m cifar_resnet.ablation ROW [--set key=value ...] [--on EARLIER_ROW] [--seed 0] [--device cuda]
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

The plan (issue 20, "Choosing"): at most about five 24-epoch training runs, cumulative (each row adds one trick to
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

The table's numbers are validation
accuracies; the test split is for the one final run of the chosen recipe, outside this command.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import pandas as pd

from cifar_resnet import study
from cifar_resnet.atomic import atomic_path, write_text
from cifar_resnet.config import read_yaml
from cifar_resnet.entry import run_command
from cifar_resnet.errors import CifarResnetError
from cifar_resnet.paths import EVALUATE_JSON, TRAIN_HISTORY, TRAIN_JSON, TRAIN_TIMING

FOLDER = study.STUDIES / "ablation"
RUNS = FOLDER / "runs.csv"
TABLE = FOLDER / "table.md"
PREFIX = "ablation-"
VAL_SIZE = 5000
# evaluate.tta value -> the runs.csv column suffix and the experiment name suffix (none: the row's own name)
TTAS = {"none": "none", "flip": "flip", "flip+translate": "flip_translate"}
COLUMNS = ["row", "set", "seed", "val_size", *(f"val_accuracy_{c}" for c in TTAS.values()), "lr_max",
           "train_seconds", "device", "hardware", "runner", "code_hash", "commit"]
TEXT_COLUMNS = {"row": str, "set": str, "device": str, "hardware": str, "runner": str, "code_hash": str,
                "commit": str}
RUNNER = "dvc exp run"  # runs.csv's `runner`: earlier rows name another way they ran
BEST = "best"  # --on best: the row with the highest validation accuracy with flip TTA so far
# Keys this command sets itself: --set may not give them.
CONTROLLED = {"seed": "--seed", "data.val_size": "--val-size", "train.eval_split": "(always val)",
              "evaluate.split": "(always val)", "evaluate.tta": "(every row has all three)", "train.device": "--device"}
# Row names: study names without doubled or trailing separators, so ROW--flip can never be another row's name.
ROW_NAME = r"[A-Za-z0-9]+(?:[_.-][A-Za-z0-9]+)*"


class AblationError(CifarResnetError):
    """A row cannot be made: bad arguments, a row that exists, a run that trained twice or made a test number."""


say = study.say


# ---------------------------------------------------------------------------------------------- the row's params


def parse_sets(text: str) -> list[str]:
    """runs.csv's `set` cell back to the list of overrides (shlex: quoting survives the round trip)."""
    return shlex.split(text)


def join_sets(sets: list[str]) -> str:
    return shlex.join(sets)


def cumulative_sets(earlier: list[str], sets: list[str]) -> list[str]:
    """`earlier` then `sets`; a key given again takes the later value, in the place of its first mention."""
    merged: dict[str, str] = {}
    for override in [*earlier, *sets]:
        merged[study.set_key(override)] = override
    return list(merged.values())


def check_sets(sets: list[str]) -> None:
    for override in sets:
        if "=" not in override and not override.startswith("~"):
            raise AblationError(f"--set {override}: expected KEY=VALUE")
        key = study.set_key(override)
        if key in CONTROLLED:
            raise AblationError(f"--set {override}: {key} is the command's own ({CONTROLLED[key]})")


def row_overrides(sets: list[str], seed: int, val_size: int, device: str | None, tta: str) -> list[str]:
    """What `dvc exp run -S` gets for one evaluation of the row: its set, then the keys the command controls."""
    return [*sets, f"seed={seed}", f"data.val_size={val_size}", "train.eval_split=val", "evaluate.split=val",
            *([f"train.device={device}"] if device else []), f"evaluate.tta={tta}"]


def experiment_name(row: str, tta: str) -> str:
    return PREFIX + row + ("" if tta == "none" else "--" + tta.replace("+", "-"))


# ---------------------------------------------------------------------------------------------- runs.csv and table


def read_rows(path: Path = RUNS) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path, dtype=TEXT_COLUMNS, float_precision="round_trip", keep_default_na=False,
                       na_values={c: [""] for c in COLUMNS if c not in TEXT_COLUMNS})


def refuse_existing(rows: pd.DataFrame, row: str, sets: list[str], seed: int, val_size: int,
                    code_hash: str) -> None:
    """A row name is used once; a configuration (set, seed, val_size, code) is run once, whatever the row's name.
    The same set on other code (a fixed bug) is a new row beside the old one, which stays in the table."""
    refuse_name(rows, row)
    for _, r in rows.iterrows():
        if sorted(parse_sets(r["set"])) == sorted(sets) and int(r["seed"]) == seed and \
                int(r["val_size"]) == val_size and r["code_hash"] == code_hash:
            raise AblationError(f"row {r['row']} in {RUNS} already has this set, seed {seed} and val_size "
                                f"{val_size} on this code ({code_hash}): a configuration is run once")


def refuse_name(rows: pd.DataFrame, row: str) -> None:
    same = rows[rows["row"] == row]
    if not same.empty:
        raise AblationError(f"row {row} is already in {RUNS} (seed {same['seed'].iloc[0]}): a row is run once, "
                            "never again to improve its number; choose another row name")


def write_rows(rows: pd.DataFrame) -> None:
    """runs.csv (first: the row is what matters), then table.md made from runs.csv as written; each atomic."""
    with atomic_path(RUNS) as tmp:
        rows[COLUMNS].to_csv(tmp, index=False)
    write_text(TABLE, markdown_table(read_rows(RUNS)))


def table_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The README's columns, as text: accuracies in %, the wall time in seconds (and minutes)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    def percent(value) -> str:
        return "" if pd.isna(value) else f"{100 * float(value):.2f} %"

    def seconds(value) -> str:
        if pd.isna(value):
            return ""
        s = float(value)
        return f"{s:.0f} s" + (f" ({s / 60:.1f} min)" if s >= 120 else "")

    return pd.DataFrame({
        "row": [cell(r) for r in rows["row"]],
        "cumulative set": [cell(f"`{s}`") if s else "(params.yaml)" for s in rows["set"]],
        "seed": [str(int(s)) for s in rows["seed"]],
        "val images": [str(int(n)) for n in rows["val_size"]],
        "val acc, no TTA": [percent(v) for v in rows["val_accuracy_none"]],
        "flip TTA": [percent(v) for v in rows["val_accuracy_flip"]],
        "flip+translate TTA": [percent(v) for v in rows["val_accuracy_flip_translate"]],
        "LRMAX": [f"{float(v):.4g}" for v in rows["lr_max"]],
        "train wall time": [seconds(v) for v in rows["train_seconds"]],
        "hardware": [cell(hardware_name(h)) for h in rows["hardware"]],
        "run by": [cell(r) for r in rows["runner"]],
    }, columns=["row", "cumulative set", "seed", "val images", "val acc, no TTA", "flip TTA", "flip+translate TTA",
                "LRMAX", "train wall time", "hardware", "run by"])


def hardware_name(text: str) -> str:
    """runs.csv's hardware cell for the table: rows written before study.hardware_of joined a GPU list hold the
    list's repr (['NVIDIA H200']); the table shows the names."""
    if text.startswith("[") and text.endswith("]"):
        return ", ".join(name.strip().strip("'\"") for name in text[1:-1].split(","))
    return text


def pipe_table(frame: pd.DataFrame) -> str:
    """A markdown pipe table: pandas' to_markdown (tabulate, which dvc requires) or, without it, the same plainly."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        widths = {c: max([len(c), *(len(v) for v in frame[c])]) for c in frame.columns}
        lines = ["| " + " | ".join(c.ljust(widths[c]) for c in frame.columns) + " |",
                 "|" + "|".join(":" + "-" * (widths[c] + 1) for c in frame.columns) + "|"]
        lines += ["| " + " | ".join(str(v).ljust(widths[c]) for c, v in zip(frame.columns, values)) + " |"
                  for values in frame.itertuples(index=False)]
        return "\n".join(lines)
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True)


def markdown_table(rows: pd.DataFrame) -> str:
    return (f"<!-- Made by `python -m cifar_resnet.ablation` from {RUNS.name}; do not edit: run a row instead. -->\n\n"
            + pipe_table(table_frame(rows)) + "\n\n"
            "Validation accuracy on the `val images` held out of the training set (data.val_size), for one seed, "
            "with the model of one training run evaluated without test-time augmentation, with flip TTA and with "
            "flip x {0, +-1 px} TTA; no test accuracy was computed for any row. Each row's set is cumulative "
            f"(params.yaml, then these overrides). LRMAX, code hash and commit of each row: {RUNS.name}.\n")


# ---------------------------------------------------------------------------------------------- reading a run


def make_numbers(read, seed, code: dict, source: str) -> dict:
    """`study.read_run`'s row maker for an ablation experiment: its validation numbers (a refusal of any test number
    it holds), and the train stage's outputs as its dvc.lock records them."""
    lock = read_yaml(read("dvc.lock").decode())["stages"]["train"]
    return {**validation_numbers(read, code, source), "train_outs": {o["path"]: o.get("md5") for o in lock["outs"]}}


def validation_numbers(read, code: dict, source: str) -> dict:
    """The validation numbers of a run whose files `read` gives; AblationError if it holds any test number."""
    evaluate, train, timing = (study.load_file(read, rel.as_posix(), json.loads, source)
                               for rel in (EVALUATE_JSON, TRAIN_JSON, TRAIN_TIMING))
    history = read(TRAIN_HISTORY.as_posix())
    columns = history.decode().split("\n", 1)[0].split("\t") if history is not None else []
    tests = sorted({k for k in evaluate if k in ("accuracy", "loss")} | {k for k in train if k.startswith("test_")}
                   | {c for c in columns if c.startswith("test_")})
    if tests:
        raise AblationError(f"{source} holds test numbers ({', '.join(tests)}): choosing must not see the test "
                            "split; the row is not written")
    if history is None or "val_accuracy" not in evaluate or evaluate.get("split") != "val":
        raise AblationError(f"{source}: no validation accuracy in {EVALUATE_JSON} (or no {TRAIN_HISTORY})")
    return {"val_accuracy": float(evaluate["val_accuracy"]), "tta": evaluate.get("tta", "none"),
            "lr_max": float(train["lr_max"]), "train_seconds": float(timing["seconds_total"]),
            "device": str(timing.get("device", "")), "hardware": study.hardware_of(timing),
            "code_hash": study.code_hash(code)}


def test_numbers(read, paths: list[str]) -> list[str]:
    """'file: what' for each test number in the text files `paths` (read by `read`): a file or column named test_*,
    a JSON key test_* at any depth or a top-level accuracy or loss (the evaluate stage's test keys), a TSV or CSV
    column test_*."""
    found = []
    for path in paths:
        data = read(path)
        if data is None:
            continue
        if Path(path).name.startswith("test_"):
            found.append(f"{path}: its name")
        elif path.endswith(".json"):
            try:
                tree = json.loads(data.decode())
            except ValueError:
                continue
            keys = [k for k in (study.flatten(tree) if isinstance(tree, dict) else {})
                    if k in ("accuracy", "loss") or any(part.startswith("test_") for part in k.split("."))]
            found += [f"{path}: {k}" for k in keys]
        elif path.endswith((".tsv", ".csv")):
            header = data.decode(errors="replace").split("\n", 1)[0].replace(",", "\t").split("\t")
            found += [f"{path}: column {c}" for c in header if c.strip().startswith("test_")]
    return found


def row_output_files(ref: str, names=("train", "evaluate")) -> list[str]:
    """The git files (uncached metrics and plots) among the outputs that the row's stages wrote in experiment
    `ref`, folders listed file by file."""
    lock = read_yaml(study.git("show", f"{ref}:dvc.lock").stdout) or {}
    outs = [o["path"] for name in names for o in (lock.get("stages") or {}).get(name, {}).get("outs") or []]
    if not outs:
        return []
    return study.git("ls-tree", "-r", "--name-only", ref, "--", *outs).stdout.split()


def refuse_test_numbers(ref: str, name: str) -> None:
    found = test_numbers(study.git_reader(ref), row_output_files(ref))
    if found:
        raise AblationError(f"experiment {name} holds test numbers ({'; '.join(found)}): choosing must not see the "
                            "test split; the row is not written")


def differences(params: dict, code: dict, wanted: study.Config) -> list[str]:
    keys = sorted(k for k in params.keys() | wanted.params.keys() if params.get(k, ...) != wanted.params.get(k, ...))
    paths = sorted(p for p in code.keys() | wanted.code.keys() if code.get(p) != wanted.code.get(p))
    return keys + paths


def experiment(name: str, overrides: list[str], wanted: study.Config, targets: list[str], baseline: str) -> dict:
    """The numbers of experiment `name`: a finished one with exactly these params and code, else a new run."""
    ref = study.exp_ref(baseline, name)
    if study.ref_exists(ref):
        try:
            run = study.read_run(study.git_reader(ref), f"experiment {name}", make=make_numbers)
        except study.StaleRun as exc:
            raise AblationError(f"experiment {name} exists but is not usable ({exc}): remove it "
                                f"(`dvc exp remove {name}`) and run the row again") from None
        diff = differences(run.params, run.code, wanted)
        if diff:
            raise AblationError(f"experiment {name} exists with other params or code ({', '.join(diff)}): remove it "
                                f"(`dvc exp remove {name}`) or choose another row name")
        refuse_test_numbers(ref, name)
        say(f"{name}: already run with these params and code, not run again")
        return run.row
    ref = study.run_experiment(name, name, overrides, targets, baseline)
    run = study.read_run(study.git_reader(ref), f"experiment {name}", make=make_numbers)
    diff = differences(run.params, run.code, wanted)
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
        say(f"--on {BEST}: row {on}")
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
    graph = study.dvc_yaml_graph()
    code = study.current_code(graph)
    code_hash = study.code_hash(code)
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
    say(f"row {row}: validation accuracy " + ", ".join(f"{numbers[t]['val_accuracy']:.4f} ({t})" for t in TTAS)
        + f"; train {base['train_seconds']:.0f} s on {base['hardware']}; in {RUNS} and {TABLE}")
    return new


def numbers_with_dvc(row: str, wanted: dict[str, list[str]], code: dict, graph: dict) -> tuple[dict, str]:
    """The row's three evaluations as DVC experiments (one training run, from DVC's run-cache after the first)."""
    study.check_tracked(code)
    targets = study.row_targets(graph)
    configs = {tta: study.Config(study.wanted_params(o), code) for tta, o in wanted.items()}  # validates first
    baseline = study.head()
    numbers = {tta: experiment(experiment_name(row, tta), wanted[tta], configs[tta], targets, baseline)
               for tta in TTAS}
    check_trained_once(numbers, row)
    return numbers, baseline


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.ablation", description=first, epilog=rest,
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
    return run_command(lambda: study.one_line(lambda: run_row(args.row, args.set, args.seed, args.val_size,
                                                              args.device, args.on)),
                       f"no row written; run the same command again (finished experiments of row {args.row} "
                       "are reused)")


if __name__ == "__main__":
    sys.exit(main())
