"""What every model family's entry point does besides building its model.

Nothing can be downloaded in this suite, so `pretrained=True` is refused unless a local file is
given; timm passes its own kwargs (`pretrained_cfg`, `pretrained_cfg_overlay`, `cache_dir`) to
every entry point, and our model classes take none of them; the built model gets a default cfg
(`imagenet_cfg`) as `pretrained_cfg` / `default_cfg`, with `architecture` = its registered name,
as timm's own builder gives it.

Loading a checkpoint: every path goes through `riformer.checkpoints` (one loader, strict, with
each family's official layouts). All of these load FILE through the family's layouts:

* `timm.create_model(name, checkpoint_path=FILE)` (timm loads after the entry point returns;
  `riformer.checkpoints.install_timm_hook` routes that load for the suite's models),
* the model function: `riformer.pvt.pvt_v1_small(checkpoint_path=FILE)`,
* timm's pretrained path: `timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": FILE})`,
* `riformer.checkpoints.load_model(name, FILE, form="deploy")` (what `reproduce eval` calls).

`build_model` / `register_family_model` below serve the families with their own model classes;
the families built by timm's `build_model_with_cfg` (mlp.py, metaformer_v2.py) and the RePa
variants call `local_checkpoint` and `load_local_checkpoint` themselves.

`init_vit_weights` is the weight init our own model classes apply after construction.
"""
import sys
from typing import Callable, Optional, Sequence, Union

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import register_model

from riformer.checkpoints import Layout, load_checkpoint, register_layouts, unwrap_state_dict

__all__ = ["TIMM_ONLY_KWARGS", "imagenet_cfg", "refuse_pretrained", "strip_timm_kwargs", "unwrap_state_dict",
           "local_checkpoint", "load_local_checkpoint", "build_model", "register", "register_family_model",
           "init_vit_weights"]

TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_LOCAL_FILE_HINT = ("pass checkpoint_path=<local file> to the model function, "
                    "or pretrained_cfg_overlay={'file': <local file>} to timm.create_model")
_NO_LOCAL_FILE_HINT = ("build it with pretrained=False and train it, or load a checkpoint of this suite's "
                       "layout with timm.create_model(name, checkpoint_path=<local file>)")


class LinearHead:
    """timm's classifier interface for models whose head is one `nn.Linear` on `num_features`."""

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def imagenet_cfg(first_conv: str, classifier: str = "head", img_size: int = 224, **overrides) -> dict:
    """A default cfg for timm: ImageNet-1k at `img_size`, bicubic, crop 0.9, ImageNet mean/std."""
    return {"url": "", "num_classes": 1000, "input_size": (3, img_size, img_size), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": first_conv, "classifier": classifier, **overrides}


def refuse_pretrained(name: str, pretrained: bool, checkpoint_path: Optional[str] = None,
                      loads_local_files: bool = False) -> None:
    """Raise ValueError on `pretrained=True` without a local file: nothing can be downloaded."""
    if pretrained and not checkpoint_path:
        hint = _LOCAL_FILE_HINT if loads_local_files else _NO_LOCAL_FILE_HINT
        raise ValueError(f"{name}: no pretrained weights are available in this suite "
                         f"(they cannot be downloaded here); {hint}")


def strip_timm_kwargs(kwargs: dict) -> dict:
    """Drop (in place) the kwargs timm passes every entry point and our model classes do not take."""
    for timm_only in TIMM_ONLY_KWARGS:
        kwargs.pop(timm_only, None)
    return kwargs


def local_checkpoint(checkpoint_path: Optional[str], kwargs: dict) -> Optional[str]:
    """The local file to load: `checkpoint_path`, or timm's `pretrained_cfg_overlay={"file": ...}`
    (popped from `kwargs`)."""
    return checkpoint_path or (kwargs.pop("pretrained_cfg_overlay", None) or {}).get("file")


def load_local_checkpoint(model: nn.Module, name: str, checkpoint_path: Optional[str]) -> nn.Module:
    """`model` (registered as `name`) with `checkpoint_path` loaded strictly through its layouts."""
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path, name=name)
    return model


def build_model(model_fn: Callable[..., nn.Module], name: str, pretrained: bool, kwargs: dict, cfg: dict,
                checkpoint_path: Optional[str] = None) -> nn.Module:
    """`model_fn(**kwargs)` with `cfg` as its pretrained/default cfg, loaded from a local file if one
    is given (`checkpoint_path`, or timm's `pretrained_cfg_overlay={"file": ...}`) through the
    model's layouts (`riformer.checkpoints`); `pretrained=True` without a file is refused."""
    checkpoint_path = local_checkpoint(checkpoint_path, kwargs)
    refuse_pretrained(name, pretrained, checkpoint_path, loads_local_files=True)
    model = model_fn(**strip_timm_kwargs(kwargs))
    model.pretrained_cfg = model.default_cfg = {**cfg, "architecture": name}
    return load_local_checkpoint(model, name, checkpoint_path)


def register(module: str, name: str, build: Callable, doc: str) -> Callable:
    """Register the entry point `build` with timm as `name` of the family module `module` (which
    timm records), and make it that module's attribute `name`, as a `def name(...)` would be."""
    build.__name__, build.__qualname__, build.__module__, build.__doc__ = name, name, module, doc
    setattr(sys.modules[module], name, build)
    return register_model(build)


def register_family_model(module: str, name: str, doc: str, model_fn: Callable[..., nn.Module],
                          cfg: Union[dict, Callable[[dict], dict]], layouts: Sequence[Layout] = (),
                          **defaults) -> Callable:
    """Register `name` with timm: an entry point `name(pretrained=False, checkpoint_path=None, **kwargs)`
    returning `build_model(model_fn, ...)` on `{**defaults, **kwargs}`; `cfg` is the default cfg, or a
    function of those kwargs (for models built for one `img_size`); `layouts` are the official
    checkpoint layouts the model loads besides ours."""

    def build(pretrained=False, checkpoint_path=None, **kwargs):
        kwargs = {**defaults, **kwargs}
        return build_model(model_fn, name, pretrained, kwargs, cfg(kwargs) if callable(cfg) else cfg, checkpoint_path)

    register_layouts([name], layouts)
    return register(module, name, build, doc)


def init_vit_weights(module: nn.Module) -> None:
    """ViT-style init, for `model.apply`: truncated-normal (std 0.02) Linear weights, zero biases,
    LayerNorm at ones / zeros; every other module keeps its own init."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
