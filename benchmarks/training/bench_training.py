"""Model-level training throughput: tokens/s and peak memory of GSA, GLA, a GSA+attention hybrid and a
Transformer of about the same size, a few AdamW steps each in bf16 autocast, on random tokens.

    python benchmarks/training/bench_training.py --size 340M --tokens 16384 --steps 10 --out results/

Sizes follow the GSA paper's settings (340M: hidden 1024, 24 layers, 4 heads, 64 slots; 1.3B: hidden
2048, 24 layers). Every model checks that its losses stay finite. ``fla-gsa`` is flash-linear-attention's
own ``GSAForCausalLM`` at the same size, heads and slots (when fla is installed), for a side-by-side run:

    python benchmarks/training/bench_training.py --size 1.3B --models gsa,fla-gsa --repeats 3

A model's throughput moves by several percent from one process or minute to the next (clocks, host),
so one run per model says little about a ratio. ``--repeats R`` runs every model R times, interleaved
(the order reversed every other round), each run on a freshly built model; throughput is taken from the
median step time (every step ends in a host sync, the loss), so one stalled step does not move it.
The summary gives each model's median over rounds with its range and, with ``fla-gsa`` in the list, every
model's ratio to it per round and the median ratio.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time

import torch

from fla_gsa.models import GLAConfig, GSAConfig, TransformerConfig

SIZES = {"340M": dict(hidden_size=1024, num_hidden_layers=24), "1.3B": dict(hidden_size=2048, num_hidden_layers=24),
         "tiny": dict(hidden_size=128, num_hidden_layers=2)}


def configs(size: str, vocab: int):
    base = dict(vocab_size=vocab, tie_word_embeddings=False, **SIZES[size])
    L = base["num_hidden_layers"]
    return {
        "gsa": GSAConfig(num_heads=4, num_slots=64, **base),
        "gla": GLAConfig(num_heads=4, **base),
        "hybrid": GSAConfig(num_heads=4, num_slots=64, layer_types=["attention" if i % 4 == 3 else "gsa" for i in range(L)],
                            **base),
        "transformer": TransformerConfig(num_heads=16, **base),
    }


def fla_gsa_model(size: str, vocab: int):
    """flash-linear-attention's GSA LM with the shapes of ``configs(size)['gsa']`` (its defaults otherwise)."""
    from fla.models import GSAConfig as FlaGSAConfig
    from fla.models import GSAForCausalLM as FlaGSAForCausalLM

    return FlaGSAForCausalLM(FlaGSAConfig(vocab_size=vocab, num_heads=4, num_slots=64, tie_word_embeddings=False,
                                          **SIZES[size]))


def build_model(name: str, size: str, vocab: int):
    """A random-weight causal LM (seed 0): ``name`` from :func:`configs` (``gsa``, ``gla``, ``hybrid``,
    ``transformer``) or ``fla-gsa`` (:func:`fla_gsa_model`)."""
    torch.manual_seed(0)
    if name == "fla-gsa":
        return fla_gsa_model(size, vocab)
    from transformers import AutoModelForCausalLM  # fla_gsa.models registered the configs

    return AutoModelForCausalLM.from_config(configs(size, vocab)[name])


def write_csv(rows: list[dict], folder: str, name: str) -> None:
    """``rows`` (one dict per row, same keys) as ``folder/name``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def alloc_retries(device) -> int:
    """Allocations so far that failed and were retried after freeing the cache (each one stalls the
    GPU); 0 off CUDA."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if device.type == "cuda" else 0


def run(name, size, vocab, B, T, steps, warmup, device):
    model = build_model(name, size, vocab).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    x = torch.randint(0, vocab, (B, T), device=device)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync: the step's work is done when this returns

    t_first = time.perf_counter()
    for _ in range(warmup):
        step()
    first_s = time.perf_counter() - t_first
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    retries0 = alloc_retries(device)
    try:
        from tqdm import tqdm
        it = tqdm(range(steps), desc=name, unit="step", leave=False)
    except ImportError:
        it = range(steps)
    times = []
    t0 = time.perf_counter()
    for _ in it:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    retries = alloc_retries(device) - retries0
    finite = all(math.isfinite(v) for v in losses)
    return dict(model=name, params_m=params / 1e6, B=B, T=T, tokens_per_s=B * T / statistics.median(times),
                tokens_per_s_mean=steps * B * T / dt, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                peak_gib=peak, alloc_retries=retries, warmup_s=first_s, loss_first=losses[0], loss_last=losses[-1],
                finite=finite)


def summarize(rows: list[dict], baseline: str = "fla-gsa") -> list[dict]:
    """One row per model over its runs (``rows`` from :func:`run`, each with a ``round``): the median
    tokens/s with its range and, when ``baseline`` ran in the same rounds, the ratio to it per round and
    the median ratio."""
    base = {r["round"]: r["tokens_per_s"] for r in rows if r["model"] == baseline}
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        tps = [r["tokens_per_s"] for r in mine]
        s = dict(model=name, runs=len(mine), tokens_per_s=statistics.median(tps), tokens_per_s_min=min(tps),
                 tokens_per_s_max=max(tps), peak_gib=max(r["peak_gib"] for r in mine),
                 finite=all(r["finite"] for r in mine))
        ratios = [r["tokens_per_s"] / base[r["round"]] for r in mine if r["round"] in base]
        if ratios and name != baseline:
            s.update(ratio=statistics.median(ratios), ratios=ratios)
        out.append(s)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="340M", choices=list(SIZES))
    p.add_argument("--models", default="gsa,hybrid,transformer,gla", help="from gsa, gla, hybrid, transformer, fla-gsa")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=1, help="runs per model, interleaved across models")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.repeats < 1 or a.steps < 1:
        p.error("--repeats and --steps must be at least 1")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    B = max(1, a.tokens // a.T)
    names = a.models.split(",")
    rows = []
    for k in range(a.repeats):
        for name in names if k % 2 == 0 else names[::-1]:
            r = dict(round=k, **run(name, a.size, a.vocab, B, a.T, a.steps, a.warmup, device))
            if device.type == "cuda":  # the model and optimizer of this run are gone: hand their memory back
                torch.cuda.empty_cache()
            rows.append(r)
            print(f"[train] {r}", flush=True)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{dev} | torch {torch.__version__} | {a.size} | {B}x{a.T} tokens per batch | {a.repeats} run(s) of "
          f"{a.steps} steps per model, tokens/s from the median step | {time.strftime('%Y-%m-%d')}")
    print(f"{'model':12} {'round':>5} {'params':>8} {'tokens/s':>10} {'step ms min-max':>16} {'peak GiB':>9} "
          f"{'retries':>7} {'loss first->last':>18} finite")
    for r in rows:
        print(f"{r['model']:12} {r['round']:5d} {r['params_m']:7.0f}M {r['tokens_per_s']:10,.0f} "
              f"{r['step_ms_min']:7.1f}-{r['step_ms_max']:<8.1f} {r['peak_gib']:9.1f} "
              f"{r['alloc_retries']:7d} {r['loss_first']:8.3f}->{r['loss_last']:.3f} {r['finite']}")
    summary = summarize(rows)
    if a.repeats > 1 or any("ratio" in s for s in summary):
        print(f"\n{'model':12} {'median tokens/s':>16} {'range':>20} {'ratio to fla-gsa: median (per round)':>40}")
        for s in summary:
            ratio = f"{s['ratio']:.3f} ({', '.join(f'{v:.3f}' for v in s['ratios'])})" if "ratio" in s else ""
            print(f"{s['model']:12} {s['tokens_per_s']:16,.0f} {s['tokens_per_s_min']:9,.0f}-{s['tokens_per_s_max']:<10,.0f} "
                  f"{ratio:>40}")
    if a.out:
        write_csv(rows, a.out, "bench_training.csv")
    return rows


if __name__ == "__main__":
    main()
