"""Generation latency with the recurrent cache: prefill time of a prompt, then per-token latency of
greedy decoding, one token per forward.

    python benchmarks/generation/latency.py --size 1.3B --prefix 2048 --tokens 128            # fla_gsa
    python benchmarks/generation/latency.py --size 1.3B --models gsa,fla-gsa --out results/   # vs fla

Models are random-weight causal LMs of ``benchmarks/training/bench_training.py``'s sizes (``fla-gsa``
is flash-linear-attention's ``GSAForCausalLM`` at the same shapes, when installed), in bf16 on a GPU
(fp32 on a CPU). Each step feeds the previous step's argmax, so the loop is what ``generate()`` does
without its bookkeeping. Times are host wall clock around synchronized steps: what a user waits for,
Python and launches included. The median and 90th percentile per token are reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from bench_training import SIZES, build_model, write_csv  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, B: int, prefix: int, tokens: int, device, warmup: int = 1) -> dict:
    """``prefill_ms`` (the prompt's forward, building the cache) and per-token latency of ``tokens``
    cached steps; ``warmup`` untimed rounds first (compilation, allocator)."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (B, prefix), generator=gen).to(device)
    result = {}
    for round_ in range(warmup + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        prefill = time.perf_counter() - t0
        cache = out.past_key_values
        per_token = []
        for _ in range(tokens if round_ == warmup else min(tokens, 4)):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            per_token.append(time.perf_counter() - t)
        if not torch.isfinite(out.logits).all():
            raise RuntimeError("non-finite logits during decoding")
        result = dict(prefill_ms=prefill * 1e3, token_ms=statistics.median(per_token) * 1e3,
                      token_p90_ms=sorted(per_token)[int(0.9 * (len(per_token) - 1))] * 1e3,
                      tokens_per_s=B / statistics.median(per_token))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.3B", choices=list(SIZES))
    p.add_argument("--models", default="gsa", help="from gsa, gla, hybrid, transformer, fla-gsa")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefix", type=int, default=2048, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated (timed one by one)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for generation_latency.csv")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in a.models.split(","):
        model = build_model(name, a.size, a.vocab).to(device=device, dtype=dtype).eval()
        r = dict(model=name, size=a.size, B=a.batch, prefix=a.prefix, tokens=a.tokens,
                 **measure(model, a.batch, a.prefix, a.tokens, device))
        rows.append(r)
        print(f"[generate] {r}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{dev} | torch {torch.__version__} | {a.size} | B={a.batch} | prefix {a.prefix} | "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'model':12} {'prefill ms':>11} {'ms/token':>9} {'p90 ms':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['model']:12} {r['prefill_ms']:11.1f} {r['token_ms']:9.2f} {r['token_p90_ms']:8.2f} "
              f"{r['tokens_per_s']:9.1f}")
    if a.out:
        write_csv(rows, a.out, "generation_latency.csv")
    return rows


if __name__ == "__main__":
    main()
