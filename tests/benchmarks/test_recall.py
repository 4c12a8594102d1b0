"""The MQAR benchmark (benchmarks/recall): the generator's statistics against Zoology's definition,
the state-size bookkeeping, and the trainer's CPU smoke run (CSV columns, sane values, resume)."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.recall.models import DEFAULT_GRID, KINDS, ModelSpec, build_model, state_size  # noqa: E402
from benchmarks.recall.mqar import (IGNORE_INDEX, MQARSlice, hf_labels, make_split, multiquery_ar,  # noqa: E402
                                    power_law_weights, split_seed)

V = 8192


def chi2_bound(df: int, z: float = 6.0) -> float:
    """A loose upper bound on a chi-square statistic with ``df`` degrees of freedom (Wilson-Hilferty
    at ``z`` standard deviations): a correct generator exceeds it with probability ~1e-9."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs``, bins with an expectation under 5 merged."""
    counts, probs = counts.double(), probs.double()
    expected = probs / probs.sum() * counts.sum()
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().reshape(1)]) if (~keep).any() else counts
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)]) if (~keep).any() else expected
    return float(((obs - exp) ** 2 / exp).sum()), obs.numel() - 1


# -- the sequences ------------------------------------------------------------------------------

@pytest.mark.parametrize("T,n", [(64, 4), (64, 16), (128, 8), (256, 16), (256, 64), (512, 64)])
def test_layout_ranges_and_labels(T, n):
    d = multiquery_ar(300, T, n, vocab_size=V, seed=7)
    x, y, keys, values = d.inputs, d.targets, d.keys, d.values
    assert x.shape == y.shape == (300, T) and x.dtype == y.dtype == torch.long
    # the context: k1 v1 k2 v2 ..., keys in [1, V/2), values in [V/2, V), distinct within a sequence
    assert torch.equal(x[:, 0:2 * n:2], keys) and torch.equal(x[:, 1:2 * n:2], values)
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    for row in (keys, values):
        assert (row.sort(1).values.diff(dim=1) != 0).all(), "repeated key or value in a sequence"
    assert (x >= 0).all() and (x < V).all()
    # labels exactly at the query positions (one per key, in the query region, even offsets) ...
    pos = d.query_positions
    assert pos.min() >= 2 * n and pos.max() <= T - 2 and ((pos - 2 * n) % 2 == 0).all()
    labeled = y != IGNORE_INDEX
    assert labeled.sum(1).eq(n).all()
    expect = torch.zeros_like(labeled).scatter_(1, pos, True)
    assert torch.equal(labeled, expect)
    # ... where the input is the key, and the label its value from the context
    assert torch.equal(x.gather(1, pos), keys)
    assert torch.equal(y.gather(1, pos), values)
    # recall from the context itself: for every labeled position, the value that followed that key
    b, t = labeled.nonzero(as_tuple=True)
    ctx_key_pos = (x[b, :2 * n:2] == x[b, t].unsqueeze(1)).float().argmax(1) * 2
    assert torch.equal(x[b, ctx_key_pos + 1], y[b, t])


def test_zoology_example_layout():
    # Zoology's docstring example (2 pairs, 16 tokens, no random fill): outside the context and the
    # queries every input is 0, and only the queries carry labels
    d = multiquery_ar(50, 16, 2, vocab_size=20, seed=3, random_non_queries=False)
    rest = torch.ones_like(d.inputs, dtype=torch.bool)
    rest[:, :4] = False
    rest.scatter_(1, d.query_positions, False)
    assert (d.inputs[rest] == 0).all() and (d.inputs[~rest] != 0).all()
    assert (d.targets[rest] == IGNORE_INDEX).all() and (d.targets[:, :4] == IGNORE_INDEX).all()


def test_random_fill_is_uniform_over_the_vocabulary():
    d = multiquery_ar(2000, 64, 4, vocab_size=64 * 2 + 2, seed=5)
    filler = torch.ones_like(d.inputs, dtype=torch.bool)
    filler[:, :8] = False
    filler.scatter_(1, d.query_positions, False)
    tokens = d.inputs[filler]
    counts = torch.bincount(tokens, minlength=130)
    stat, df = chi2(counts, torch.ones(130))
    assert stat < chi2_bound(df), f"filler tokens not uniform: chi2 {stat:.1f} (df {df})"


def test_keys_and_values_are_uniform():
    n, N = 4, 20_000
    d = multiquery_ar(N, 32, n, vocab_size=64, seed=11)
    key_counts = torch.bincount(d.keys.flatten(), minlength=32)
    assert key_counts[0] == 0
    stat, df = chi2(key_counts[1:], torch.ones(31))
    assert stat < chi2_bound(df), f"keys not uniform over [1, V/2): chi2 {stat:.1f}"
    stat, df = chi2(torch.bincount(d.values.flatten() - 32, minlength=32), torch.ones(32))
    assert stat < chi2_bound(df), f"values not uniform over [V/2, V): chi2 {stat:.1f}"
    # every position of the context is uniform too (the order within a sequence is random)
    for j in range(n):
        stat, df = chi2(torch.bincount(d.keys[:, j], minlength=32)[1:], torch.ones(31))
        assert stat < chi2_bound(df), f"key slot {j} not uniform: chi2 {stat:.1f}"


# -- power-law query placement -------------------------------------------------------------------

def test_power_law_weights():
    p = power_law_weights(100, 0.01)
    i = torch.arange(1, 101, dtype=torch.float64)
    ref = 0.01 * i ** -0.99
    torch.testing.assert_close(p, ref / ref.sum())
    assert p.sum().item() == pytest.approx(1.0)
    assert (p.diff() < 0).all()
    assert p[0] / p[1] == pytest.approx(2 ** 0.99)
    # a = 1 is Zoology's "uniform" switch
    torch.testing.assert_close(power_law_weights(10, 1.0), torch.full((10,), 0.1, dtype=torch.float64))


def test_single_query_gap_follows_the_power_law():
    # with one pair, the query's gap is one draw from the weights: a direct goodness-of-fit test
    T, N = 256, 40_000
    d = multiquery_ar(N, T, 1, vocab_size=V, seed=21)
    space = (T - 2) // 2
    counts = torch.bincount(d.gaps.flatten(), minlength=space)
    stat, df = chi2(counts, power_law_weights(space))
    assert stat < chi2_bound(df), f"query gaps do not follow p ∝ i^-0.99: chi2 {stat:.1f} (df {df})"
    # and the mass at small gaps is what a = 0.01 implies (~17% at gap 0 for 127 slots)
    p0 = power_law_weights(space)[0].item()
    assert abs(counts[0].item() / N - p0) < 6 * math.sqrt(p0 * (1 - p0) / N)


@pytest.mark.parametrize("T,n", [(64, 8), (256, 16)])
def test_query_gaps_match_zoology_sampling(T, n):
    """Many queries: gaps are drawn *without replacement*, in draw order (the j-th draw goes with the
    j-th key), as np.random.choice(space, n, replace=False, p=p) does in Zoology. Compare, per draw
    index j and per gap, our frequencies with those of that reference."""
    np = pytest.importorskip("numpy")
    N = 6000
    d = multiquery_ar(N, T, n, vocab_size=V, seed=31)
    space = (T - 2 * n) // 2
    gaps = d.gaps
    assert ((gaps >= 0) & (gaps < space)).all()
    assert (gaps.sort(1).values.diff(dim=1) != 0).all(), "a gap drawn twice in one sequence"
    p = power_law_weights(space).numpy()
    rng = np.random.RandomState(1234)
    ref = torch.from_numpy(np.stack([rng.choice(space, size=n, replace=False, p=p) for _ in range(N)]))
    # two-sample chi-square on the inclusion counts and on the first and last draw's distribution
    for ours, theirs, what in [(gaps.flatten(), ref.flatten(), "all draws"),
                               (gaps[:, 0], ref[:, 0], "first draw"),
                               (gaps[:, -1], ref[:, -1], "last draw")]:
        a = torch.bincount(ours, minlength=space).double()
        b = torch.bincount(theirs, minlength=space).double()
        keep = (a + b) >= 10
        a = torch.cat([a[keep], a[~keep].sum().reshape(1)])
        b = torch.cat([b[keep], b[~keep].sum().reshape(1)])
        k1, k2 = math.sqrt(b.sum() / a.sum()), math.sqrt(a.sum() / b.sum())
        stat = float(((k1 * a - k2 * b) ** 2 / (a + b).clamp_min(1)).sum())
        df = a.numel() - 1
        assert stat < chi2_bound(df), f"{what}: gap distribution differs from Zoology's (chi2 {stat:.1f}, df {df})"
    # the power law shows: the first draw is mostly a small gap, later draws spread out
    assert gaps[:, 0].float().mean() < gaps[:, -1].float().mean()


# -- splits and seeds ----------------------------------------------------------------------------

def test_train_and_test_seeds_never_overlap():
    slices = [MQARSlice(t, n) for t in (64, 128, 256, 512) for n in (4, 8, 16, 32, 64) if 4 * n <= t]
    train = {split_seed("train", s, sl) for s in range(50) for sl in slices}
    test = {split_seed("test", s, sl) for s in range(50) for sl in slices}
    assert len(train) == len(test) == 50 * len(slices)  # no collisions within a split either
    assert not train & test
    assert all(x % 2 == 0 for x in train) and all(x % 2 == 1 for x in test)
    assert all(0 <= x < 2 ** 63 for x in train | test)
    with pytest.raises(ValueError, match="split"):
        split_seed("valid", 0, slices[0])


def test_train_and_test_sequences_are_disjoint():
    slices = [MQARSlice(64, 4), MQARSlice(256, 16)]
    train = make_split("train", slices, 3000, vocab_size=V, seed=0)
    test = make_split("test", slices, 500, vocab_size=V, seed=0)
    for a, b in zip(train, test):
        assert a.seed != b.seed
        seen = {tuple(r.tolist()) for r in a.inputs}
        assert not any(tuple(r.tolist()) in seen for r in b.inputs), f"test sequence found in train ({a.slice})"
        # not even the same context (key-value pairs in order)
        ctx = {tuple(r.tolist()) for r in a.inputs[:, :2 * a.slice.num_kv_pairs]}
        assert not any(tuple(r.tolist()) in ctx for r in b.inputs[:, :2 * b.slice.num_kv_pairs])


def test_deterministic_and_seed_sensitive():
    a = multiquery_ar(64, 128, 8, seed=3)
    b = multiquery_ar(64, 128, 8, seed=3)
    c = multiquery_ar(64, 128, 8, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=63, num_kv_pairs=4), "even"),
    (dict(seq_len=64, num_kv_pairs=17), "num_kv_pairs"),
    (dict(seq_len=64, num_kv_pairs=0), "num_kv_pairs"),
    (dict(seq_len=64, num_kv_pairs=4, vocab_size=64), "vocab_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multiquery_ar(4, **kwargs)


def test_slice_and_spec_parsing():
    assert MQARSlice.parse("256:16") == MQARSlice(256, 16) and str(MQARSlice(256, 16)) == "256:16"
    with pytest.raises(ValueError, match="seq_len:num_kv_pairs"):
        MQARSlice.parse("256")
    assert ModelSpec.parse("gsa:128:2:32") == ModelSpec("gsa", 128, 2, 32)
    assert ModelSpec.parse("gla:64:4") == ModelSpec("gla", 64, 4)
    for bad in ("gla:64:2:16", "gsa:64:2", "mamba:64:2", "gsa:64:3:8", "gsa:64"):
        with pytest.raises(ValueError):
            ModelSpec.parse(bad)


# -- models and state sizes ----------------------------------------------------------------------

def test_state_sizes_of_the_grid():
    T = 256
    sizes = {}
    for spec in DEFAULT_GRID:
        model = build_model(spec, vocab_size=256, max_len=T)
        assert model.config.num_hidden_layers == 2 and list(model.config.layer_types) == KINDS[spec.kind][2]
        H, K, M = spec.num_heads, spec.head_dim, spec.num_slots or 0
        per_layer = {"gsa": H * M * 2 * K, "abc": H * M * 2 * K + H * M, "gla": H * K * K,
                     "attention": 2 * H * K * T}
        expect = sum(per_layer[kind] for kind in model.config.layer_types)
        assert state_size(model, T) == expect, spec
        sizes.setdefault(spec.kind, []).append(expect)
        assert 64 <= spec.d_model <= 256
    for kind, s in sizes.items():
        assert len(s) >= 3 and s == sorted(s) and len(set(s)) == len(s), f"{kind}: {s}"
    # GSA at num_slots = head_dim / 2 matches GLA's state; attention is the largest at every width
    assert sizes["gsa"] == sizes["gla"]
    assert all(a > g for a, g in zip(sizes["attention"], sizes["gsa"]))


def test_recall_loss_equals_the_models_own_loss():
    """The trainer's loss (LM head at the query positions) is the model's loss with Hugging Face labels
    (``hf_labels``): same positions, same targets."""
    from benchmarks.recall.train import recall_logits
    d = multiquery_ar(4, 64, 8, vocab_size=512, seed=2)
    model = build_model(ModelSpec("gsa", 32, 2, 8), vocab_size=512, max_len=64).eval()
    with torch.no_grad():
        logits = recall_logits(model, d.inputs, d.query_positions)
        ours = torch.nn.functional.cross_entropy(logits.flatten(0, 1), d.values.flatten())
        theirs = model(input_ids=d.inputs, labels=hf_labels(d.targets)).loss
        full = model(input_ids=d.inputs).logits
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, full.gather(1, d.query_positions[..., None].expand(-1, -1, 512)))
    labels = hf_labels(d.targets)
    assert torch.equal(labels[:, 1:], d.targets[:, :-1]) and (labels[:, 0] == IGNORE_INDEX).all()


# -- the trainer ---------------------------------------------------------------------------------

EXPECTED_COLUMNS = ["model", "d_model", "num_heads", "num_slots", "state_size", "lr", "seq_len", "num_kv_pairs",
                    "accuracy", "correct", "total", "steps", "train_loss", "test_loss"]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_csv_and_resumes(tmp_path):
    out = tmp_path / "recall"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.recall.train", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[5/5]" in proc.stdout
    rows = _read(out / "results.csv")
    assert set(EXPECTED_COLUMNS) <= set(rows[0])
    assert {r["model"] for r in rows} == set(KINDS)
    assert len(rows) == 5 * 2  # 5 models x 2 test slices
    for r in rows:
        acc = float(r["accuracy"])
        assert 0.0 <= acc <= 1.0 and int(r["correct"]) == round(acc * int(r["total"]))
        assert int(r["total"]) == 32 * int(r["num_kv_pairs"])  # every query of every test sequence counted
        assert int(r["state_size"]) > 0 and int(r["steps"]) == 3
        assert math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["test_loss"]))
        assert float(r["test_loss"]) < 2 * math.log(8192)  # near log(V) untrained, never exploding
    states = {r["model"]: int(r["state_size"]) for r in rows if r["seq_len"] == "64"}
    assert states["attention"] == 2 * 2 * (2 * 16 * 64)  # 2 layers x KV cache 2·H·K·T
    assert states["gsa"] == 2 * (2 * 8 * 32) and states["gla"] == 2 * (2 * 16 * 16)
    plotted = (out / "mqar_accuracy_vs_state.png").exists()
    assert plotted or "plot skipped" in proc.stdout

    # resumable: the same command finds every run done and trains nothing
    from benchmarks.recall.train import main
    assert main(["--smoke", "--out", str(out), "--no-plot"]) == 0
    assert len(_read(out / "results.csv")) == len(rows)
    # a subset by flags adds only what is missing
    assert main(["--smoke", "--out", str(out), "--no-plot", "--models", "gsa", "--lrs", "0.01"]) == 0
    after = _read(out / "results.csv")
    assert len(after) == len(rows) + 2 and {r["model"] for r in after[len(rows):]} == {"gsa"}


def test_shards_split_the_runs_and_share_one_csv(tmp_path):
    """Two shard processes run at once into one folder: every run once, one header, nothing torn."""
    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.recall.train", "--smoke", "--out", str(out), "--no-plot"]
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "[3/3]" in logs[0] and "[2/2]" in logs[1]  # 5 runs: 3 for shard 0, 2 for shard 1
    rows = _read(out / "results.csv")
    assert len(rows) == 5 * 2 and {r["model"] for r in rows} == set(KINDS)
    assert (out / "results.csv").read_text().count("run_id,") == 1
    from benchmarks.recall.train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--smoke", "--shard", "2/2"])


def test_trainer_learns_an_easy_recall_task(tmp_path):
    """A small GSA model learns a small-vocabulary MQAR well above chance in ~100 CPU steps: the
    targets are learnable, so labels and positions line up."""
    from benchmarks.recall.train import main
    out = tmp_path / "learn"
    assert main(["--smoke", "--out", str(out), "--no-plot", "--spec", "gsa:32:2:8", "--vocab-size", "32",
                 "--train-slices", "16:2", "--test-slices", "16:2", "--train-examples", "4000",
                 "--test-examples", "256", "--batch-size", "32", "--steps", "100", "--lrs", "1e-2"]) == 0
    (row,) = _read(out / "results.csv")
    chance = 1 / 16  # values are uniform over the upper half of the vocabulary
    assert float(row["accuracy"]) > 4 * chance, row


def test_dry_run_and_filters(capsys):
    from benchmarks.recall.train import parse_args
    args = parse_args(["--preset", "reduced", "--models", "gsa,attention", "--d-models", "64,256"])
    assert [s.name for s in args.specs] == ["gsa-d64-h2-m16", "gsa-d256-h2-m64", "attention-d64-h2",
                                            "attention-d256-h2"]
    full = parse_args(["--preset", "full"])
    assert len(full.specs) == 15 and len(full.lrs) >= 3
    assert {s.kind for s in full.specs} == set(KINDS)
    with pytest.raises(SystemExit):
        parse_args(["--models", "mamba"])
