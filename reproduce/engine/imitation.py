"""Module imitation (RIFormer Sec. 4.4, Eq. 5-9): the student's affine mixer learns to behave
like the teacher's token mixer, block by block.

For each chosen block m, forward hooks (the models stay untouched) record
  norm_in  = LN(T_m)            (norm1's output; Eq. 5, the paper's first form, off by default)
  mixer    = f(LN(T_m))         (the token mixer's output; Eq. 8, L_out)
  out      = T_{m+1}            (the block's output; Eq. 6 L'_in and Eq. 7 L_rel)
for student and teacher alike, and the loss is
  lambda_in * L'_in + lambda_out * L_out + lambda_rel * L_rel (+ lambda_in_norm * L_in),
with lambda = (lambda x batch size, as Table 10 prints it) / global batch size, the feature terms
switched off after `epochs.feat` epochs and the relation term after `epochs.rel`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reproduce.engine import EngineError


def metaformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The MetaFormer blocks of a model in depth order: ours expose `blocks()`; otherwise every
    module with a `norm1` and a token mixer (timm's MetaFormer v2 family)."""
    if callable(getattr(model, "blocks", None)):
        return list(model.blocks())
    return [m for m in model.modules() if hasattr(m, "norm1") and hasattr(m, "token_mixer")]


class BlockRecorder:
    """Forward hooks that keep the latest norm1 / token-mixer / block outputs of chosen blocks."""

    def __init__(self, model: nn.Module, layers: list[int], who: str):
        blocks = metaformer_blocks(model)
        if not blocks:
            raise EngineError(f"{who} {type(model).__name__} has no MetaFormer blocks to imitate")
        bad = [i for i in layers if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise EngineError(f"imitation layer {bad[0]} does not exist: the {who} has {len(blocks)} blocks")
        self.records = [{} for _ in layers]
        self.handles = []
        for record, index in zip(self.records, layers):
            block = blocks[index]
            self._hook(block, record, "out")
            if hasattr(block, "token_mixer"):  # a deploy-form (identity) student has none
                self._hook(block.token_mixer, record, "mixer")
                self._hook(block.norm1, record, "norm_in")

    def _hook(self, module, record, key):
        def save(_module, _inputs, output):
            record[key] = output
        self.handles.append(module.register_forward_hook(save))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _tokens(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) or (N, H, W, C) or (N, L, C) features as (N, L, C) tokens."""
    if x.ndim == 4 and x.shape[1] == channels:
        return x.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def relation(x: torch.Tensor, channels: int) -> torch.Tensor:
    """R(T) = T~ T~^T with T~ the tokens normalized along channels (Eq. 7): (N, L, L)."""
    tokens = F.normalize(_tokens(x, channels), dim=-1)
    return tokens @ tokens.transpose(1, 2)


def _mse(a, b):
    """alpha1 * ||a - b||_F^2 with alpha1 = 1 / (N C H W), i.e. the mean squared error."""
    if a.shape != b.shape:
        raise EngineError(f"student and teacher features differ in shape ({tuple(a.shape)} vs {tuple(b.shape)}): "
                          "module imitation needs an isomorphic teacher")
    return F.mse_loss(a.float(), b.float())


class ModuleImitation:
    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: dict, global_batch: int):
        layers = list(cfg.get("layers", []))
        self.student = BlockRecorder(student, layers, "student")
        self.teacher = BlockRecorder(teacher, layers, "teacher")
        blocks = metaformer_blocks(student)
        self.channels = [blocks[i].norm2.weight.shape[0] for i in layers]
        lambdas = cfg.get("lambda_times_batch", {})
        self.lambdas = {k: lambdas.get(k, 0.0) / global_batch for k in ("in_norm", "in", "out", "rel")}
        if (self.lambdas["out"] or self.lambdas["in_norm"]) and not all(
                hasattr(blocks[i], "token_mixer") for i in layers):
            raise EngineError("L_out / L_in need a token mixer in every imitated student block "
                              "(an identity student has none): set lambda_times_batch.out and .in_norm to 0")
        self.feat_epochs = cfg.get("epochs", {}).get("feat", 0)
        self.rel_epochs = cfg.get("epochs", {}).get("rel", 0)

    def active(self, epoch: int) -> bool:
        return epoch < max(self.feat_epochs, self.rel_epochs)

    def loss(self, epoch: int) -> tuple[torch.Tensor, dict]:
        """The weighted imitation loss of the last forward passes, and its terms (for the log)."""
        terms = {"in_norm": 0.0, "in": 0.0, "out": 0.0, "rel": 0.0}
        use_feat, use_rel = epoch < self.feat_epochs, epoch < self.rel_epochs
        for s, t, channels in zip(self.student.records, self.teacher.records, self.channels):
            if use_feat and self.lambdas["in"]:
                terms["in"] = terms["in"] + _mse(s["out"], t["out"])
            if use_feat and self.lambdas["out"]:
                terms["out"] = terms["out"] + _mse(s["mixer"], t["mixer"])
            if use_feat and self.lambdas["in_norm"]:
                terms["in_norm"] = terms["in_norm"] + _mse(s["norm_in"], t["norm_in"])
            if use_rel and self.lambdas["rel"]:
                # alpha2 = 1 / (N H^2 W^2): the mean over the (N, HW, HW) relation entries
                terms["rel"] = terms["rel"] + _mse(relation(s["out"], channels), relation(t["out"], channels))
        total = sum(self.lambdas[k] * v for k, v in terms.items() if torch.is_tensor(v))
        return total, {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in terms.items()}

    def remove(self):
        self.student.remove()
        self.teacher.remove()
