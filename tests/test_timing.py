"""The stages' part timer (cifar_resnet.timing), the process age it starts from, and the lab's table of a repro's
timing files. Structural relations only: no wall-time value is asserted."""

from __future__ import annotations

import json
import os
import time

import pytest

from cifar_resnet import bootstrap
from cifar_resnet.lab import repro_timing
from cifar_resnet.timing import PARTS, PartTimer


def test_parts_are_recorded_in_order_after_the_process_start_and_sum_to_at_most_the_total():
    timer = PartTimer()
    with timer.part("data"):
        pass
    with timer.part("training"):
        sum(range(10_000))
    with timer.part("data"):  # a name used again adds up, in its first place
        pass
    record = timer.record()
    assert list(record["parts"]) == ["process_start", "data", "training"]
    assert all(v >= 0 for v in record["parts"].values())
    assert record["parts"]["process_start"] > 0  # the interpreter started before this test
    assert sum(record["parts"].values()) <= record["total"]


def test_parts_do_not_nest_and_take_only_the_known_names():
    timer = PartTimer()
    with timer.part("data"):
        with pytest.raises(RuntimeError, match="'training' started inside part 'data'"):
            with timer.part("training"):
                pass
    with timer.part("training"):  # the refused one left no part open
        pass
    with pytest.raises(ValueError, match="'compile' is not one of"):
        with timer.part("compile"):
            pass
    assert list(timer.record()["parts"]) == ["process_start", "data", "training"]


def test_a_part_that_raises_still_counts_and_closes():
    timer = PartTimer()
    with pytest.raises(KeyError):
        with timer.part("evaluation"):
            raise KeyError("x")
    with timer.part("figures"):
        pass
    assert list(timer.record()["parts"]) == ["process_start", "evaluation", "figures"]


def test_the_device_is_synchronised_before_each_clock_reading():
    calls = []
    timer = PartTimer(sync=lambda: calls.append("sync"))
    with timer.part("training"):
        calls.append("work")
    assert calls == ["sync", "work", "sync"]  # the part's queued work is charged to it
    timer.record()
    assert calls[-1] == "sync" and len(calls) == 4


def test_the_file_holds_the_parts_twice_in_order_and_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "timing" / "evaluate.json"
    timer = PartTimer()
    for name in ("outputs", "data", "evaluation"):  # any order: the file keeps the order they were timed in
        with timer.part(name):
            pass
    timer.write(path)
    written = json.loads(path.read_text())
    assert [r["part"] for r in written["per_part"]] == ["process_start", "outputs", "data", "evaluation"]
    assert {r["part"]: r["seconds"] for r in written["per_part"]} == written["parts"]
    assert sum(written["parts"].values()) <= written["total"]
    before = path.read_bytes()

    def no_room(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_room)
    with pytest.raises(Exception, match="evaluate.json: cannot be written"):
        timer.write(path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["evaluate.json"]


def test_process_age_comes_from_the_kernel_and_else_from_the_first_import(monkeypatch, tmp_path):
    since_import = time.perf_counter() - bootstrap._IMPORTED_AT
    assert bootstrap.seconds_since_start() >= since_import - 0.02  # the kernel's 10 ms ticks
    monkeypatch.setattr(bootstrap, "Path", lambda _: tmp_path / "no-proc")  # a system without /proc
    fallback = bootstrap.seconds_since_start()
    assert since_import <= fallback <= time.perf_counter() - bootstrap._IMPORTED_AT


def test_the_repro_table_lists_each_stage_in_pipeline_order_with_a_sum_row(tmp_path, capsys):
    records = {"gallery": ({"process_start": 1.0, "data": 0.5, "figures": 2.0}, 4.0),
               "train": ({"process_start": 2.0, "data": 1.0, "training": 20.0, "outputs": 0.25}, 24.0)}
    for stage, (parts, total) in records.items():
        (tmp_path / f"{stage}.json").write_text(json.dumps({"parts": parts, "total": total, "seconds_total": 99}))
    assert repro_timing.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["stage", "process_start", "data", "training", "figures", "outputs", "other", "total"]
    assert lines[1].split() == ["train", "2.00", "1.00", "20.00", "0.25", "0.75", "24.00"]  # no figures cell
    assert lines[2].split() == ["gallery", "1.00", "0.50", "2.00", "0.50", "4.00"]
    assert lines[3].split() == ["sum", "3.00", "1.50", "20.00", "2.00", "0.25", "1.25", "28.00"]
    assert set(PARTS) >= {"process_start", "data", "training", "figures", "outputs"}


def test_the_repro_table_says_when_there_is_nothing_to_show(tmp_path, capsys):
    assert repro_timing.main([str(tmp_path)]) == 1
    assert "run `dvc repro` first" in capsys.readouterr().out
