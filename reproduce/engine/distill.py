"""Teachers and logit distillation (RIFormer Tables 2, 3, 5), and student initialization.

Soft distillation: KL(student/tau || teacher/tau) * tau^2. Hard distillation (DeiT-style): cross
entropy against the teacher's argmax. With `use_label`, the ground-truth loss (label smoothing /
mixup targets) is kept: (1 - alpha) * CE + alpha * KD; without it the teacher is the only target.
"""
from __future__ import annotations

from pathlib import Path

import riformer  # noqa: F401  (before timm: installs the torchvision shim)
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from reproduce.engine import EngineError, _show, recipe_field


def load_state(path, what: str) -> dict:
    """A state dict from one of our checkpoints, an official release, or a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{what} checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, path, what: str) -> None:
    """Strict load; a checkpoint of another architecture is a one-line error naming both."""
    state = load_state(path, what)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                 else f"{wrong_shape[0]} has shape {tuple(state[wrong_shape[0]].shape)}, "
                      f"expected {tuple(own[wrong_shape[0]].shape)}")
        raise EngineError(f"{what} checkpoint {path} does not fit {type(model).__name__} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} "
                          f"mis-shaped keys; {first}): is it the right architecture?")
    model.load_state_dict(state)


def create_model(recipe: dict, where: str, name: str, num_classes: int, kwargs: dict,
                 constructor: str | None = None) -> nn.Module:
    """A model of the recipe (the student at `model`, a teacher at `distill.teacher` ...); a bad
    name or a keyword argument the model does not take is a one-line error naming the field."""
    name_field = f"{where}.name" if where == "model" else f"{where}.model"
    if constructor:
        with recipe_field(recipe, f"{where}.constructor"):
            cls = _constructor(constructor)
        with recipe_field(recipe, f"{where}.kwargs"):
            return cls(num_classes=num_classes, **kwargs)
    if not name or name not in timm.list_models(name):
        raise EngineError(f"{_show(recipe['path'])}: field `{name_field}`: {name!r} is not a timm model "
                          "(is it implemented in riformer/?)")
    with recipe_field(recipe, where):
        return timm.create_model(name, num_classes=num_classes, **kwargs)


def _constructor(dotted: str):
    """`riformer.vig.PyramidViG`: a model class of the suite or of timm (recipes/smoke_teachers.yaml)."""
    import importlib

    module, _, attr = dotted.rpartition(".")
    if not module.startswith(("riformer.", "timm.")):
        raise EngineError(f"constructor {dotted!r} must be a class in riformer.* or timm.*")
    return getattr(importlib.import_module(module), attr)


def build_teacher(recipe: dict, where: str, num_classes: int, what: str, random_ok: bool) -> nn.Module:
    """A frozen teacher in eval mode. Full runs need its checkpoint; smoke runs and dry runs may use
    random weights (`checkpoint: null` in the recipe's smoke section; a dry run without the file)."""
    from reproduce.engine.recipe import get

    cfg = get(recipe, where) or {}
    teacher = create_model(recipe, where, cfg.get("model"), num_classes, cfg.get("kwargs", {}), cfg.get("constructor"))
    checkpoint = cfg.get("checkpoint")
    if checkpoint and not (random_ok and recipe["scale"] == "full" and not Path(checkpoint).is_file()):
        with recipe_field(recipe, f"{where}.checkpoint"):
            load_into(teacher, checkpoint, what)
    elif not random_ok:
        raise EngineError(f"{_show(recipe['path'])}: {what} {cfg.get('model')} needs trained weights: "
                          f"set `{where}.checkpoint:` in the recipe")
    teacher.requires_grad_(False)
    return teacher.eval()


def init_from_teacher(student: nn.Module, teacher: nn.Module, teacher_name: str | None = None) -> int:
    """Copy every teacher weight into the student except the student's own new modules: the token
    mixers of a RIFormer (Sec. 4.4, guideline 5), or what a model lists in `student_only_prefixes`
    (SiT's TSM, RTSM and distillation token/head, SiT Sec. 4.1).

    Student and teacher are isomorphic (RIFormer from PoolFormer, SiT from its LV-ViT), so every other
    key must be the teacher's, with its shape; anything else is a wrong teacher. Returns the tensors copied."""
    own, theirs = student.state_dict(), teacher.state_dict()
    prefixes = getattr(student, "student_only_prefixes", None)
    keep = {k: v for k, v in own.items() if (k.startswith(prefixes) if prefixes else ".token_mixer." in k)}
    name = teacher_name or type(teacher).__name__
    for key in own:
        if key in keep:
            continue
        if key not in theirs:
            raise EngineError(f"cannot initialize the student {type(student).__name__} from teacher {name}: "
                              f"the teacher has no {key} (is it the student's own architecture?)")
        if theirs[key].shape != own[key].shape:
            raise EngineError(f"cannot initialize the student {type(student).__name__} from teacher {name}: "
                              f"{key} is {tuple(theirs[key].shape)} in the teacher, {tuple(own[key].shape)} in "
                              "the student (a teacher of another width or size?)")
        own[key] = theirs[key]
    extra = [k for k in theirs if k not in own] if prefixes else []
    if extra:  # e.g. an LV-ViT deeper than the SiT student
        raise EngineError(f"cannot initialize the student {type(student).__name__} from teacher {name}: the "
                          f"student has no {extra[0]} ({len(extra)} teacher tensors unused): a teacher of another depth?")
    student.load_state_dict(own)
    return len(own) - len(keep)


def soft_distillation(student_logits, teacher_logits, tau: float):
    """KL divergence at temperature tau, scaled by tau^2 (Hinton et al.; DeiT's soft variant)."""
    return F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                    reduction="batchmean", log_target=True) * tau * tau


def hard_distillation(student_logits, teacher_logits):
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


class ClassificationLoss(nn.Module):
    """The logit loss of a recipe: CE on (mixed, smoothed) labels, a teacher's, or both."""

    def __init__(self, distill_cfg: dict, label_smoothing: float):
        super().__init__()
        self.kind = distill_cfg.get("type", "none")
        self.use_label = distill_cfg.get("use_label", True) or self.kind == "none"
        self.alpha = distill_cfg.get("alpha", 0.5)
        self.tau = distill_cfg.get("tau", 1.0)
        self.label_smoothing = label_smoothing

    def label_loss(self, logits, target):
        if target.ndim == 2:  # mixup/cutmix soft targets, smoothing already applied by Mixup
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def forward(self, logits, target, teacher_logits=None):
        if self.kind == "none":
            return self.label_loss(logits, target)
        kd = (soft_distillation(logits, teacher_logits, self.tau) if self.kind == "soft"
              else hard_distillation(logits, teacher_logits))
        if not self.use_label:
            return kd
        return (1 - self.alpha) * self.label_loss(logits, target) + self.alpha * kd
