"""One loader behind every checkpoint the suite reads.

`reproduce eval`, `reproduce table --weights`, distillation teachers, `init_from`, the model
functions (`riformer.pvt.pvt_v1_small(checkpoint_path=...)`) and
`timm.create_model(name, checkpoint_path=...)` all come here:

    load_model(name, path, form="deploy")    build `name`, load `path`, fold if asked; the model
    load_checkpoint(model, path)             load into a built model; a LoadReport
    read_state_dict(path)                    the file's weights, read safely

What it does, in order:

1. **Reads safely**: `torch.load(weights_only=True)` with an allow-list of the plain objects
   training scripts put beside the weights (DeiT-style files keep an `argparse.Namespace` under
   'args'; paths; numpy scalars), or safetensors. It never unpickles anything else: a file of
   pickled objects (a whole `nn.Module`, say) is refused with one line, as is a truncated or
   garbage file.
2. **Unwraps** the weights: 'model' / 'state_dict' / 'model_ema' / 'state_dict_ema', 'module.'.
3. **Recognizes the layout**: each family module registers the official layouts its models load
   (`register_layouts`), each a `Layout` naming its release; timm's own models load through
   timm's `checkpoint_filter_fn` of their module. The layout whose conversion fits the model best
   is taken; 'ours' (the model's own key names) is always a candidate.
4. **Loads strictly**: any missing or mis-shaped key is a one-line `CheckpointError` naming the
   layout assumed and the first offending keys. Keys of modules the model does not have at all
   (a release's EMA copies, extra heads such as `head_dist` or `aux_head`: the official code loads
   with strict=False) are dropped and named in one warning line (logger `riformer.checkpoints`,
   and `LoadReport.unexpected`); an unexpected key inside a module the model has (`blocks.0.norm1.*`
   where the model's block has no norm1) is a structural mismatch and refused. A file's
   top-level entries beside the weights ('optimizer', 'epoch', a second 'model_ema') are never
   read. A deploy-form file given for a train-form model (or the reverse) is recognized and said so.
5. `load_model(form="deploy")` loads a train-form file and then folds it (`riformer.deploy`), or
   loads a deploy-form file into the folded model.

`timm.create_model(name, checkpoint_path=FILE)` loads FILE with timm's `load_checkpoint`, after
the entry point has returned; `install_timm_hook()` (run by `import riformer`) makes that call
come here for the suite's models, so their family filters apply there too. timm's own models keep
timm's loader.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import pathlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "Layout", "OURS", "LoadReport", "register_layouts", "layouts_of", "read_state_dict",
           "unwrap_state_dict", "convert_state_dict", "family_filter", "load_checkpoint", "load_model", "sha256", "timm_layout",
           "model_name_of", "install_timm_hook"]


LOG = logging.getLogger("riformer.checkpoints")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message is one line naming the fix."""


@dataclass(frozen=True)
class Layout:
    """One published key layout of a family: who releases files in it and how to map it onto ours.

    `marker`: a regex that some key of every file in this layout matches (None: always a
    candidate). `convert(state_dict, model)` returns the state dict in our key names. `prepare(model)`,
    if given, sets what the release's own code builds differently from our model and no weight
    holds (a norm's eps), on the model a file of this layout is loaded into."""
    name: str
    release: str
    marker: Optional[str] = None
    convert: Callable[[dict, nn.Module], dict] = field(default=lambda state, model: state, compare=False)
    prepare: Optional[Callable[[nn.Module], None]] = field(default=None, compare=False)


OURS = Layout("ours", "this suite's own checkpoints (model.pt, model_deploy.pt) and any file in our key names")

_LAYOUTS: dict[str, tuple[Layout, ...]] = {}  # model name -> the official layouts it loads


def register_layouts(names: Iterable[str], layouts: Sequence[Layout]) -> None:
    """Declare the official layouts the models `names` load (called by each family module)."""
    for name in names:
        _LAYOUTS[name] = tuple(layouts)


def timm_layout(name: str) -> Layout:
    """A timm model's own layout: timm's `checkpoint_filter_fn` of its module, if it has one."""
    import importlib

    from timm.models._registry import _model_to_module

    module = importlib.import_module(f"timm.models.{_model_to_module.get(name, '')}") if name in _model_to_module \
        else None
    timm_filter = getattr(module, "checkpoint_filter_fn", None)

    def convert(state, model):
        return timm_filter(state, model) if timm_filter else state

    return Layout("timm", f"timm's layout of {name} (its hub weights; official files its filter maps)", None, convert)


def layouts_of(name: Optional[str]) -> tuple[Layout, ...]:
    """The layouts `name` loads: its family's official ones (or timm's), then ours. On a tie (our
    layout is some releases' own) the release is named."""
    if name in _LAYOUTS:
        return (*_LAYOUTS[name], OURS)
    if name and _is_timm_model(name):
        return (timm_layout(name), OURS)
    return (OURS,)


def _is_timm_model(name: str) -> bool:
    import timm

    return name in timm.list_models(name)


def is_suite_model(name: Optional[str]) -> bool:
    """True for models registered by this suite (riformer.*), whose loading goes through here."""
    import timm

    if not name or name not in timm.list_models(name):
        return False
    return timm.models.model_entrypoint(name).__module__.startswith("riformer")


def model_name_of(model: nn.Module) -> Optional[str]:
    """The registered name a model was built under (timm's `pretrained_cfg['architecture']`)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


# --- reading ------------------------------------------------------------------------------------

def _safe_globals() -> list:
    """What training scripts save beside the weights and may be read: plain data, no code."""
    allowed = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
               pathlib.PureWindowsPath]
    try:
        import numpy as np

        core = np._core if hasattr(np, "_core") else np.core
        for obj, names in ((core.multiarray.scalar, ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")),
                           (core.multiarray._reconstruct, ("numpy.core.multiarray._reconstruct",
                                                           "numpy._core.multiarray._reconstruct")),
                           (np.ndarray, ("numpy.ndarray",)), (np.dtype, ("numpy.dtype",))):
            allowed += [(obj, n) for n in names]
        allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")]
    except (ImportError, AttributeError):
        pass
    return allowed


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); "
                                  "is it truncated? download it again") from None
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", str(err))
        if found:
            what = f" ({found.group(1) or found.group(2)})"
            raise CheckpointError(
                f"{path} holds pickled Python objects{what}, which this suite does not unpickle (they can run "
                "code); save the weights alone: torch.save(model.state_dict(), FILE)") from None
        detail = re.search(r"(invalid load key[^.\n]*|Unpickling error: [^\n]*)", str(err))
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({detail.group(1) if detail else 'unreadable'}); "
                              "is it truncated or another kind of file?") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a complete PyTorch checkpoint ({first}); is it truncated "
                              "(download it again) or another kind of file?") from None


def unwrap_state_dict(state) -> dict:
    """The weights of a checkpoint saved plain or under 'model' / 'state_dict' / 'model_ema' /
    'state_dict_ema', without the 'module.' prefix of a DataParallel / DDP model."""
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        return state
    return {(k.removeprefix("module.") if isinstance(k, str) else k): v for k, v in state.items()}


def read_state_dict(path) -> dict:
    """The weights in `path` (tensors by key), read safely; a one-line CheckpointError otherwise."""
    path = Path(path)
    state = unwrap_state_dict(_read(path))
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds {type(state).__name__}, not a state dict of weights")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no weight tensors (keys: {', '.join(map(str, list(state)[:5]))})")
    return tensors


# --- layouts and fit ----------------------------------------------------------------------------

@dataclass
class Fit:
    missing: list
    unexpected: list
    misshaped: list  # (key, file shape, model shape)

    droppable: list = field(default_factory=list)  # unexpected keys of modules the model has not

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    @property
    def loadable(self) -> bool:
        """Every tensor of the model is in the file at its shape; what is left over belongs to no
        module of the model (EMA copies, extra heads) and is dropped."""
        return not (self.missing or self.misshaped) and len(self.droppable) == len(self.unexpected)

    def matched(self, own: dict) -> int:
        return len(own) - len(self.missing) - len(self.misshaped)

    def describe(self) -> str:
        parts = [f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.misshaped)} mis-shaped keys"]
        if self.missing:
            parts.append(f"first missing {self.missing[0]}")
        if self.unexpected:
            parts.append(f"first unexpected {self.unexpected[0]}")
        if self.misshaped:
            key, theirs, ours = self.misshaped[0]
            parts.append(f"{key} is {tuple(theirs)} in the file, {tuple(ours)} in the model")
        return "; ".join(parts)


def _fit(state: dict, own: dict, allow_missing: tuple = ()) -> Fit:
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    misshaped = [(k, state[k].shape, own[k].shape) for k in own if k in state and state[k].shape != own[k].shape]
    roots = {k.split(".", 1)[0] for k in own}
    droppable = [k for k in unexpected if k.split(".", 1)[0] not in roots]
    return Fit(missing, unexpected, misshaped, droppable)


def convert_state_dict(state: dict, model: nn.Module, layouts: Sequence[Layout], allow_missing: tuple = ()):
    """(layout, converted state dict, Fit) of the layout that fits `model` best, or None if no
    layout maps any key of the file onto the model."""
    own = model.state_dict()
    best = None
    for layout in layouts:
        if layout.marker and not any(re.search(layout.marker, k) for k in state):
            continue
        try:
            converted = layout.convert(dict(state), model)
        except Exception:  # noqa: BLE001  a conversion that cannot read this file is not its layout
            continue
        fit = _fit(converted, own, allow_missing)
        score = (fit.exact, fit.loadable, fit.matched(own) - len(fit.unexpected))
        if fit.matched(own) and (best is None or score > best[0]):
            best = (score, layout, converted, fit)
    return best[1:] if best else None


def family_filter(layouts: Sequence[Layout]) -> Callable[[dict, nn.Module], dict]:
    """A timm-style `checkpoint_filter_fn(state_dict, model)` over these layouts (and ours)."""

    def checkpoint_filter_fn(state_dict, model):
        state = unwrap_state_dict(state_dict)
        found = convert_state_dict(state, model, (*layouts, OURS))
        return found[1] if found else state

    return checkpoint_filter_fn


# --- forms --------------------------------------------------------------------------------------

def _foldable(model):
    from riformer.deploy import _foldable as foldable

    return foldable(model)


def is_folded(model: nn.Module) -> bool:
    """True if `model` has a deploy form and every foldable module of it is folded."""
    from riformer.deploy import is_deployed

    foldable = _foldable(model)
    return bool(foldable) and all(is_deployed(m) for m in foldable)


def _other_form(model: nn.Module, name: Optional[str]):
    """('deploy'|'train', model in that form) for a model with a deploy form, else None."""
    import timm

    from riformer.deploy import deploy

    if not _foldable(model):
        return None
    if not is_folded(model):
        other = copy.deepcopy(model).eval()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "deploy", deploy(other)
    if name:
        return "train", timm.create_model(name, num_classes=getattr(model, "num_classes", 1000),
                                          **_build_kwargs(model))
    return None


def _build_kwargs(model) -> dict:
    return dict(getattr(model, "_checkpoint_build_kwargs", {}))


# --- loading ------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    path: str
    layout: str
    release: str
    form: str
    missing: list
    unexpected: list


def load_checkpoint(model: nn.Module, path, *, name: Optional[str] = None, strict: bool = True,
                    allow_missing: tuple = (), state: Optional[dict] = None) -> LoadReport:
    """Load `path` into `model` through the layouts of its family; strict unless told otherwise.

    `allow_missing`: key prefixes the file may lack (a SiT student initialised from its teacher).
    Raises CheckpointError (one line) on a file that does not fit."""
    path = Path(path)
    name = name or model_name_of(model) or type(model).__name__
    state = read_state_dict(path) if state is None else state
    layouts = layouts_of(name)
    found = convert_state_dict(state, model, layouts, allow_missing)
    form = "deploy" if is_folded(model) else "train"
    if found is None or (strict and not found[2].loadable):
        other = _other_form(model, name)
        if other is not None:
            other_form, other_model = other
            in_other = convert_state_dict(state, other_model, layouts)
            if in_other is not None and in_other[2].exact:
                hint = ("evaluate it with --deploy (load_model(..., form='deploy'))" if other_form == "deploy" else
                        "load it into the train-form model and fold it afterwards (--deploy does that)")
                raise CheckpointError(f"{path} holds the {other_form} form of {name} ({in_other[0].name} layout), "
                                      f"not the {form} form asked for: {hint}")
        if found is None:
            names = ", ".join(layout.name for layout in layouts)
            first = ", ".join(list(state)[:3])
            raise CheckpointError(f"{path} fits none of the layouts {name} loads ({names}): none of its "
                                  f"{len(state)} keys (first: {first}) is one of the model's; is it a checkpoint "
                                  "of another architecture?")
        layout, _, fit = found
        raise CheckpointError(f"{path}, read as the {layout.name} layout ({form} form), does not fit {name}: "
                              f"{fit.describe()}; is it a checkpoint of another architecture or size?")
    layout, converted, fit = found
    if fit.misshaped:  # only with strict=False: load what fits
        converted = {k: v for k, v in converted.items() if k not in {m[0] for m in fit.misshaped}}
    if fit.unexpected:
        LOG.warning("%s (%s layout): dropped %d keys %s has no module for: %s", path, layout.name,
                    len(fit.unexpected), name, _grouped(fit.unexpected))
    if layout.prepare is not None:
        layout.prepare(model)
    result = model.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys]
    if strict and [k for k in missing if not k.startswith(allow_missing)]:  # defensive: _fit said exact
        raise CheckpointError(f"{path} left {missing[0]} of {name} unloaded")
    return LoadReport(str(path), layout.name, layout.release, form, missing, list(result.unexpected_keys))


def _grouped(keys: list) -> str:
    """Keys named by their top module: 'head_dist.{weight,bias}, ema_model.* (312 keys)'."""
    groups: dict = {}
    for key in keys:
        root, _, rest = key.partition(".")
        groups.setdefault(root, []).append(rest)
    parts = []
    for root, rests in groups.items():
        if rests == [""]:
            parts.append(root)
        elif len(rests) <= 3:
            parts.append(f"{root}.{{{','.join(rests)}}}" if len(rests) > 1 else f"{root}.{rests[0]}")
        else:
            parts.append(f"{root}.* ({len(rests)} keys)")
    return ", ".join(parts)


def load_model(name: str, path, *, form: str = "train", strict: bool = True, **kwargs) -> nn.Module:
    """`name` built with `kwargs`, `path` loaded into it, in `form` ('train' or 'deploy'), eval mode.

    For form='deploy' a train-form file is loaded and then folded; a deploy-form file is loaded
    into the folded model. A deploy-form file cannot give a train-form model (one-line error)."""
    import timm

    from riformer.deploy import deploy, has_deploy_form

    if form not in ("train", "deploy"):
        raise CheckpointError(f"form must be 'train' or 'deploy', got {form!r}")
    if name not in timm.list_models(name):
        raise CheckpointError(f"unknown model {name!r} (see `timm.list_models()` after `import riformer`)")
    model = timm.create_model(name, **kwargs).eval()
    model._checkpoint_build_kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    if form == "deploy" and not has_deploy_form(model):
        form = "train"  # nothing to fold: the train form is the deploy form
    state = read_state_dict(path)
    if form == "train":
        model.checkpoint_report = load_checkpoint(model, path, name=name, strict=strict, state=state)
        return model
    try:
        report = load_checkpoint(model, path, name=name, strict=strict, state=state)
        deploy(model)
    except CheckpointError as train_error:
        folded = deploy(model)
        try:
            report = load_checkpoint(folded, path, name=name, strict=strict, state=state)
        except CheckpointError:
            raise train_error from None
        model = folded
    model.checkpoint_report = report
    return model.eval()


# --- timm.create_model(name, checkpoint_path=...) -------------------------------------------------

def install_timm_hook() -> None:
    """Route timm.create_model's `checkpoint_path` loading through `load_checkpoint` for the
    suite's models and the timm models with official layouts declared here (timm loads it after the
    entry point returns, without our family filters)."""
    from timm.models import _factory

    original = _factory.load_checkpoint
    if getattr(original, "routes_suite_models", False):
        return

    def load_checkpoint_for_timm(model, checkpoint_path, *args, **kwargs):
        name = model_name_of(model)
        if is_suite_model(name) or name in _LAYOUTS:  # ours, or a timm model with official layouts declared
            return load_checkpoint(model, checkpoint_path, name=name, strict=kwargs.get("strict", True))
        return original(model, checkpoint_path, *args, **kwargs)

    load_checkpoint_for_timm.routes_suite_models = True
    _factory.load_checkpoint = load_checkpoint_for_timm
