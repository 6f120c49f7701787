"""One entry point that turns any model of the suite into its inference-time form.

Every module that has a training-time structure which folds away at inference implements
`switch_to_deploy()` (RIFormer's affine mixer into the norm, RePaFormer's channel-idle FFN
into three linears, SiT's training-only recalibration branch, ...). `deploy(model)` calls it
on every such module, innermost first.

A module tells whether it is folded already through a boolean `deployed` or `deploy` attribute
(RIFormerBlock's `deploy` property, ChannelIdleFFN's `deployed`). `deploy()` folds only the
modules that are not, and on a model that is already fully folded it warns and changes nothing.
"""
import warnings

import torch.nn as nn


def _foldable(model: nn.Module):
    """Modules with a `switch_to_deploy()`, innermost first."""
    return [m for m in reversed(list(model.modules())) if callable(getattr(m, "switch_to_deploy", None))]


def is_deployed(module: nn.Module) -> bool:
    """True if `module` says it is in its inference form (a boolean `deployed` or `deploy`)."""
    for name in ("deployed", "deploy"):
        flag = getattr(module, name, None)
        if isinstance(flag, bool):
            return flag
    return False


def deploy(model: nn.Module) -> nn.Module:
    """Fold `model` in place into its inference form and return it.

    Raises ValueError on a model (or any submodule) in training mode, since BatchNorm folds need
    running statistics. Deploying a model twice warns and leaves it unchanged.
    """
    in_training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if in_training:
        raise ValueError("deploy() needs a model in eval mode (call model.eval() first): BatchNorm "
                         f"folds use running statistics; in training mode: {in_training[:3]}")
    foldable = _foldable(model)
    pending = [m for m in foldable if not is_deployed(m)]
    if not pending:
        what = "is already in its deploy form" if foldable else "has nothing to fold"
        warnings.warn(f"deploy(): {type(model).__name__} {what}; the model is returned unchanged",
                      stacklevel=2)
        return model
    for module in pending:
        module.switch_to_deploy()
    return model.eval()  # modules a fold created start in training mode; the model was in eval


def has_deploy_form(model: nn.Module) -> bool:
    return bool(_foldable(model))
