"""The examples in the modules' docstrings run (on CPU tensors; under TRITON_INTERPRET=1 through the
Triton kernels)."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["activations", "convolution", "cross_entropy", "layernorm", "linear", "linear_cross_entropy", "mlp", "rotary"]


@pytest.mark.triton
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"fla_gsa.modules.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"fla_gsa.modules.{name} has no examples"
    assert result.failed == 0
