"""Cold start: wall time of the first forward+backward of ``chunk_gsa`` (and the first decode step) in a
fresh process with an empty Triton cache, i.e. everything a new user waits for before the first result.

    python benchmarks/generation/cold_start.py [--lib fla_gsa|fla] [--B 4 --T 4096]

Each measurement runs in its own subprocess with ``TRITON_CACHE_DIR`` pointing at a new empty folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, torch.nn.functional as F
lib, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if lib == "fla":
    from fla.ops.gsa import chunk_gsa, fused_recurrent_gsa
else:
    from fla_gsa.ops import chunk_gsa, fused_recurrent_gsa
t_import = time.perf_counter() - t0
H, K, V, M = 4, 512, 512, 64
dev, dt = "cuda", torch.bfloat16
q, k = (torch.randn(B, T, H, K, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
v = torch.randn(B, T, H, V, device=dev, dtype=dt, requires_grad=True)
g = (F.logsigmoid(torch.randn(B, T, H, M, device=dev)) / 8).to(dt).requires_grad_()
s = (1 - g.detach().float().exp()).to(dt).requires_grad_()
torch.cuda.synchronize()
t1 = time.perf_counter()
o, _ = chunk_gsa(q, k, v, s, g)
torch.cuda.synchronize()
t_fwd = time.perf_counter() - t1
o.backward(torch.randn_like(o))
torch.cuda.synchronize()
t_fwdbwd = time.perf_counter() - t1
state = (torch.zeros(1, H, K, M, device=dev), torch.zeros(1, H, M, V, device=dev))
with torch.no_grad():
    t2 = time.perf_counter()
    fused_recurrent_gsa(q[:1, :1].detach(), k[:1, :1].detach(), v[:1, :1].detach(), s[:1, :1].detach(),
                        g[:1, :1].detach(), initial_state=state, output_final_state=True)
    torch.cuda.synchronize()
    t_decode = time.perf_counter() - t2
print(json.dumps(dict(lib=lib, import_s=t_import, first_fwd_s=t_fwd, first_fwd_bwd_s=t_fwdbwd,
                      first_decode_s=t_decode)))
"""


def cold_start(lib: str, B: int, T: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", CHILD, lib, str(B), str(T)], env=env, capture_output=True,
                             text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", default="fla_gsa", choices=["fla_gsa", "fla"])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=4096)
    a = p.parse_args(argv)
    r = cold_start(a.lib, a.B, a.T)
    print(f"{r['lib']}: import {r['import_s']:.1f} s | first chunk_gsa forward {r['first_fwd_s']:.1f} s | "
          f"first forward+backward {r['first_fwd_bwd_s']:.1f} s | first decode step {r['first_decode_s']:.1f} s")
    return r


if __name__ == "__main__":
    main()
