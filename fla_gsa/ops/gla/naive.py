"""Reference GLA: the generic step-by-step loop with the gate on the key side."""
from __future__ import annotations

from fla_gsa.ops.common.naive import naive_recurrent_linear_attn


def naive_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Float reference loop of GLA (pass float64 tensors for a float64 reference); same arguments and
    returns as :func:`fla_gsa.ops.fused_recurrent_gla`."""
    return naive_recurrent_linear_attn(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens)
