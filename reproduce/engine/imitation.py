"""Module imitation (RIFormer Sec. 4.4, Eq. 5-9): the student's affine mixer learns to behave
like the teacher's token mixer, block by block.

For each chosen block m, forward hooks (the models stay untouched) record
  norm_in  = LN(T_m)            (norm1's output; Eq. 5, the paper's first form, off by default)
  mixer    = f(LN(T_m))         (the token mixer's output; Eq. 8, L_out)
  out      = T_{m+1}            (the block's output; Eq. 6 L'_in and Eq. 7 L_rel)
for student and teacher alike, and the loss is
  lambda_in * L'_in + lambda_out * L_out + lambda_rel * L_rel (+ lambda_in_norm * L_in),
the feature terms switched off after `epochs.feat` epochs and the relation term after `epochs.rel`.

Table 10 prints "lambda x batch size"; `lambda_reading` says how that becomes the lambda on the
batch-mean losses of Eqs. 5-8: `as_printed` (the printed number is lambda), `divided_by_batch`
(lambda = printed / global batch, the literal algebra) or `times_batch` (lambda = printed x batch).
docs/training.md gives the measured size of each term under each reading and why the default is
`as_printed`.

Features are compared as (N, L, C) tokens. A block's layout is read off the model, not guessed from
shapes: timm's MetaFormer stages with attention (CAFormer's stages 3-4) run token-major (N, L, C),
every other stage NCHW.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reproduce.engine import EngineError


def metaformer_blocks(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(block, token_major) of every MetaFormer block of a model in depth order: ours expose
    `blocks()`; timm's MetaFormer v2 family has stages whose `use_nchw` is False when its blocks
    see (N, L, C) tokens; otherwise every module with a `norm1` and a token mixer, NCHW."""
    if callable(getattr(model, "blocks", None)):
        return [(block, False) for block in model.blocks()]
    stages = getattr(model, "stages", None)
    if stages is not None and all(hasattr(stage, "use_nchw") for stage in stages):
        return [(block, not stage.use_nchw) for stage in stages for block in stage.blocks]
    return [(m, False) for m in model.modules() if hasattr(m, "norm1") and hasattr(m, "token_mixer")]


class BlockRecorder:
    """Forward hooks that keep the latest norm1 / token-mixer / block outputs of chosen blocks,
    as (N, L, C) tokens."""

    def __init__(self, model: nn.Module, layers: list[int], who: str, where: str = ""):
        blocks = metaformer_blocks(model)
        if not blocks:
            raise EngineError(f"{where}field `imitation.teacher.model`: {who} {type(model).__name__} has no "
                              "MetaFormer blocks to imitate")
        bad = [i for i in layers if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise EngineError(f"{where}field `imitation.layers`: imitation layer {bad[0]} does not exist: the {who} "
                              f"has {len(blocks)} blocks")
        self.records = [{} for _ in layers]
        self.handles = []
        for record, index in zip(self.records, layers):
            block, token_major = blocks[index]
            self._hook(block, record, "out", token_major)
            if hasattr(block, "token_mixer"):  # a deploy-form (identity) student has none
                self._hook(block.token_mixer, record, "mixer", token_major)
                self._hook(block.norm1, record, "norm_in", token_major)

    def _hook(self, module, record, key, token_major):
        def save(_module, _inputs, output):
            record[key] = output if token_major else _tokens(output)
        self.handles.append(module.register_forward_hook(save))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) features as (N, HW, C) tokens."""
    return x.flatten(2).transpose(1, 2)


def relation(tokens: torch.Tensor) -> torch.Tensor:
    """R(T) = T~ T~^T with T~ the tokens normalized along channels (Eq. 7): (N, L, L)."""
    tokens = F.normalize(tokens, dim=-1)
    return tokens @ tokens.transpose(1, 2)


def _mse(a, b, where=""):
    """alpha1 * ||a - b||_F^2 with alpha1 = 1 / (N C H W), i.e. the mean squared error."""
    if a.shape != b.shape:
        raise EngineError(f"{where}field `imitation.teacher.model`: student and teacher features differ in shape "
                          f"({tuple(a.shape)} vs {tuple(b.shape)} as N, L, C tokens): module imitation needs an "
                          "isomorphic teacher")
    return F.mse_loss(a.float(), b.float())


LAMBDA_READINGS = {"as_printed": lambda printed, batch: printed,
                   "divided_by_batch": lambda printed, batch: printed / batch,
                   "times_batch": lambda printed, batch: printed * batch}


class ModuleImitation:
    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: dict, global_batch: int, where=None):
        self.where = f"{where}: " if where else ""
        layers = list(cfg.get("layers", []))
        self.student = BlockRecorder(student, layers, "student", self.where)
        self.teacher = BlockRecorder(teacher, layers, "teacher", self.where)
        blocks = [block for block, _ in metaformer_blocks(student)]
        printed = cfg.get("lambda_times_batch", {})
        self.reading = cfg.get("lambda_reading", "as_printed")
        self.lambdas = {k: LAMBDA_READINGS[self.reading](printed.get(k, 0.0), global_batch)
                        for k in ("in_norm", "in", "out", "rel")}
        if (self.lambdas["out"] or self.lambdas["in_norm"]) and not all(
                hasattr(blocks[i], "token_mixer") for i in layers):
            raise EngineError(f"{self.where}field `imitation.lambda_times_batch`: L_out / L_in need a token mixer in "
                              "every imitated student block (an identity student has none): set "
                              "lambda_times_batch.out and .in_norm to 0")
        self.feat_epochs = cfg.get("epochs", {}).get("feat", 0)
        self.rel_epochs = cfg.get("epochs", {}).get("rel", 0)

    def active(self, epoch: int) -> bool:
        return epoch < max(self.feat_epochs, self.rel_epochs)

    def loss(self, epoch: int) -> tuple[torch.Tensor, dict]:
        """The weighted imitation loss of the last forward passes, and its terms for the log: each
        term as computed (`in`, `out`, `rel`, ...) and as weighted into the loss (`lambda_in`, ...)."""
        terms = {"in_norm": 0.0, "in": 0.0, "out": 0.0, "rel": 0.0}
        use_feat, use_rel = epoch < self.feat_epochs, epoch < self.rel_epochs
        w = self.where
        for s, t in zip(self.student.records, self.teacher.records):
            if use_feat and self.lambdas["in"]:
                terms["in"] = terms["in"] + _mse(s["out"], t["out"], w)
            if use_feat and self.lambdas["out"]:
                terms["out"] = terms["out"] + _mse(s["mixer"], t["mixer"], w)
            if use_feat and self.lambdas["in_norm"]:
                terms["in_norm"] = terms["in_norm"] + _mse(s["norm_in"], t["norm_in"], w)
            if use_rel and self.lambdas["rel"]:
                # alpha2 = 1 / (N H^2 W^2): the mean over the (N, HW, HW) relation entries
                terms["rel"] = terms["rel"] + _mse(relation(s["out"]), relation(t["out"]), w)
        total = sum(self.lambdas[k] * v for k, v in terms.items() if torch.is_tensor(v))
        logged = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in terms.items()}
        logged.update({f"lambda_{k}": self.lambdas[k] * v for k, v in logged.items()})
        return total, logged

    def remove(self):
        self.student.remove()
        self.teacher.remove()
