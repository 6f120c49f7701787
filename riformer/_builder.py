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

The timm contract
-----------------
Every entry point registers its default cfg with timm (`timm.models.get_pretrained_cfg(name)`;
`register_family_model` and `register` put it in the family module's `default_cfgs`, which timm's
`register_model` reads) and lists its model under the family's full module name
(`timm.list_models(module="riformer.metaformer")`), never under timm's own module of the same last
name. `finish_timm_model` ends every build of our own classes and of the RePa variants as timm's
`build_model_with_cfg` ends its own: the cfg as a `PretrainedCfg` dict, the input traits, and the
`features_only=True` wrapper (`FeatureGetterNet` over `forward_intermediates` unless the family says
otherwise). docs/timm.md lists what the contract covers.
"""
import sys
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import _registry

from riformer.checkpoints import Layout, load_checkpoint, register_layouts, unwrap_state_dict

__all__ = ["TIMM_ONLY_KWARGS", "imagenet_cfg", "refuse_pretrained", "strip_timm_kwargs", "unwrap_state_dict",
           "local_checkpoint", "load_local_checkpoint", "build_model", "register", "register_family_model",
           "init_vit_weights", "register_timm_model", "finish_timm_model", "pop_feature_kwargs", "check_choice",
           "tokens_to_nchw", "prune_after", "cfg_for_img_size"]

TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_LOCAL_FILE_HINT = ("pass checkpoint_path=<local file> to the model function, "
                    "or pretrained_cfg_overlay={'file': <local file>} to timm.create_model")
_NO_LOCAL_FILE_HINT = ("build it with pretrained=False and train it, or load a checkpoint of this suite's "
                       "layout with timm.create_model(name, checkpoint_path=<local file>)")


def check_choice(value: str, allowed, what: str) -> str:
    """`value` if it is one of `allowed`, else a one-line ValueError naming `what` and the choices."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


class GradCheckpointing:
    """timm's `set_grad_checkpointing(enable=True)` for our own model classes: each block's
    activations are recomputed in the backward pass instead of kept (`torch.utils.checkpoint`, as
    timm does when `self.grad_checkpointing and not torch.jit.is_scripting()`; the official SiT-L
    runs so, `with_cp=True`). The switch reaches every part of the model that runs blocks (its
    stages), so a stage that owns its blocks checkpoints them itself. Gradients are unchanged."""
    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True):
        for module in self.modules():
            if isinstance(module, GradCheckpointing):
                module.grad_checkpointing = enable

    def run_block(self, block, x, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def run_blocks(self, blocks, x, *args):
        """`blocks` in turn on `x` (each also given `args`)."""
        for block in blocks:
            x = self.run_block(block, x, *args)
        return x


class LinearHead:
    """timm's classifier interface for models whose head is one `nn.Linear` on `head_hidden_size`
    after a global pooling named by `global_pool` (one of the class's `global_pools`; '' = none)."""
    global_pools = ("avg", "")

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()


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


def register_timm_model(fn: Callable) -> Callable:
    """timm's `register_model`, with the model listed under its full module name ("riformer.metaformer"):
    timm keys modules by the last part of the name ("metaformer"), which would mix our models into
    timm's own module of that name (`timm.list_models(module="metaformer")`)."""
    register_model(fn)
    name, short, full = fn.__name__, fn.__module__.split(".")[-1], fn.__module__
    timm_module_models = _registry._module_to_models
    timm_module_models[short].discard(name)
    if not timm_module_models[short]:
        del timm_module_models[short]
    timm_module_models[full].add(name)
    _registry._model_to_module[name] = full
    return fn


def register(module: str, name: str, build: Callable, doc: str, cfg: Optional[dict] = None) -> Callable:
    """Register the entry point `build` with timm as `name` of the family module `module`, with `cfg`
    as its default cfg, and make it that module's attribute `name`, as a `def name(...)` would be."""
    build.__name__, build.__qualname__, build.__module__, build.__doc__ = name, name, module, doc
    family = sys.modules[module]
    setattr(family, name, build)
    if cfg is not None:  # timm's register_model reads the family module's default_cfgs
        family.__dict__.setdefault("default_cfgs", {}).update(generate_default_cfgs({name: cfg}))
    return register_timm_model(build)


def cfg_for_img_size(kwargs: dict, stride: Optional[int] = None) -> dict:
    """`kwargs` for timm's `build_model_with_cfg` with the cfg of the size the model is built for: an
    `img_size` in them goes into `pretrained_cfg_overlay` as `input_size` (and `pool_size`, the size over
    `stride`), where timm would give every size the registered cfg."""
    if "img_size" not in kwargs:
        return kwargs
    size = kwargs["img_size"]
    size_cfg = {"input_size": (3, size, size)}
    if stride:
        size_cfg["pool_size"] = (size // stride, size // stride)
    return {**kwargs, "pretrained_cfg_overlay": {**size_cfg, **(kwargs.get("pretrained_cfg_overlay") or {})}}


FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls")


def pop_feature_kwargs(kwargs: dict) -> dict:
    """Remove (in place) and return timm's feature-extraction kwargs."""
    return {key: kwargs.pop(key) for key in FEATURE_KWARGS if key in kwargs}


def finish_timm_model(model: nn.Module, name: str, cfg: dict, feature_cfg: dict, features: dict) -> nn.Module:
    """`model` (built, and loaded if asked) finished by timm's own `build_model_with_cfg` (which we hand
    the model as its "class"): `cfg` as its pretrained cfg, input traits, and with `features` holding
    `features_only=True` (and `out_indices`, `feature_cls`), the feature wrapper that `feature_cfg`
    describes (by default `FeatureGetterNet` over the model's `forward_intermediates`, every entry of
    its `feature_info`)."""
    if features.get("features_only"):
        feature_cfg = {"feature_cls": "getter", "out_indices": tuple(range(len(model.feature_info))), **feature_cfg}
    return build_model_with_cfg(lambda **_: model, name, pretrained=False, pretrained_cfg=dict(cfg),
                                feature_cfg=feature_cfg, **features)


def prune_after(model: nn.Module, indices, prune_norm: bool, prune_head: bool, truncate: Callable[[int], None]):
    """timm's `prune_intermediate_layers` for a model with a `feature_info`, a final `norm` and a head:
    `truncate(last)` drops its layers after feature `last` (the last of `indices`); the norm goes too if
    asked or if it no longer fits, the head if asked. Returns the absolute indices kept."""
    from timm.models._features import feature_take_indices

    take, last = feature_take_indices(len(model.feature_info), indices)
    truncate(last)
    if prune_norm or last < len(model.feature_info) - 1:
        model.norm = nn.Identity()
    if prune_head:
        model.reset_classifier(0, "")
    return take


def stage_intermediates(stages, x, indices, stop_early: bool, intermediates_only: bool,
                        step: Callable[[nn.Module, torch.Tensor], tuple], norm: Optional[nn.Module] = None):
    """timm's `forward_intermediates` over a model's `stages`: `step(stage, x) -> (x, feature)` runs one
    stage and gives the feature it exposes. Returns the features at `indices` and, unless
    `intermediates_only`, the final features before them (`norm` applied when every stage ran)."""
    from timm.models._features import feature_take_indices

    take, last = feature_take_indices(len(stages), indices)
    count = last + 1 if stop_early or intermediates_only else len(stages)
    intermediates = []
    for i, stage in enumerate(stages[:count]):
        x, feature = step(stage, x)
        if i in take:
            intermediates.append(feature)
    if intermediates_only:
        return intermediates
    return (norm(x) if norm is not None and count == len(stages) else x), intermediates


def tokens_to_nchw(tokens: torch.Tensor, height, width) -> torch.Tensor:
    """(B, H*W, C) patch tokens as a (B, C, H, W) map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def register_family_model(module: str, name: str, doc: str, model_fn: Callable[..., nn.Module],
                          cfg: Union[dict, Callable[[dict], dict]], layouts: Sequence[Layout] = (),
                          feature_cfg: Optional[dict] = None, **defaults) -> Callable:
    """Register `name` with timm: an entry point `name(pretrained=False, checkpoint_path=None, **kwargs)`
    returning `build_model(model_fn, ...)` on `{**defaults, **kwargs}`, finished as a timm model
    (`finish_timm_model`, with `feature_cfg` for `features_only=True`); `cfg` is the default cfg, or a
    function of those kwargs (for models built for one `img_size`); the cfg of the defaults is the one
    registered with timm. `layouts` are the official checkpoint layouts the model loads besides ours."""

    def cfg_of(kwargs):
        return cfg(kwargs) if callable(cfg) else cfg

    def build(pretrained=False, checkpoint_path=None, **kwargs):
        kwargs = {**defaults, **kwargs}
        features = pop_feature_kwargs(kwargs)
        model_cfg = {**cfg_of(kwargs), **{k: v for k, v in (kwargs.get("pretrained_cfg_overlay") or {}).items()
                                          if k != "file"}}
        model = build_model(model_fn, name, pretrained, kwargs, model_cfg, checkpoint_path)
        return finish_timm_model(model, name, model_cfg, feature_cfg or {}, features)

    register_layouts([name], layouts)
    return register(module, name, build, doc, cfg_of(defaults))


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
