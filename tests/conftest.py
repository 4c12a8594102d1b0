"""Shared test helpers.

The same tests run three ways: on CPU tensors (the PyTorch backend), on CPU tensors under
``TRITON_INTERPRET=1`` (the Triton kernels, interpreted; select ``-m triton``), and on CUDA tensors
when a GPU is present (the Triton kernels, compiled).
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Test tensors are tiny: one intra-op thread avoids the thread-pool wake-ups that dominate small ops
# (and the oversubscription when other processes share the cores).
torch.set_num_threads(1)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: has inf/NaN"
    err = rel_err(x, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"


def log_gates(*shape, tau: float = 1.0, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """Log forget gates ``logsigmoid(x) / tau``: tau = 0.1 gives strong gates (~ -7 per step on average
    and far lower in the tail), tau = 16 weak ones."""
    return (F.logsigmoid(torch.randn(*shape, dtype=torch.float32, device=device)) / tau).to(dtype)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (derived from its id), so tests draw fresh, independent inputs
    # while a failure stays reproducible.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(autouse=True)
def _fresh_replays():
    # Replayed calls (fla_gsa.ops.utils.replay) repeat what was recorded under the tuning constants of
    # the time: tests that patch a constant record their own, and leave none behind.
    from fla_gsa.ops.utils import replay

    replay.clear()
    yield
    replay.clear()
