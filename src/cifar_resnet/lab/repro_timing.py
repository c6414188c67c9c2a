"""`python -m cifar_resnet.lab.repro_timing [FOLDER]`: the stages' wall time by part after a `dvc repro`.

Reads timing/<stage>.json of every stage that ran (cifar_resnet.timing writes them) and prints one table: a row per
stage in pipeline order, a column per part in PARTS order, `other` (the total less its parts: the stage's glue), the
stage's total, and a last row summing each column.
A stage with no file (not run, or restored from DVC's cache) has no row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar_resnet.timing import PARTS

STAGES = ("lr_range_test", "train", "evaluate", "gallery")  # check_params and download keep no timing file


def read_timings(folder: Path) -> dict[str, dict]:
    """{stage: {"parts": {...}, "total": seconds}} for each stage whose timing file is in `folder`."""
    found = {}
    for stage in STAGES:
        path = folder / f"{stage}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            found[stage] = {"parts": record.get("parts", {}), "total": record.get("total")}
    return found


def table(timings: dict[str, dict]) -> str:
    """Seconds per stage and part, with the sum of each column; a blank cell: the stage has no such part."""
    columns = [p for p in PARTS if any(p in t["parts"] for t in timings.values())]
    header = ["stage", *columns, "other", "total"]
    rows = [[stage, *[t["parts"].get(p) for p in columns], t["total"] - sum(t["parts"].values()), t["total"]]
            for stage, t in timings.items()]
    rows.append(["sum", *[sum(r[i] or 0 for r in rows) for i in range(1, len(header))]])
    cells = [header] + [[r[0], *("" if v is None else f"{v:.2f}" for v in r[1:])] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.lab.repro_timing",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="timing", type=Path, help="the timing folder (default: timing)")
    args = parser.parse_args(argv)
    timings = read_timings(args.folder)
    if not timings:
        print(f"no timing/<stage>.json in {args.folder}: run `dvc repro` first")
        return 1
    print(table(timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
