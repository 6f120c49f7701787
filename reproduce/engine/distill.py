"""Teachers and logit distillation (RIFormer Tables 2, 3, 5), and student initialization.

Soft distillation: KL(student/tau || teacher/tau) * tau^2. Hard distillation (DeiT-style): cross
entropy against the teacher's argmax. With `use_label`, the ground-truth loss (label smoothing /
mixup targets) is kept: (1 - alpha) * CE + alpha * KD; without it the teacher is the only target.
"""
from __future__ import annotations


import riformer  # noqa: F401  (before timm: installs the torchvision shim)
import timm
from riformer.checkpoints import CheckpointError, load_checkpoint, read_state_dict
import torch
import torch.nn as nn
import torch.nn.functional as F

from reproduce.engine import EngineError


def load_state(path, what: str) -> dict:
    """The weights in a checkpoint (ours or an official release), read safely (riformer.checkpoints)."""
    try:
        return read_state_dict(path)
    except CheckpointError as err:
        raise EngineError(f"{what} checkpoint: {err}") from None


def load_into(model: nn.Module, path, what: str, name: str | None = None, **options):
    """Strict load through the model family's official layouts (riformer.checkpoints.load_checkpoint);
    a file of another architecture or form is a one-line EngineError naming both."""
    try:
        return load_checkpoint(model, path, name=name, **options)
    except CheckpointError as err:
        raise EngineError(f"{what} checkpoint: {err}") from None


def build_teacher(cfg: dict, num_classes: int, what: str, scale: str) -> nn.Module:
    """A frozen teacher in eval mode. Full runs need its checkpoint; smoke runs may use random
    weights (`checkpoint: null` in the recipe's smoke section)."""
    name = cfg.get("model")
    if name not in timm.list_models(name):
        raise EngineError(f"{what} model {name!r} is not a timm model (is it implemented in riformer/?)")
    teacher = timm.create_model(name, num_classes=num_classes, **cfg.get("kwargs", {}))
    checkpoint = cfg.get("checkpoint")
    if checkpoint:
        load_into(teacher, checkpoint, what, name)
    elif scale == "full":
        raise EngineError(f"{what} {name} needs trained weights: set `checkpoint:` in the recipe")
    teacher.requires_grad_(False)
    return teacher.eval()


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every teacher weight into the student except the token mixers (Sec. 4.4, guideline 5).

    Student and teacher are isomorphic MetaFormers (RIFormer from PoolFormer), so the keys agree
    outside `token_mixer`; anything else missing is a wrong teacher. Returns the tensors copied."""
    own, theirs = student.state_dict(), teacher.state_dict()
    keep = {k: v for k, v in own.items() if ".token_mixer." in k}
    for key in own:
        if key in keep:
            continue
        if key not in theirs or theirs[key].shape != own[key].shape:
            raise EngineError(f"cannot initialize the student from teacher {type(teacher).__name__}: "
                              f"no matching weight for {key}")
        own[key] = theirs[key]
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
