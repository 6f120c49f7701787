"""reproduce: table-by-table reproduction of RIFormer, RePaFormer and SiT."""
from riformer import _compat  # noqa: F401  (before anything in the suite imports timm)
