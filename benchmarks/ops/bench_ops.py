"""Op benchmarks on a GPU: fla_gsa against flash-linear-attention (when installed) and SDPA.

Forward, forward+backward and one-token decode, timed with ``triton.testing.do_bench`` medians in one
process, side by side, with the GPU time of the same calls (the sum of their kernels' durations, from
``torch.profiler``), their host time (Python and launches) and the peak extra memory of
forward+backward. Prints a table, writes CSV (and
a PNG plot of time against sequence length when matplotlib is there).

    python benchmarks/ops/bench_ops.py                       # the default table (16K tokens per batch)
    python benchmarks/ops/bench_ops.py --ops gsa --shapes 4x4096 --modes fwd,fwdbwd --out results/

Shapes default to the paper's 1.3B GSA heads (H=4, K=V=512, M=64) and GLA with K=256, V=512; SDPA uses
16 heads of 128, causal. flash-linear-attention autotunes on its first calls (minutes on a fresh
machine); every case is warmed up before it is timed.
"""
from __future__ import annotations

import argparse
import collections
import csv
import functools
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench


def _libs(names):
    libs = {}
    if {"fla_gsa", "fla_gsa-ckpt0"} & set(names):
        import fla_gsa.ops as ours

        chunked = dict(gsa=ours.chunk_gsa, gla=ours.chunk_gla, abc=ours.chunk_abc)
        if "fla_gsa" in names:
            libs["fla_gsa"] = dict(chunked, decode=ours.fused_recurrent_gsa)
        if "fla_gsa-ckpt0" in names:  # keeps the chunk states for the backward instead of recomputing them
            libs["fla_gsa-ckpt0"] = {op: functools.partial(fn, checkpoint_level=0) for op, fn in chunked.items()}
    if "fla" in names:
        try:
            from fla.ops.abc import chunk_abc
            from fla.ops.gla import chunk_gla
            from fla.ops.gsa import chunk_gsa, fused_recurrent_gsa
        except ImportError as e:  # benchmark what is there
            print(f"[bench] flash-linear-attention not available ({e}); skipping it", file=sys.stderr)
        else:
            libs["fla"] = dict(gsa=chunk_gsa, gla=chunk_gla, abc=chunk_abc, decode=fused_recurrent_gsa)
    return libs


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The head shapes (defaults: the paper's 1.3B GSA heads; GLA with K=256, V=512)."""
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--gsa-k", type=int, default=512)
    p.add_argument("--gsa-v", type=int, default=512)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--gla-k", type=int, default=256)
    p.add_argument("--gla-v", type=int, default=512)


def _inputs(op, B, T, a, dtype, grad):
    dev = "cuda"
    H = a.heads
    if op in ("gsa", "abc"):
        K, V, M = a.gsa_k, a.gsa_v, a.slots
        q, k = (torch.randn(B, T, H, K, device=dev, dtype=dtype) for _ in range(2))
        v = torch.randn(B, T, H, V, device=dev, dtype=dtype)
        g = (F.logsigmoid(torch.randn(B, T, H, M, device=dev)) / 8).to(dtype)
        s = (1 - g.float().exp()).to(dtype) if op == "gsa" else torch.randn(B, T, H, M, device=dev, dtype=dtype)
        args = [q, k, v, s, g] if op == "gsa" else [q, k, v, s]
    else:
        K, V = a.gla_k, a.gla_v
        q, k = (torch.randn(B, T, H, K, device=dev, dtype=dtype) for _ in range(2))
        v = torch.randn(B, T, H, V, device=dev, dtype=dtype)
        g = (F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16).to(dtype)
        args = [q, k, v, g]
    if grad:
        for x in args:
            x.requires_grad_()
    return args


def _time(fn, warmup_calls=3):
    for _ in range(warmup_calls):  # compile / autotune outside the timed region
        fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def kernel_table(fn, iters: int = 10):
    """``[(kernel name, launches per call, GPU ms per call)]`` of ``fn``, largest first, from
    ``torch.profiler`` over ``iters`` calls (after warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = total[ev.name]
            entry[0] += 1
            entry[1] += ev.device_time_total / 1e3
    rows = [(name, n / iters, ms / iters) for name, (n, ms) in total.items()]
    return sorted(rows, key=lambda r: -r[2])


def _gpu_ms(fn):
    """GPU time of one call: the sum of its kernels' durations. Unlike ``do_bench``'s wall time between
    events, this leaves out the time the GPU waits for the host to launch the next kernel, which at
    these sizes can be most of a call (about 0.1 ms per launch on the lent H100's host)."""
    return sum(ms for _, _, ms in kernel_table(fn))


def _peak_extra_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_chunk(op, lib, fn, B, T, a, rows, modes):
    if "fwd" in modes:
        args = _inputs(op, B, T, a, torch.bfloat16, False)
        with torch.no_grad():
            ms = _time(lambda: fn(*args))
            gpu = _gpu_ms(lambda: fn(*args))
            host = _host_us(lambda: fn(*args))
        rows.append(dict(op=op, mode="fwd", B=B, T=T, lib=lib, ms=ms, gpu_ms=gpu, host_us=host))
    if "fwdbwd" in modes:
        args = _inputs(op, B, T, a, torch.bfloat16, True)
        do = None

        def step():
            nonlocal do
            o = fn(*args)[0]
            if do is None:
                do = torch.randn_like(o)
            torch.autograd.grad(o, args, do)

        ms = _time(step)
        mb = _peak_extra_mb(step)
        rows.append(dict(op=op, mode="fwdbwd", B=B, T=T, lib=lib, ms=ms, gpu_ms=_gpu_ms(step), peak_mb=mb,
                         host_us=_host_us(step)))


def bench_decode(lib, fn, B, a, rows):
    dev, H, K, V, M = "cuda", a.heads, a.gsa_k, a.gsa_v, a.slots
    q, k = (torch.randn(B, 1, H, K, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, 1, H, V, device=dev, dtype=torch.bfloat16)
    g = (F.logsigmoid(torch.randn(B, 1, H, M, device=dev)) / 8).to(torch.bfloat16)
    s = 1 - g.float().exp().to(torch.bfloat16)
    state = (torch.randn(B, H, K, M, device=dev), torch.randn(B, H, M, V, device=dev))
    with torch.no_grad():
        step = lambda: fn(q, k, v, s, g, initial_state=state, output_final_state=True)  # noqa: E731
        ms = _time(step)
        rows.append(dict(op="gsa", mode="decode", B=B, T=1, lib=lib, ms=ms, gpu_ms=_gpu_ms(step),
                         host_us=_host_us(step)))


def _host_us(fn, n=10, rounds=7):
    """Host (Python + launch) microseconds per call: the median over ``rounds`` of ``n`` calls issued
    back to back after a synchronize, timed until the last call returns (few enough that the launch
    queue never fills, so the GPU's time does not leak in). Where it exceeds the GPU time, the wall
    time is the host's: what a loop pays when it is not captured in a CUDA graph."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[rounds // 2]


def bench_sdpa(B, T, rows, modes):
    q, k, v = (torch.randn(B, 16, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    if "fwd" in modes:
        with torch.no_grad():
            fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            rows.append(dict(op="sdpa", mode="fwd", B=B, T=T, lib="torch", ms=_time(fwd), gpu_ms=_gpu_ms(fwd),
                             host_us=_host_us(fwd)))
    if "fwdbwd" in modes:
        do = torch.randn_like(q)

        def step():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(o, (q, k, v), do)

        rows.append(dict(op="sdpa", mode="fwdbwd", B=B, T=T, lib="torch", ms=_time(step), gpu_ms=_gpu_ms(step),
                         peak_mb=_peak_extra_mb(step), host_us=_host_us(step)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="gsa,gla,sdpa,decode", help="from gsa, gla, abc, sdpa, decode")
    p.add_argument("--libs", default="fla_gsa,fla", help="from fla_gsa, fla, fla_gsa-ckpt0 (checkpoint_level=0)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--shapes", default="8x2048,4x4096,1x16384", help="BxT list (16K tokens per batch by default)")
    p.add_argument("--decode-batch", default="1,32")
    add_shape_args(p)
    p.add_argument("--out", default=None, help="folder for bench_ops.csv (and .png)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_ops needs a CUDA GPU")

    ops, modes = a.ops.split(","), a.modes.split(",")
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    libs = _libs(a.libs.split(","))
    rows: list[dict] = []
    try:
        _run(a, ops, modes, shapes, libs, rows)
    except KeyboardInterrupt:  # still report what was measured
        print("[bench] interrupted; the table has the cases measured so far", file=sys.stderr)
    _report(a, rows)
    return rows


def _run(a, ops, modes, shapes, libs, rows):
    t0 = time.time()
    for B, T in shapes:
        for op in [o for o in ops if o in ("gsa", "gla", "abc")]:
            for lib, table in libs.items():
                n = len(rows)
                bench_chunk(op, lib, table[op], B, T, a, rows, modes)
                for r in rows[n:]:
                    print(f"[bench] {r} ({time.time() - t0:.0f}s)", flush=True)
        if "sdpa" in ops:
            bench_sdpa(B, T, rows, modes)
    if "decode" in ops:
        for B in [int(b) for b in a.decode_batch.split(",")]:
            for lib, table in libs.items():
                if "decode" not in table:
                    continue
                bench_decode(lib, table["decode"], B, a, rows)
                print(f"[bench] {rows[-1]} ({time.time() - t0:.0f}s)", flush=True)


def _report(a, rows):
    # ratio of every fla_gsa row to the matching fla row, in wall time and in GPU (kernel) time
    ref = {(r["op"], r["mode"], r["B"], r["T"]): r for r in rows if r["lib"] == "fla"}
    for r in rows:
        base = ref.get((r["op"], r["mode"], r["B"], r["T"])) if r["lib"] != "fla" else None
        r["vs_fla"] = r["ms"] / base["ms"] if base else None
        r["gpu_vs_fla"] = r["gpu_ms"] / base["gpu_ms"] if base and r.get("gpu_ms") and base.get("gpu_ms") else None

    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d')} | python {platform.python_version()}")
    print("ms: do_bench median (wall time between events); GPU ms: sum of the call's kernel durations")
    print(f"{'op':6} {'mode':7} {'BxT':>9} {'lib':13} {'ms':>9} {'x fla':>7} {'GPU ms':>8} {'x fla':>7} "
          f"{'peak MB':>9} {'host us':>8}")

    def fmt(x, spec):
        return format(x, spec) if x is not None else ""

    for r in rows:
        print(f"{r['op']:6} {r['mode']:7} {str(r['B']) + 'x' + str(r['T']):>9} {r['lib']:13} {r['ms']:9.3f} "
              f"{fmt(r.get('vs_fla'), '.2f'):>7} {fmt(r.get('gpu_ms'), '.3f'):>8} {fmt(r.get('gpu_vs_fla'), '.2f'):>7} "
              f"{fmt(r.get('peak_mb'), '.0f'):>9} {fmt(r.get('host_us'), '.0f'):>8}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_ops.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["op", "mode", "B", "T", "lib", "ms", "vs_fla", "gpu_ms", "gpu_vs_fla",
                                              "peak_mb", "host_us"])
            w.writeheader()
            w.writerows(rows)
        _plot(rows, os.path.join(a.out, "bench_ops.png"))
    return rows


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series = {}
    for r in rows:
        if r["mode"] in ("fwd", "fwdbwd"):
            series.setdefault((r["op"], r["mode"], r["lib"]), []).append((r["T"], r["ms"]))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (op, mode, lib), pts in sorted(series.items()):
        pts.sort()
        ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o", label=f"{op} {mode} ({lib})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (tokens per batch fixed)")
    ax.set_ylabel("ms (median)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
