"""SiT's self-slimmed learning: feature recalibration distillation (FRD, SiT Sec. 3.3) and its
optimization (Sec. 4.1). docs/training.md lists every reading of the paper and the official code.

  L_global = L_cls + lambda_token * L_token + lambda_logits * L_logits + lambda_hard * L_hard   (Eq. 9-11)

* L_cls: cross-entropy of the class head against the (mixed, smoothed) label.
* L_token (Eq. 6): block-to-block reconstruction. Student block i's RTSM-recovered patch tokens
  against the teacher's patch tokens after the paired block, mean squared error over batch, tokens
  and channels, averaged over the pairs (the official code's reading of "1/(LN) sum").
* L_logits (Eq. 7): KL(softmax(teacher) || softmax(student)) at temperature tau (x tau^2), class head.
* L_hard (Eq. 8): DeiT hard distillation of the distillation head against an extra CNN teacher's
  top class. Only the distillation head sees it; the class head sees L_cls and L_logits.

The student runs `forward_train` inside `FRDStudent`, the module DDP wraps, so the gradients of
everything the loss reaches (RTSM, hint projections) are averaged across processes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reproduce.engine import EngineError
from reproduce.engine.distill import ClassificationLoss, build_teacher, hard_distillation, soft_distillation

TERMS = ("cls", "token", "logits", "hard")


# --- teachers' block features at the student's token grid ------------------------------------

def _feature_indices(teacher) -> list[int]:
    """timm feature_info entries that are blocks or stages (a CNN's stem is not one)."""
    return [i for i, info in enumerate(teacher.feature_info) if not info["module"].startswith("stem")]


def teacher_widths(teacher) -> list[int]:
    """Channels of every block feature the teacher gives L_token (the LV-ViT's blocks; timm's
    forward_intermediates features otherwise)."""
    if hasattr(teacher, "forward_block_tokens"):
        return [teacher.embed_dim] * len(teacher.blocks)
    if not hasattr(teacher, "forward_intermediates") or not getattr(teacher, "feature_info", None):
        raise EngineError(f"teacher {type(teacher).__name__} exposes no block features (forward_intermediates) "
                          "for L_token: set frd.lambda_token to 0")
    return [teacher.feature_info[i]["num_chs"] for i in _feature_indices(teacher)]


@torch.no_grad()
def teacher_outputs(teacher, images, grid, with_tokens: bool):
    """(logits, [(B, N, C) block features resampled to the student's token grid]) of a frozen teacher."""
    if not with_tokens:
        return teacher(images), []
    if hasattr(teacher, "forward_block_tokens"):
        return teacher.forward_block_tokens(images)
    final, features = teacher.forward_intermediates(images, indices=_feature_indices(teacher), output_fmt="NCHW")
    tokens = []
    for f in features:  # (B, C, h, w): pooled when finer than the student's grid, interpolated when coarser
        if tuple(f.shape[-2:]) != tuple(grid):
            f = (F.adaptive_avg_pool2d(f, grid) if f.shape[-1] >= grid[1]
                 else F.interpolate(f, size=grid, mode="bilinear", align_corners=False))
        tokens.append(f.flatten(2).transpose(1, 2))
    return teacher.forward_head(final), tokens


def block_pairs(num_student: int, num_teacher: int, mode: str) -> list[tuple[int, int]]:
    """(student block, teacher feature) pairs of L_token.

    `same`: block i with block i (the student's own LV-ViT). `uniform` (Table 5's foreign teachers,
    our reading): with more teacher features than student blocks every student block i takes teacher
    feature ceil((i+1) T/S) - 1; with fewer (a CNN's 4 stages), teacher feature k takes student
    block floor((k+1) S/T) - 1, the last block of the k-th of T equal groups."""
    if mode == "same":
        return [(i, i) for i in range(num_student)]
    if num_teacher >= num_student:
        return [(i, math.ceil((i + 1) * num_teacher / num_student) - 1) for i in range(num_student)]
    return [((k + 1) * num_student // num_teacher - 1, k) for k in range(num_teacher)]


class FRDStudent(nn.Module):
    """The module DDP wraps: the student's forward_train, keeping the recovered tokens of the paired
    student blocks (in pair order), each through a linear hint projection (FitNets) where the paired
    teacher feature has another width (Table 5's RegNet, our reading)."""

    def __init__(self, student: nn.Module, blocks: list[int], projections: nn.ModuleList):
        super().__init__()
        self.student, self.blocks, self.projections = student, blocks, projections

    def forward(self, images):
        out = self.student.forward_train(images)
        tokens = [out.block_tokens[i] for i in self.blocks] if out.block_tokens else []
        if len(self.projections):
            tokens = [p(t) for p, t in zip(self.projections, tokens)]
        return out._replace(block_tokens=tokens)


# --- the loss ----------------------------------------------------------------------------------

def _wide(t):
    """float32 for the losses under fp16/bf16 autocast; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class FRDLoss:
    def __init__(self, cfg: dict, label_smoothing: float, pairs: list[tuple[int, int]]):
        self.lambdas = {"token": cfg.get("lambda_token", 2.0), "logits": cfg.get("lambda_logits", 2.0),
                        "hard": cfg.get("lambda_hard", 0.0)}
        self.tau = cfg.get("tau", 1.0)
        self.pairs = pairs
        self.label = ClassificationLoss({"type": "none"}, label_smoothing)

    def compute(self, out, targets, teacher_logits=None, teacher_tokens=(), cnn_logits=None):
        """(total loss, {term: tensor}) of one batch; a term whose lambda is 0 is not computed."""
        terms = {"cls": self.label.label_loss(out.logits, targets)}
        if self.lambdas["token"]:
            terms["token"] = sum(F.mse_loss(_wide(out.block_tokens[k]), _wide(teacher_tokens[t]))
                                 for k, (_, t) in enumerate(self.pairs)) / len(self.pairs)
        if self.lambdas["logits"]:
            terms["logits"] = soft_distillation(_wide(out.logits), _wide(teacher_logits), self.tau)
        if self.lambdas["hard"]:
            terms["hard"] = hard_distillation(_wide(out.dist_logits), _wide(cnn_logits))
        total = terms["cls"] + sum(self.lambdas[k] * v for k, v in terms.items() if k != "cls")
        return total, terms


class FeatureRecalibrationDistillation:
    """What `train.py` calls: the teachers, the loss, and the module DDP wraps."""

    def __init__(self, recipe: dict, student: nn.Module, teacher, cnn_teacher):
        cfg = recipe["frd"]
        self.teacher, self.cnn_teacher = teacher, cnn_teacher
        self.grid = tuple(student.grid_size)
        pairs, projections = [], nn.ModuleList()
        if cfg.get("lambda_token", 2.0):
            widths = teacher_widths(teacher)
            pairs = block_pairs(len(student.blocks), len(widths), cfg.get("teacher_blocks", "same"))
            if any(widths[t] != student.embed_dim for _, t in pairs):
                projections = nn.ModuleList(nn.Linear(student.embed_dim, widths[t]) for _, t in pairs)
        self.loss_fn = FRDLoss(cfg, recipe["data"].get("label_smoothing", 0.0), pairs)
        paired = [s for s, _ in pairs]
        for i, rtsm in enumerate(student.rtsm or []):
            if i not in paired:  # no loss reaches it: frozen, so that DDP and the optimizer skip it
                rtsm.requires_grad_(False)
        self.train_module = FRDStudent(student, paired, projections)
        self.needs_teacher = bool(self.loss_fn.lambdas["token"] or self.loss_fn.lambdas["logits"])
        if not self.needs_teacher:  # it only started the student (SiT w/o FRD): free it
            self.teacher = None

    def to(self, device):
        for module in (self.teacher, self.cnn_teacher, self.train_module):
            if module is not None:
                module.to(device)
        return self

    def __call__(self, train_forward, images, targets):
        """(loss, {term: float}) of one batch: student, teacher and CNN teacher on the same images."""
        out = train_forward(images)
        teacher_logits, teacher_tokens = (teacher_outputs(self.teacher, images, self.grid, bool(self.loss_fn.pairs))
                                          if self.needs_teacher else (None, []))
        cnn_logits = None
        if self.cnn_teacher is not None:
            with torch.no_grad():
                cnn_logits = self.cnn_teacher(images)
        total, terms = self.loss_fn.compute(out, targets, teacher_logits, teacher_tokens, cnn_logits)
        return total, {k: float(terms[k].detach()) if k in terms else 0.0 for k in TERMS}

    def state_dict(self):
        return self.train_module.projections.state_dict()

    def load_state_dict(self, state):
        self.train_module.projections.load_state_dict(state)


# --- building it from a recipe -----------------------------------------------------------------

def _fail(recipe, field, message):
    from reproduce.engine.recipe import RecipeError

    raise RecipeError(f"{recipe['path']}: field `{field}` {message}")


def check_terms(recipe: dict, student: nn.Module) -> None:
    """Every lambda must be a term this student can produce, and every branch it has must train."""
    cfg, name = recipe["frd"], recipe["model"]["name"]
    if not hasattr(student, "forward_train"):
        _fail(recipe, "frd.enabled", f"is true but {name} has no forward_train (FRD trains SiT students)")
    distilled = getattr(student, "num_prefix_tokens", 1) == 2
    has_rtsm = getattr(student, "rtsm", None) is not None
    lam_token, lam_hard = cfg.get("lambda_token", 2.0), cfg.get("lambda_hard", 0.0)
    if lam_hard and not distilled:
        _fail(recipe, "frd.lambda_hard", f"is {lam_hard} but {name} has no distillation head: "
                                         f"use {name}_dist or set it to 0")
    if distilled and not lam_hard:
        _fail(recipe, "frd.lambda_hard", f"is 0 but {name} has a distillation head that only L_hard trains: "
                                         "set it (1 in the paper) or use the model without _dist")
    if lam_hard and not (cfg.get("cnn_teacher") or {}).get("model"):
        _fail(recipe, "frd.cnn_teacher.model", "is missing: L_hard needs the extra CNN teacher")
    if lam_token and not has_rtsm:
        _fail(recipe, "frd.lambda_token", f"is {lam_token} but {name} is built without its recalibration "
                                          "branch (model.kwargs.recalibration): L_token needs it")
    if has_rtsm and not lam_token:
        _fail(recipe, "model.kwargs.recalibration", "builds a recalibration branch that only L_token trains "
                                                    "(frd.lambda_token is 0): set it to false")


def check_teacher_fits(recipe: dict, student: nn.Module, teacher: nn.Module) -> None:
    """Block-to-block FRD (frd.teacher_blocks: same) needs the student's own LV-ViT: same blocks, width, grid."""
    cfg = recipe["frd"]
    if not cfg.get("lambda_token", 2.0) or cfg.get("teacher_blocks", "same") != "same":
        return
    want = (len(student.blocks), student.embed_dim, student.num_patches)
    got = (len(getattr(teacher, "blocks", [])), getattr(teacher, "embed_dim", None), getattr(teacher, "num_patches", None))
    if want != got or not hasattr(teacher, "forward_block_tokens"):
        _fail(recipe, "frd.teacher.model", f"is {cfg['teacher']['model']} ({got[0]} blocks of width {got[1]}, "
                                           f"{got[2]} patches) but block-to-block FRD of {recipe['model']['name']} "
                                           f"needs its own LV-ViT ({want[0]} blocks of width {want[1]}, {want[2]} "
                                           "patches); or set frd.teacher_blocks: uniform for a foreign teacher")


def build(recipe: dict, student: nn.Module, num_classes: int, random_ok: bool = False) -> FeatureRecalibrationDistillation:
    """The FRD objective of a recipe: checks, teachers (frozen), initialization of the student.
    `random_ok`: teachers without their checkpoint file get random weights (smoke runs, dry runs)."""
    cfg = recipe["frd"]
    random_ok = random_ok or recipe["scale"] == "smoke"
    check_terms(recipe, student)
    teacher = build_teacher(recipe, "frd.teacher", num_classes, "FRD teacher", random_ok)
    check_teacher_fits(recipe, student, teacher)
    cnn_teacher = None
    if cfg.get("lambda_hard", 0.0):
        cnn_teacher = build_teacher(recipe, "frd.cnn_teacher", num_classes, "CNN teacher (L_hard)", random_ok)
    if recipe["model"].get("init_from") == "teacher":
        init = recipe["model"].get("init_teacher")
        source = build_teacher(recipe, "model.init_teacher", num_classes, "initial teacher", random_ok) if init else teacher
        init_student(student, source, (init or cfg["teacher"])["model"])
    return FeatureRecalibrationDistillation(recipe, student, teacher, cnn_teacher)


def init_student(student: nn.Module, teacher: nn.Module, teacher_name: str) -> list[str]:
    """SiT Sec. 4.1: every tensor the student shares with its teacher is copied from it; TSM, RTSM and
    the distillation token/head are new; any other tensor missing or mis-shaped is an error."""
    from reproduce.engine.distill import init_from_teacher

    return init_from_teacher(student, teacher, teacher_name)


def check_student_checkpoint(student: nn.Module, state: dict, path) -> None:
    """A SiT checkpoint to start from must hold the TSMs: a teacher's lacks them (use init_from: teacher)."""
    tsm = [k for k in student.state_dict() if k.startswith("tsm.") and k not in state]
    if tsm and any(k.startswith("tsm.") for k in student.state_dict()):
        raise EngineError(f"checkpoint {path} lacks the TSM weights of {type(student).__name__} ({len(tsm)} "
                          f"tensors, e.g. {tsm[0]}): it is not a SiT student checkpoint; to start a student from "
                          "its LV-ViT teacher set model.init_from: teacher")


def param_groups(train_module: nn.Module, lr: float, recalibration_lr: float, weight_decay: float) -> list[dict]:
    """SiT's two learning rates (Sec. 4.1; the official get_param_groups): the recalibration branch
    (RTSM and hint projections, all with weight decay) at `recalibration_lr`, the backbone at `lr`
    with timm's no-decay rule (1-D tensors, biases, tokens and position embeddings). The frozen aux
    head is in no group."""
    student = train_module.student
    no_decay_names = set(getattr(student, "no_weight_decay", lambda: set())())
    decay, no_decay, recal = [], [], []
    for name, p in train_module.named_parameters():
        if not p.requires_grad:
            continue
        inner = name.removeprefix("student.")
        if inner.startswith("rtsm.") or name.startswith("projections."):
            recal.append(p)
        elif p.ndim <= 1 or inner.endswith(".bias") or inner in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
            {"params": recal, "lr": recalibration_lr, "weight_decay": weight_decay, "name": "recalibration"}]
