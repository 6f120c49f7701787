"""PVT v1: Pyramid Vision Transformer (Wang et al., ICCV 2021), a RIFormer Table 6 baseline.

Four stages of pre-norm transformer blocks on a feature pyramid (strides 4, 8, 16, 32). Each
stage starts with a patch embedding (a strided conv + LayerNorm) and adds its own learned
position embedding. Attention is *spatial-reduction attention* (SRA): keys and values come from
the tokens downsampled by a strided conv of ratio `sr_ratio` (8, 4, 2, 1 per stage), so the
attention map is N x N/r^2 instead of N x N. The last stage prepends a class token, which is
what the classifier reads.

The semantics (LayerNorm epsilons included) follow the official code (whai362/PVT,
`classification/pvt.py`); the module layout is ours, and `checkpoint_filter_fn` maps the
official keys onto it. The attention product uses `scaled_dot_product_attention`, which
fvcore skips: its MACs are counted under the `fvcore+attn` convention
(`reproduce/op_counters.py`), which is also how PVT's own `get_flops.py` adds them.
"""
import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, trunc_normal_

from riformer._builder import (GradCheckpointing, LinearHead, check_choice, imagenet_cfg, init_vit_weights, prune_after,
                               register_family_model, stage_intermediates, tokens_to_nchw)
from riformer.checkpoints import Layout, family_filter

__all__ = ["PyramidVisionTransformer", "checkpoint_filter_fn"]


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from tokens downsampled by `sr_ratio`."""

    def __init__(self, dim, num_heads, sr_ratio=1, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not a multiple of num_heads {num_heads}"
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, as in the official code

    def forward(self, x, height, width):
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(batch, dim, height, width)
            x = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, dim)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)  # fc1, GELU, fc2, dropouts

    def forward(self, x, height, width):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: conv with kernel = stride = patch_size, then LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans, embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


@register_notrace_function  # a leaf for torch.fx: the branch depends on the input's size
def resize_pos_embed(pos_embed, num_extra, grid_size, height, width):
    """The position embedding (extra tokens first), its grid resized bilinearly when (height, width) is
    not the trained grid (grid_size x grid_size), as the official code does."""
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    if (height, width) != (grid_size, grid_size):
        grid = grid.reshape(1, grid_size, grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bilinear")
        grid = grid.flatten(2).transpose(1, 2)
    return torch.cat([extra, grid], dim=1)


class Stage(GradCheckpointing, nn.Module):
    """Patch embedding, position embedding (+ class token on the last stage), blocks."""

    def __init__(self, in_chans, dim, patch_size, grid_size, depth, with_cls_token, drop_rate,
                 drop_path_rates, **block_kwargs):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.grid_size = grid_size  # the grid the position embedding is learned for
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size * grid_size + int(with_cls_token), dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            Block(dim, drop=drop_rate, drop_path=rate, **block_kwargs) for rate in drop_path_rates)

    def forward_tokens(self, x):
        """(tokens, height, width): the stage's tokens (class token first on the last stage) and grid."""
        x, height, width = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        num_extra = int(self.cls_token is not None)
        x = self.pos_drop(x + resize_pos_embed(self.pos_embed, num_extra, self.grid_size, height, width))
        return self.run_blocks(self.blocks, x, height, width), height, width

    def forward(self, x):
        x, height, width = self.forward_tokens(x)
        if self.cls_token is not None:
            return x  # tokens (class token first) for the head
        return tokens_to_nchw(x, height, width)


class PyramidVisionTransformer(GradCheckpointing, LinearHead, nn.Module):
    """`global_pool`: 'token' (the class token, as the official code), 'avg' (the mean of the last
    stage's patch tokens) or '' (all tokens)."""
    global_pools = ("token", "avg", "")

    def __init__(self, depths, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
                 mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), patch_size=4, img_size=224,
                 in_chans=3, num_classes=1000, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, global_pool="token"):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.feature_info = [dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}")
                             for i, dim in enumerate(embed_dims)]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, grid, done = [], img_size // patch_size, 0
        for i, depth in enumerate(depths):
            stages.append(Stage(
                in_chans=in_chans if i == 0 else embed_dims[i - 1], dim=embed_dims[i],
                patch_size=patch_size if i == 0 else 2, grid_size=grid, depth=depth,
                with_cls_token=i == len(depths) - 1, drop_rate=drop_rate,
                drop_path_rates=rates[done:done + depth], num_heads=num_heads[i],
                mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i], qkv_bias=qkv_bias,
                attn_drop=attn_drop_rate))
            grid, done = grid // 2, done + depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        trunc_normal_(self.stages[-1].cls_token, std=0.02)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f"stages.{len(self.stages) - 1}.cls_token"}

    def forward_features(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        if self.global_pool == "token":
            x = x[:, 0]  # the class token
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(1)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's feature API: each stage's output as an NCHW map (the last stage's patch tokens without
        the class token, before the final norm) at `indices`, and the final features (forward_features)
        unless `intermediates_only`. `norm` is accepted and ignored, as by timm's hierarchical models."""
        check_choice(output_fmt, ("NCHW",), "output_fmt")

        def step(stage, x):
            x, height, width = stage.forward_tokens(x)
            grid = tokens_to_nchw(x[:, int(stage.cls_token is not None):], height, width)
            return (grid if stage.cls_token is None else x), grid

        return stage_intermediates(self.stages, x, indices, stop_early, intermediates_only, step, self.norm)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last of `indices` (and the head); the absolute indices kept."""
        return prune_after(self, indices, prune_norm, prune_head,
                           lambda last: setattr(self, "stages", self.stages[:last + 1]))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# official key -> ours: patch_embed{i}. -> stages.{i-1}.patch_embed., block{i}. -> stages.{i-1}.blocks.,
# pos_embed{i} -> stages.{i-1}.pos_embed, cls_token -> stages.3.cls_token
_OFFICIAL_KEYS = [
    (re.compile(r"^patch_embed(\d)\."), lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed."),
    (re.compile(r"^block(\d)\."), lambda m: f"stages.{int(m.group(1)) - 1}.blocks."),
    (re.compile(r"^pos_embed(\d)$"), lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed"),
]


def _from_official(state_dict, model):
    """Map an official PVT v1 checkpoint (whai362/PVT) onto our layout."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replace in _OFFICIAL_KEYS:
            key = pattern.sub(replace, key)
        if key == "cls_token":
            key = f"stages.{len(model.stages) - 1}.cls_token"
        out[key] = value
    return out


LAYOUTS = (Layout("whai362/PVT", "PVT v1 release (github.com/whai362/PVT classification/README, pvt_{small,medium,large}.pth)",
                   r"^patch_embed1\.proj\.", _from_official),)
checkpoint_filter_fn = family_filter(LAYOUTS)

# Official configs: widths 64/128/320/512, heads 1/2/5/8, MLP ratios 8/8/4/4, SR ratios 8/4/2/1.
DEPTHS = {"small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}


for _size, _depths in DEPTHS.items():
    register_family_model(__name__, f"pvt_v1_{_size}", f"PVT-{_size.capitalize()}: depths {_depths}.",
                          partial(PyramidVisionTransformer, _depths), imagenet_cfg("stages.0.patch_embed.proj"),
                          LAYOUTS)
