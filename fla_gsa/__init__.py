"""fla_gsa: fast, composable gated linear attention built around Gated Slot Attention."""
__version__ = "0.1.0"
