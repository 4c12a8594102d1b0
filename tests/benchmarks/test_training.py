"""The training benchmark runs end to end on a CPU (tiny models, a few steps) and summarizes its rounds."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "training"))


def test_repeats_interleave_models(tmp_path):
    from bench_training import main

    rows = main(["--size", "tiny", "--models", "gsa,gla", "--repeats", "2", "--steps", "2", "--warmup", "1",
                 "--vocab", "256", "--T", "32", "--tokens", "64", "--device", "cpu", "--out", str(tmp_path)])
    # round 0 in the given order, round 1 reversed
    assert [(r["round"], r["model"]) for r in rows] == [(0, "gsa"), (0, "gla"), (1, "gla"), (1, "gsa")]
    for r in rows:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
        assert 0 < r["step_ms_min"] <= r["step_ms_max"], r
        assert r["finite"] and r["B"] == 2 and r["T"] == 32
    # the same seed builds the same model: both rounds of a model see the same losses
    assert rows[0]["loss_first"] == rows[3]["loss_first"] and rows[1]["loss_last"] == rows[2]["loss_last"]
    with open(tmp_path / "bench_training.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [(int(w["round"]), w["model"]) for w in written] == [(0, "gsa"), (0, "gla"), (1, "gla"), (1, "gsa")]


def test_summary_takes_medians_and_per_round_ratios():
    from bench_training import summarize

    def row(model, k, tps):
        return dict(model=model, round=k, tokens_per_s=tps, peak_gib=1.0 + k, finite=True)

    rows = [row("gsa", 0, 130.0), row("fla-gsa", 0, 100.0), row("fla-gsa", 1, 90.0), row("gsa", 1, 126.0),
            row("gsa", 2, 110.0), row("fla-gsa", 2, 100.0)]
    by = {s["model"]: s for s in summarize(rows)}
    assert by["gsa"]["tokens_per_s"] == 126.0 and by["gsa"]["tokens_per_s_min"] == 110.0
    assert by["gsa"]["tokens_per_s_max"] == 130.0 and by["gsa"]["peak_gib"] == 3.0
    assert by["gsa"]["ratios"] == pytest.approx([1.3, 1.4, 1.1])
    assert by["gsa"]["ratio"] == pytest.approx(1.3)  # median of the per-round ratios, not a ratio of medians
    assert "ratio" not in by["fla-gsa"] and by["fla-gsa"]["runs"] == 3
    # without the baseline there is nothing to divide by
    assert all("ratio" not in s for s in summarize([row("gsa", 0, 1.0), row("gla", 0, 2.0)]))
