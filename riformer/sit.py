"""SiT: Self-slimmed Vision Transformer (Zong et al., ECCV 2022) on SiT's LV-ViT teachers.

A SiT student is its LV-ViT teacher (`riformer.lvvit`, same weights layout) with a token slimmer
inserted three times, at the stage boundaries of SiT Table 2a (`stage_depths`, e.g. {1,1,1,11}):

* TSM (token slimming module, SiT Eq. 1-3): N patch tokens -> N_hat = keep_ratio^k * N tokens,
  X_hat = A X with A = softmax(W_q GELU(W_k LN(X))^T * scale), a learned, input-dependent soft
  aggregation. As in the official code, the softmax runs over the N input tokens, so every new token
  is a convex combination of the old ones (SiT Eq. 2 writes the sum over the other index).
* Table 7's static alternatives (`slimming=`): `avgpool` / `conv` (3x3, stride 2x2 on the token
  grid, so each one keeps ~1/4 of the tokens whatever `keep_ratio` is; `strided_layout="sequence"`
  slides a window of 3 with stride 2 along the token sequence instead, keeping ~1/2 as Table 7's
  "similar computation" implies) and `token_mlp` (two linears with GELU along the token axis,
  N -> 4N -> N_hat).
* RTSM (reverse TSM, Eq. 4-5), training only: after every block from the first slimming on, it maps
  that block's N_hat tokens back to N tokens (token MLP N_hat -> 4N -> N, then a residual channel
  MLP) so they can be compared with the teacher's tokens in feature recalibration distillation.
  `switch_to_deploy()` (called by `riformer.deploy.deploy`) deletes it; `training_only_params`
  counts it. Table 8's alternatives (`recalibration=`): `token_mlp` (Eq. 4 without Eq. 5's MLP),
  `interpolation` and `deconvolution` (the slimmed tokens laid out on a grid and upsampled, see
  `ContiguousUpsampling`); `recalibration=False` builds none (students trained without L_token).
* The teacher's token-labeling `aux_head` is carried (official checkpoints and printed sizes have
  it) and frozen (`requires_grad=False`), as the official SiT code does: no SiT loss reaches it.
* `sit_deit_s`: SiT on timm's DeiT-S body (SiT Table 1), TSMs after blocks 3/6/9 (our reading).

Forward contract (timm's, as for timm's distilled DeiT with `distilled_training` off):
* `forward(x) == forward_head(forward_features(x))`: logits (B, classes) in training and eval mode
  alike; for the `_dist` variants the mean of the class and distillation heads (DeiT-style), so a
  standard classification loop trains and evaluates every SiT.
* `forward_train(x)` is what feature recalibration distillation calls:
  `SiTTrainOutput(logits, dist_logits, block_tokens)`, the order of the official code:
  `dist_logits` is the distillation-token head's output (for L_hard, Eq. 8) or `logits` again
  without one; `block_tokens` has one (B, N, C) tensor per block, the RTSM-recovered patch tokens
  (the block's own tokens before the first slimming), to be matched with the teacher's
  `LVViT.forward_block_tokens` output (L_token, Eq. 6-7). Without RTSM (after deploy, or
  `recalibration=False`) `block_tokens` is empty.

timm's interface (LV-ViT's, see riformer/lvvit.py): the `_dist` variants pool 'token' (both heads,
averaged) or '' (all tokens). Features are per block, before the slimming that may follow it: NLC by
default (`features_only=True`), since slimmed tokens are no longer a grid; NCHW only for the blocks
before the first slimming. `feature_info` gives each block's `num_tokens`.

Parameter counts (aux token-labeling head included, RTSM excluded) reproduce SiT Table 2a and
Table 3 (15.9/25.6/25.6/55.6/148.2M and 16.2/26.0/26.0/56.2M for the ‡ rows).
"""
import math
from typing import List, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from riformer._builder import check_choice, imagenet_cfg, init_vit_weights, register_family_model
from riformer.checkpoints import Layout, family_filter
from riformer.lvvit import FEATURE_CFG, SIT_TEACHERS, LVViT, rename_stem_key, resize_pos_embed, _cfg

__all__ = ["SiT", "TokenSlimming", "ReverseTokenSlimming", "SiTTrainOutput", "training_only_params",
           "checkpoint_filter_fn", "STUDENT_ONLY"]

# What a SiT student has and its LV-ViT teacher lacks: `load_checkpoint(student, teacher_file,
# allow_missing=STUDENT_ONLY)` initialises a student from its teacher (SiT's fine-tuning setting).
STUDENT_ONLY = ("tsm.", "rtsm.", "head_dist.", "dist_token", "dist_pos_embed")

SLIMMINGS = ("tsm", "avgpool", "conv", "token_mlp")
RECALIBRATIONS = ("rtsm", "token_mlp", "interpolation", "deconvolution")  # SiT Table 8


class SiTTrainOutput(NamedTuple):
    logits: torch.Tensor
    dist_logits: torch.Tensor
    block_tokens: List[torch.Tensor]


class TokenSlimming(nn.Module):
    """TSM: soft, input-dependent aggregation of N tokens into `num_out` tokens (SiT Eq. 1-3)."""

    def __init__(self, dim, num_out):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim // 2)  # W_k
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim // 2, num_out)  # W_q
        self.scale = nn.Parameter(torch.ones(1, 1, 1))  # 1 / tau, learned

    def forward(self, x):
        logits = self.fc2(self.act(self.fc1(self.norm(x))))  # (B, N, num_out)
        weights = F.softmax(logits * self.scale, dim=1).transpose(1, 2)  # normalised over the N inputs
        return weights @ x


class TokenMlpSlimming(nn.Module):
    """Table 7 'Token-MLP': static weights along the token axis, N -> hidden_ratio*N -> num_out."""

    def __init__(self, num_in, num_out, hidden_ratio=4):
        super().__init__()
        self.mlp = Mlp(num_in, hidden_ratio * num_in, num_out, act_layer=nn.GELU)

    def forward(self, x):
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


class StridedSlimming(nn.Module):
    """Table 7 '3x3 AvgPool' / '3x3 Conv' with stride 2.

    layout 'grid' (the paper's words): 3x3 window, stride 2x2 on the (H, W) token grid, ~1/4 of the
    tokens kept. layout 'sequence': window 3, stride 2 along the token sequence, ~1/2 kept, i.e.
    the token counts (and so the cost) of TSM at keep ratio 0.5 that Table 7 prints.
    """

    def __init__(self, kind, dim, grid=None):
        super().__init__()
        self.grid = grid
        if grid is None:
            self.reduce = (nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False) if kind == "avgpool"
                           else nn.Conv1d(dim, dim, 3, stride=2, padding=1))
        else:
            self.reduce = (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False) if kind == "avgpool"
                           else nn.Conv2d(dim, dim, 3, stride=2, padding=1))

    def forward(self, x):
        B, N, C = x.shape
        x = x.transpose(1, 2)
        if self.grid is not None:
            x = x.reshape(B, C, *self.grid)
        return self.reduce(x).flatten(2).transpose(1, 2)

    @staticmethod
    def output_size(size):
        return (size + 1) // 2  # window 3, stride 2, padding 1


class ReverseTokenSlimming(nn.Module):
    """RTSM: recover `num_out` tokens from `num_in` slimmed ones (SiT Eq. 4-5), training only.

    `channel_mlp=False` is Table 8's "Token-MLP" row: Eq. 4 alone, without Eq. 5's residual MLP."""

    def __init__(self, dim, num_in, num_out, ratio=4, channel_mlp=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(num_in, ratio * num_out, num_out, act_layer=nn.GELU)  # A_2 GELU(A_1 X_hat)
        self.norm2 = nn.LayerNorm(dim) if channel_mlp else None
        self.channel_mlp = Mlp(dim, ratio * dim, dim, act_layer=nn.GELU) if channel_mlp else None

    def forward(self, x):
        x = self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x if self.channel_mlp is None else x + self.channel_mlp(self.norm2(x))


def token_grid(num_tokens):
    """(rows, cols) of the most square grid holding exactly `num_tokens` tokens (98 -> 7x14, 24 -> 4x6):
    how Table 8's contiguous upsamplings lay out a slimmed (unstructured) token set."""
    rows = math.isqrt(num_tokens)
    while num_tokens % rows:
        rows -= 1
    return rows, num_tokens // rows


class ContiguousUpsampling(nn.Module):
    """Table 8's "Interpolation" / "Deconvolution" recalibrations (training only).

    The slimmed tokens, in order, fill a `token_grid(num_in)` grid that is upsampled to the patch
    grid: bilinearly, or by a learned transposed convolution (kernel = stride = the per-axis factor,
    rounded up) followed by a bilinear resize where that overshoots (e.g. 4x6 -> 16x18 -> 14x14)."""

    def __init__(self, kind, dim, num_in, grid):
        super().__init__()
        self.kind, self.grid_in, self.grid_out = kind, token_grid(num_in), tuple(grid)
        self.deconv = None
        if kind == "deconvolution":
            stride = tuple(math.ceil(o / i) for o, i in zip(self.grid_out, self.grid_in))
            self.deconv = nn.ConvTranspose2d(dim, dim, kernel_size=stride, stride=stride)

    def forward(self, x):
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *self.grid_in)
        if self.deconv is not None:
            x = self.deconv(x)
        if tuple(x.shape[-2:]) != self.grid_out:
            x = F.interpolate(x, size=self.grid_out, mode="bilinear", align_corners=False)
        return x.flatten(2).transpose(1, 2)


class SiT(LVViT):
    # Weights a SiT student has and its LV-ViT teacher has not: new when a student starts from its
    # teacher (SiT Sec. 4.1); every other tensor is the teacher's.
    student_only_prefixes = STUDENT_ONLY

    def __init__(self, stage_depths=(1, 1, 1, 11), keep_ratio=0.5, slimming="tsm", strided_layout="grid",
                 distilled=False, recalibration=True, **kwargs):
        super().__init__(**kwargs)
        if slimming not in SLIMMINGS:
            raise ValueError(f"slimming must be one of {SLIMMINGS}, got {slimming!r}")
        recalibration = "rtsm" if recalibration is True else recalibration or None
        if recalibration is not None and recalibration not in RECALIBRATIONS:
            raise ValueError(f"recalibration must be one of {RECALIBRATIONS} or false, got {recalibration!r}")
        self.recalibration = recalibration
        if strided_layout not in ("grid", "sequence"):
            raise ValueError(f"strided_layout must be 'grid' or 'sequence', got {strided_layout!r}")
        if sum(stage_depths) != len(self.blocks):
            raise ValueError(f"stage depths {stage_depths} do not add up to depth {len(self.blocks)}")
        self.stage_depths = tuple(stage_depths)
        self.slimming = slimming
        self.num_prefix_tokens = 2 if distilled else 1
        dim = self.embed_dim

        # Slimmers after the last block of every stage but the last; token counts follow the input size.
        self.slim_after = [sum(stage_depths[:i + 1]) - 1 for i in range(len(stage_depths) - 1)]
        self.stage_tokens = [self.num_patches]
        grid, slimmers = self.grid_size, []
        for stage in range(1, len(stage_depths)):
            num_in = self.stage_tokens[-1]
            if slimming in ("avgpool", "conv") and strided_layout == "grid":
                slimmers.append(StridedSlimming(slimming, dim, grid))
                grid = tuple(StridedSlimming.output_size(side) for side in grid)
                num_out = grid[0] * grid[1]
            elif slimming in ("avgpool", "conv"):
                slimmers.append(StridedSlimming(slimming, dim))
                num_out = StridedSlimming.output_size(num_in)
            else:
                num_out = max(1, int(self.num_patches * keep_ratio ** stage))
                slimmers.append(TokenSlimming(dim, num_out) if slimming == "tsm" else TokenMlpSlimming(num_in, num_out))
            self.stage_tokens.append(num_out)
        self.tsm = nn.ModuleList(slimmers)

        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.dist_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
            self.head_dist = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
            trunc_normal_(self.dist_token, std=.02)
            trunc_normal_(self.dist_pos_embed, std=.02)

        for i, info in enumerate(self.feature_info):  # the tokens each block sees (and outputs, before slimming)
            info["num_tokens"] = self.stage_tokens[sum(j < i for j in self.slim_after)]
        if distilled:
            self.global_pools = ("token", "")
            check_choice(self.global_pool, self.global_pools, "global_pool of a distilled SiT")

        # One RTSM (or Table 8 alternative) per block whose output is slimmed (from the first slimming on).
        self.rtsm = None
        if recalibration:
            self.rtsm = nn.ModuleList([
                self._recalibrator(recalibration, num_in) if num_in < self.num_patches else nn.Identity()
                for num_in in self.block_output_tokens()])
        for module in [self.tsm, self.rtsm, getattr(self, "head_dist", None)]:
            if module is not None:
                module.apply(init_vit_weights)
        self._freeze_aux_head()

    def _recalibrator(self, kind, num_in):
        if kind in ("rtsm", "token_mlp"):
            return ReverseTokenSlimming(self.embed_dim, num_in, self.num_patches, channel_mlp=kind == "rtsm")
        return ContiguousUpsampling(kind, self.embed_dim, num_in, self.grid_size)

    def _freeze_aux_head(self):
        """The teacher's token-labeling head rides along untrained, as in the official SiT code."""
        if self.aux_head is not None:
            self.aux_head.requires_grad_(False)

    def block_output_tokens(self):
        """Patch tokens leaving each block (after the slimming that follows it, if any)."""
        counts, stage = [], 0
        for i in range(len(self.blocks)):
            if i in self.slim_after:
                stage += 1
            counts.append(self.stage_tokens[stage])
        return counts

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token", "dist_pos_embed"}

    def reset_classifier(self, num_classes, global_pool=None):
        super().reset_classifier(num_classes, global_pool)
        self._freeze_aux_head()
        if self.num_prefix_tokens == 2:
            self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x):
        if self.num_prefix_tokens == 1:
            return super().embed(x)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        pos = torch.cat([self.pos_embed[:, :1], self.dist_pos_embed, self.pos_embed[:, 1:]], dim=1)
        return self.pos_drop(x + pos)

    def forward_blocks(self, x, recover=False):
        """Run the blocks and slimmers; with `recover`, also the RTSM-recovered tokens of every block."""
        block_tokens = []
        recover = recover and self.rtsm is not None
        p = self.num_prefix_tokens
        for i, block in enumerate(self.blocks):
            x = self.after_block(i, self.run_block(block, x))
            if recover:
                block_tokens.append(self.rtsm[i](x[:, p:]))
        return self.norm(x), block_tokens

    def after_block(self, i, x):
        """The token slimming after block `i`, if one follows it."""
        if i in self.slim_after:
            p = self.num_prefix_tokens
            tokens = self.tsm[self.slim_after.index(i)](x[:, p:])
            x = torch.cat([x[:, :p], tokens], dim=1)
        return x

    def patch_grid(self, i, patches):
        num_tokens = self.feature_info[i]["num_tokens"]
        if num_tokens != self.num_patches:
            raise ValueError(f"block {i} of this SiT sees {num_tokens} slimmed tokens, not the "
                             f"{self.grid_size[0]}x{self.grid_size[1]} grid: use output_fmt='NLC'")
        return super().patch_grid(i, patches)

    def forward_features(self, x):
        return self.forward_blocks(self.embed(x))[0]

    def _heads(self, x):
        logits = self.head(x[:, 0])
        return logits, (self.head_dist(x[:, 1]) if self.num_prefix_tokens == 2 else logits)

    def forward_head(self, x, pre_logits=False):
        if self.num_prefix_tokens == 1 or not self.global_pool:
            return super().forward_head(x, pre_logits)
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2
        logits, dist_logits = self._heads(x)
        return (logits + dist_logits) / 2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_train(self, x) -> SiTTrainOutput:
        """Both heads' logits and the recovered tokens of every block (feature recalibration distillation)."""
        x, block_tokens = self.forward_blocks(self.embed(x), recover=True)
        return SiTTrainOutput(*self._heads(x), block_tokens)

    def forward_block_tokens(self, x):
        raise NotImplementedError("a SiT student's FRD tokens come from forward_train()")

    def switch_to_deploy(self):
        """Drop the training-only recalibration branch (RTSM)."""
        self.rtsm = None

    @property
    def deployed(self) -> bool:
        """In its inference form: no training-only recalibration branch."""
        return self.rtsm is None


def training_only_params(model: nn.Module) -> int:
    """Parameters that exist only for training (SiT's RTSM branch); 0 after deploy."""
    rtsm = getattr(model, "rtsm", None)
    return sum(p.numel() for p in rtsm.parameters()) if rtsm is not None else 0


def _from_official(state_dict, model):
    """Map an official Sense-X/SiT checkpoint (or an LV-ViT teacher one) onto our module names.

    Official names: tsm.{k}.weight.{0,1,3} (LN, W_k, W_q), rtsm.{i}.mlp1/mlp2 (token/channel MLP).
    """
    out = {}
    for key, value in state_dict.items():
        key = rename_stem_key(key)
        parts = key.split(".")
        if parts[0] == "tsm" and parts[2] == "weight":
            parts[2:4] = [{"0": "norm", "1": "fc1", "3": "fc2"}[parts[3]]]
        elif parts[0] == "rtsm" and parts[2] in ("mlp1", "mlp2"):
            parts[2] = {"mlp1": "token_mlp", "mlp2": "channel_mlp"}[parts[2]]
        key = ".".join(parts)
        if key.startswith("rtsm.") and model.rtsm is None:
            continue
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resize_pos_embed(value, model.pos_embed.shape[1] - 1)
        out[key] = value
    return out


# name: (teacher, stage depths), SiT Table 2a.
SIT_CONFIGS = {
    "ti": ("ti", (1, 1, 1, 11)),
    "xs": ("s", (1, 1, 1, 13)),
    "s": ("s", (9, 3, 2, 2)),
    "m": ("m", (10, 4, 3, 3)),
    "l": ("l", (10, 4, 3, 7)),
}


LAYOUTS = (Layout("Sense-X/SiT", "SiT release (github.com/Sense-X/SiT README, Google Drive: {'model': ...}, "
                   "train form: TSM and RTSM)", r"^patch_embed\.conv1\.weight$", _from_official),)
checkpoint_filter_fn = family_filter(LAYOUTS)


SIT_FEATURE_CFG = {**FEATURE_CFG, "output_fmt": "NLC"}  # slimmed tokens are not a grid

# SiT on DeiT-S (SiT Table 1 / Fig. 5a): timm's deit_small_patch16_224 body with three TSMs. The paper
# gives neither the TSM locations nor the keep ratios; ours: after blocks 3, 6 and 9 (DynamicViT's
# locations, the method Table 1 compares with) and keep ratio 0.5 (SiT's default; Table 1's second
# SiT row takes 0.7, DynamicViT's ratio, through model kwargs).
DEIT_S = dict(stem="patch16", embed_dim=384, depth=12, num_heads=6, mlp_ratio=4., skip_lam=1., qkv_bias=True,
              norm_eps=1e-6, aux_head=False)
register_family_model(__name__, "sit_deit_s", f"SiT on DeiT-S: {DEIT_S}", SiT,
                      lambda kwargs: imagenet_cfg("patch_embed.proj", img_size=kwargs.get("img_size", 224),
                                                  fixed_input_size=True),
                      (), feature_cfg=SIT_FEATURE_CFG, **DEIT_S,
                      stage_depths=(3, 3, 3, 3))

for _size, (_teacher, _stages) in SIT_CONFIGS.items():
    _config = {**SIT_TEACHERS[_teacher], "stage_depths": _stages}
    register_family_model(__name__, f"sit_{_size}", f"SiT-{_size.upper()}: {_config}", SiT, _cfg, LAYOUTS,
                          feature_cfg=SIT_FEATURE_CFG, **_config)
    if _size != "l":  # SiT-L has no ‡ row
        register_family_model(__name__, f"sit_{_size}_dist",
                              f"SiT-{_size.upper()}‡ (distillation token and head for a CNN teacher): {_config}",
                              SiT, _cfg, LAYOUTS, feature_cfg=SIT_FEATURE_CFG, **_config, distilled=True)
