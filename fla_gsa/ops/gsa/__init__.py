from fla_gsa.ops.gsa.chunk import chunk_gsa, chunk_gsa_projected
from fla_gsa.ops.gsa.decode import fused_gsa_decode
from fla_gsa.ops.gsa.fused_recurrent import fused_recurrent_gsa
from fla_gsa.ops.gsa.inputs import gsa_inputs
from fla_gsa.ops.gsa.naive import naive_recurrent_gsa

__all__ = ["chunk_gsa", "chunk_gsa_projected", "fused_recurrent_gsa", "fused_gsa_decode", "naive_recurrent_gsa",
           "gsa_inputs"]
