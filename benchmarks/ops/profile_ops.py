"""Where an op's time goes: GPU time per kernel of one forward (+backward) of an fla_gsa op (or of
flash-linear-attention's, ``--lib fla``).

    python benchmarks/ops/profile_ops.py --op gsa --shape 4x4096
    python benchmarks/ops/profile_ops.py --op gla --shape 1x16384 --mode fwd
    python benchmarks/ops/profile_ops.py --op gla --shape 8x2048 --mode fwd --lib fla

Runs a few warm-up iterations, then ``--iters`` under ``torch.profiler`` and prints, per kernel name,
the launches and the GPU milliseconds per iteration, largest first, with the share of the total. Shapes
as in ``bench_ops.py`` (GSA: H=4, K=V=512, M=64; GLA: K=256, V=512; bf16).
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_ops import _inputs, _libs, add_shape_args, kernel_table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="gsa", choices=["gsa", "gla", "abc"])
    p.add_argument("--shape", default="4x4096", help="BxT")
    p.add_argument("--mode", default="fwdbwd", choices=["fwd", "fwdbwd"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--lib", default="fla_gsa", choices=["fla_gsa", "fla"])
    add_shape_args(p)
    a = p.parse_args(argv)
    libs = _libs([a.lib])
    if a.lib not in libs:
        sys.exit(f"{a.lib} is not installed")
    fn = libs[a.lib][a.op]
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
    print(f"{a.lib} {a.op} {a.mode} {a.shape} on {torch.cuda.get_device_name()}: {total:.3f} ms of kernels per "
          "iteration")
    print(f"{'ms':>8} {'share':>6} {'launches':>8}  kernel")
    for name, n, ms in rows:
        print(f"{ms:8.3f} {100 * ms / total:5.1f}% {n:8.1f}  {name[:90]}")
    return rows


if __name__ == "__main__":
    main()
