from fla_gsa.ops.utils.cumsum import chunk_global_cumsum, chunk_local_cumsum
from fla_gsa.ops.utils.index import prepare_chunk_indices, prepare_chunk_offsets, prepare_lens

__all__ = ["chunk_local_cumsum", "chunk_global_cumsum", "prepare_chunk_indices", "prepare_chunk_offsets", "prepare_lens"]
