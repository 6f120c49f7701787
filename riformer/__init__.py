"""Models and methods of RIFormer, RePaFormer and SiT, registered with timm.

`import riformer` registers every model of the suite with timm, so that
`timm.create_model("riformer_s12")` works afterwards.
"""
from riformer import _compat  # noqa: F401  (must run before timm imports torchvision)
