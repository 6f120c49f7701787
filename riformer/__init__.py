"""Models and methods of RIFormer, RePaFormer and SiT, registered with timm.

`import riformer` registers every model of the suite with timm, so that
`timm.create_model("riformer_s12")` works afterwards, and routes timm's `checkpoint_path` loading
of these models through the suite's one loader (`riformer.checkpoints`).
"""
from riformer import _compat  # noqa: F401  (must run before timm imports torchvision)
from riformer import (  # noqa: E402,F401  (each module registers its models with timm)
    gfnet,
    lvvit,
    metaformer,
    metaformer_v2,
    mlp,
    pvt,
    repa,
    sit,
    vig,
)
from riformer.deploy import deploy, has_deploy_form  # noqa: E402,F401
from riformer.checkpoints import install_timm_hook  # noqa: E402

install_timm_hook()
