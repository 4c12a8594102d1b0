"""Where an op's time goes: GPU time per kernel of one forward (+backward) of an fla_gsa op.

    python benchmarks/ops/profile_ops.py --op gsa --shape 4x4096
    python benchmarks/ops/profile_ops.py --op gla --shape 1x16384 --mode fwd

Runs a few warm-up iterations, then ``--iters`` under ``torch.profiler`` and prints, per kernel name,
the launches and the GPU milliseconds per iteration, largest first, with the share of the total. Shapes
as in ``bench_ops.py`` (GSA: H=4, K=V=512, M=64; GLA: K=256, V=512; bf16).
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_ops import _inputs, add_shape_args  # noqa: E402


def kernel_table(fn, iters: int):
    """``[(kernel name, launches per iteration, ms per iteration)]`` largest first."""
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="gsa", choices=["gsa", "gla", "abc"])
    p.add_argument("--shape", default="4x4096", help="BxT")
    p.add_argument("--mode", default="fwdbwd", choices=["fwd", "fwdbwd"])
    p.add_argument("--iters", type=int, default=10)
    add_shape_args(p)
    a = p.parse_args(argv)
    import fla_gsa.ops as ops

    fn = {"gsa": ops.chunk_gsa, "gla": ops.chunk_gla, "abc": ops.chunk_abc}[a.op]
    B, T = (int(x) for x in a.shape.split("x"))
    args = _inputs(a.op, B, T, a, torch.bfloat16, a.mode == "fwdbwd")
    if a.mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*args)
    else:
        do = torch.randn_like(fn(*args)[0])

        def step():
            torch.autograd.grad(fn(*args)[0], args, do)

    rows = kernel_table(step, a.iters)
    total = sum(ms for _, _, ms in rows)
    print(f"{a.op} {a.mode} {a.shape} on {torch.cuda.get_device_name()}: {total:.3f} ms of kernels per iteration")
    print(f"{'ms':>8} {'share':>6} {'launches':>8}  kernel")
    for name, n, ms in rows:
        print(f"{ms:8.3f} {100 * ms / total:5.1f}% {n:8.1f}  {name[:90]}")
    return rows


if __name__ == "__main__":
    main()
