"""The generation benchmarks run end to end on a CPU (tiny models, a few tokens)."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "generation"))


def test_latency_writes_one_row_per_model(tmp_path):
    from latency import main

    rows = main(["--size", "tiny", "--models", "gsa,transformer", "--prefix", "24", "--tokens", "5",
                 "--vocab", "512", "--device", "cpu", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["gsa", "transformer"]
    for r in rows:
        for key in ("prefill_ms", "token_ms", "token_p90_ms", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["token_p90_ms"] >= r["token_ms"]
    with open(tmp_path / "generation_latency.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [w["model"] for w in written] == ["gsa", "transformer"]
    assert float(written[0]["token_ms"]) == rows[0]["token_ms"]
