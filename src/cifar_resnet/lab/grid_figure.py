"""A grid study's figure: validation accuracy against the grid value (log axis), one dot per run, the median per
value as a line, the good region shaded, and each seed's range-test pick (and their median) on the same axis."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cifar_resnet.atomic import atomic_path


def sweep_figure(path: Path, name: str, key: str, rows: pd.DataFrame, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ok = rows[rows["status"] == "ok"]
    for i, seed in enumerate(sorted({int(s) for s in rows["seed"]})):
        mine = ok[ok["seed"] == seed]
        ax.plot(mine[key].astype(float), mine["val_accuracy"].astype(float) * 100, "o", alpha=0.7,
                color=colours[i % len(colours)], label=f"seed {seed}")
    medians = [(v[key], v["val_accuracy"]["median"] * 100) for v in summary["values"] if "val_accuracy" in v]
    if medians:
        ax.plot(*zip(*medians), "-", color="black", label="median")
    for v in summary["values"]:
        if v["failed"]:
            ax.axvline(v[key], color="red", linestyle=":", alpha=0.6)
    region = summary["region"]
    if region is not None:
        label = "good region (within 0.2 points of the best median)"
        if region["low"] < region["high"]:
            ax.axvspan(region["low"], region["high"], color="green", alpha=0.15, label=label)
        else:  # one value: a band would have no width
            ax.axvline(region["low"], color="green", alpha=0.25, linewidth=10, label=label)
    for i, pick in enumerate(summary["picks"]):
        if pick["pick"] is not None:
            ax.axvline(pick["pick"], color=colours[i % len(colours)], linestyle="--", alpha=0.8,
                       label=f"range-test pick, seed {pick['seed']}")
    if summary["verdict"] is not None:
        ax.axvline(summary["verdict"]["median_pick"], color="black", linestyle="--", linewidth=2,
                   label="median pick")
    ax.set_xscale("log")
    values = [v[key] for v in summary["values"]]
    ax.set_xticks(values, labels=[f"{v:g}" for v in values])  # the grid's own values, not powers of ten
    ax.minorticks_off()
    ax.set(xlabel=key, ylabel="validation accuracy (%)",
           title=f"study {name}: {summary['n']} runs, {summary['failed']} failed")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    with atomic_path(path) as tmp:  # no version stamp: the same rows draw the same bytes
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
