from fla_gsa.ops.gla.chunk import chunk_gla
from fla_gsa.ops.gla.fused_recurrent import fused_recurrent_gla
from fla_gsa.ops.gla.naive import naive_recurrent_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "naive_recurrent_gla"]
