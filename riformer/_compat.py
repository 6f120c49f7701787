"""Make `import timm` work with a CUDA build of torchvision on a CPU-only torch.

pip pairs torch 2.13.0 (CPU wheel) with torchvision 0.28.0, which is a CUDA build: its
compiled ops library fails to load, so the Python side of torchvision dies when it
registers fake kernels for `torchvision::nms` and `torchvision::qnms`, and `import timm`
fails with it. Declaring those two op schemas ourselves lets torchvision import; the ops
are then defined but have no kernel, which is fine because nothing in this suite calls
them. On a machine where torchvision's ops load, this module does nothing.

Import this module before anything imports torchvision (riformer/__init__.py does; the CLI imports riformer first).
"""
import torch

_LIBRARY = None  # keep a reference: the schemas live as long as the Library object


def install() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    try:
        torch.ops.load_library  # noqa: B018  (attribute exists on every torch we support)
        if hasattr(torch.ops.torchvision, "nms"):
            return
    except (RuntimeError, AttributeError):
        pass
    try:
        import torchvision  # noqa: F401
        return  # the real ops loaded
    except (RuntimeError, ImportError, OSError):
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    _LIBRARY = lib


install()
