"""PoolFormer (v1) and RIFormer: MetaFormers with a pooling token mixer, or none at inference.

The layout and forward semantics follow the official PoolFormer code (sail-sg/poolformer), so its
checkpoints load as they are: GroupNorm with one group as the norm, `pool(x) - x` as the mixer,
layer scales on both residual branches, a final norm *before* global average pooling. The layouts
of the other releases are mapped onto it (`LAYOUTS`): PoolFormer as timm hosts it, and RIFormer as
open-mmlab/mmpretrain releases it (the only official RIFormer release: train form, keys under
`backbone.`, final norm `backbone.norm6`, classifier `head.fc`).

RIFormer (CVPR 2023) keeps that macro design but trains with an Affine token mixer,
`affine(x) - x` with a per-channel scale s and shift t, and folds it into the preceding norm for
inference (paper Eq. 4): gamma' = gamma * (s - 1), beta' = beta * (s - 1) + t. The deploy block is
then `x + ls1 * norm_reparam(x)`, with no token mixer at all.
"""
from functools import partial

import re

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d
from timm.models._features import feature_take_indices

from riformer._builder import GradCheckpointing, LinearHead, check_choice, imagenet_cfg, init_vit_weights, prune_after, register_family_model
from riformer.checkpoints import Layout, family_filter

__all__ = ["MetaFormerV1", "PoolFormerBlock", "RIFormerBlock", "Affine", "Pooling", "fold_affine_into_norm"]


class GroupNorm1(nn.GroupNorm):
    """LayerNorm over (C, H, W) of an NCHW tensor, as PoolFormer implements it."""

    def __init__(self, num_channels, **kwargs):
        super().__init__(1, num_channels, **kwargs)


class Pooling(nn.Module):
    """PoolFormer's token mixer; the `- x` cancels the block's own residual."""

    def __init__(self, pool_size=3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class Affine(nn.Module):
    """RIFormer's training-time mixer: per-channel s * x + t, minus x for the residual."""

    def __init__(self, dim):
        super().__init__()
        self.affine = nn.Conv2d(dim, dim, kernel_size=1, groups=dim, bias=True)

    def forward(self, x):
        return self.affine(x) - x


class Mlp(nn.Module):
    """Channel MLP as 1x1 convolutions on NCHW."""

    def __init__(self, dim, hidden_dim, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _channel(v):
    return v.unsqueeze(-1).unsqueeze(-1)


class MetaFormerBlock(nn.Module):
    """x + ls1 * mixer(norm1(x)); x + ls2 * mlp(norm2(x))."""

    def __init__(self, dim, token_mixer, mlp_ratio=4.0, drop=0.0, drop_path=0.0,
                 layer_scale_init_value=1e-5, norm_layer=GroupNorm1):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.use_layer_scale = layer_scale_init_value is not None
        if self.use_layer_scale:
            self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def mix(self, x):
        return self.token_mixer(self.norm1(x))

    def forward(self, x):
        if self.use_layer_scale:
            x = x + self.drop_path(_channel(self.layer_scale_1) * self.mix(x))
            return x + self.drop_path(_channel(self.layer_scale_2) * self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.mix(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PoolFormerBlock(MetaFormerBlock):
    def __init__(self, dim, pool_size=3, **kwargs):
        super().__init__(dim, Pooling(pool_size), **kwargs)


class RIFormerBlock(MetaFormerBlock):
    """Affine mixer in training; `switch_to_deploy()` folds it and norm1 into `norm_reparam`."""

    def __init__(self, dim, deploy=False, norm_layer=GroupNorm1, **kwargs):
        super().__init__(dim, Affine(dim), norm_layer=norm_layer, **kwargs)
        if deploy:
            self.switch_to_deploy()

    @property
    def deploy(self):
        return hasattr(self, "norm_reparam")

    def mix(self, x):
        if self.deploy:
            return self.norm_reparam(x)
        return self.token_mixer(self.norm1(x))

    def switch_to_deploy(self):
        if self.deploy:
            return
        self.norm_reparam = fold_affine_into_norm(self.norm1, self.token_mixer).train(self.training)
        del self.norm1, self.token_mixer


def _norm_with_bias(norm: nn.Module) -> nn.Module:
    """A fresh norm computing what `norm` computes, with a bias whatever `norm` has."""
    if isinstance(norm, GroupNorm1):  # RIFormer's own norm keeps its class
        fresh = GroupNorm1(norm.num_channels, eps=norm.eps)
    elif isinstance(norm, nn.GroupNorm):
        fresh = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps)
    elif isinstance(norm, LayerNorm2d):
        fresh = LayerNorm2d(norm.normalized_shape[0], eps=norm.eps)
    else:
        raise TypeError(f"cannot fold an affine mixer into a {type(norm).__name__}")
    return fresh.to(device=norm.weight.device, dtype=norm.weight.dtype).train(norm.training)


@torch.no_grad()
def fold_affine_into_norm(norm: nn.Module, affine: Affine) -> nn.Module:
    """The norm that equals `affine(norm(x)) - norm(x)` (RIFormer Eq. 4), in `norm`'s train/eval mode.

    affine(LN(x)) - LN(x) = (s - 1) * LN(x) + t, and the norm's own affine absorbs that:
    gamma' = gamma (s - 1), beta' = beta (s - 1) + t, with beta = 0 for a bias-free norm (which
    gets a bias, see `_norm_with_bias`).
    """
    s_minus_1 = affine.affine.weight.reshape(-1) - 1.0
    t = affine.affine.bias
    folded = _norm_with_bias(norm)
    folded.weight.copy_(norm.weight * s_minus_1)
    folded.bias.copy_(t if norm.bias is None else norm.bias * s_minus_1 + t)
    return folded


class PatchEmbed(nn.Module):
    """Strided convolution: the stem (7x7/4) and the downsampling between stages (3x3/2)."""

    def __init__(self, in_chans, embed_dim, patch_size, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding)

    def forward(self, x):
        return self.proj(x)


class MetaFormerV1(GradCheckpointing, LinearHead, nn.Module):
    """Four stages of `block` separated by downsampling, as in the official PoolFormer.

    `network` alternates stages and downsampling layers (network.0 = stage 1, network.1 = the
    downsampling into stage 2, ...) so that official checkpoints' keys match ours.
    """

    def __init__(self, layers, embed_dims, block=PoolFormerBlock, mlp_ratios=(4, 4, 4, 4),
                 num_classes=1000, in_chans=3, drop_rate=0.0, drop_path_rate=0.0,
                 layer_scale_init_value=1e-5, img_size=224, global_pool="avg", **block_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.num_features = self.head_hidden_size = embed_dims[-1]
        # stage i (network[2i], after the downsampling network[2i - 1]) at stride 4 * 2^i
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f"network.{2 * i}")
                             for i, dim in enumerate(embed_dims)]
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_size=7, stride=4, padding=2)
        total, done = sum(layers), 0
        network = []
        for i, depth in enumerate(layers):
            stage = [
                block(embed_dims[i], mlp_ratio=mlp_ratios[i], drop=drop_rate,
                      drop_path=drop_path_rate * (done + j) / max(total - 1, 1),
                      layer_scale_init_value=layer_scale_init_value, **block_kwargs)
                for j in range(depth)
            ]
            done += depth
            network.append(nn.Sequential(*stage))
            if i + 1 < len(layers):
                network.append(PatchEmbed(embed_dims[i], embed_dims[i + 1], patch_size=3, stride=2, padding=1))
        self.network = nn.ModuleList(network)
        self.norm = GroupNorm1(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_vit_weights)

    def blocks(self):
        """All MetaFormer blocks in depth order (module imitation picks layers from this list)."""
        return [blk for stage in self.network if isinstance(stage, nn.Sequential) for blk in stage]

    def forward_features(self, x):
        x = self.patch_embed(x)
        for layer in self.network:  # stages (of blocks) and downsamplings
            x = self.run_blocks(layer, x) if isinstance(layer, nn.Sequential) else layer(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        if self.global_pool == "avg":
            x = x.mean([-2, -1])
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's feature API: each stage's output (NCHW, before the final norm) at `indices`, and
        the final features (forward_features) unless `intermediates_only`. `norm` is accepted and
        ignored, as by timm's hierarchical models (the final norm fits the last stage only)."""
        check_choice(output_fmt, ("NCHW",), "output_fmt")
        take, last = feature_take_indices(len(self.feature_info), indices)
        stages = last + 1 if stop_early or intermediates_only else len(self.feature_info)
        intermediates = []
        x = self.patch_embed(x)
        for i in range(stages):
            for layer in self.network[max(2 * i - 1, 0):2 * i + 1]:  # downsampling, then the stage
                x = layer(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if stages == len(self.feature_info) else x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the layers after the last of `indices` (and the head); the absolute indices kept."""
        return prune_after(self, indices, prune_norm, prune_head,
                           lambda last: setattr(self, "network", self.network[:2 * last + 1]))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# name: (layers, embed_dims, layer_scale_init_value). S/M configs are the official PoolFormer ones.
# S9 and XS12 are RIFormer Table 8's slimmed PoolFormers, which the paper defines only as "depth 9"
# and "about 5/6 of the width": we cut S12's third stage from 6 to 3 blocks (a memory-bound cost
# model predicts 1.22x S12's GPU throughput, printed 1.21x), and take 5/6 of S12's widths rounded to
# multiples of 8. Both are our reading, documented in docs/counting.md.
CONFIGS = {
    "s9": ([2, 2, 3, 2], [64, 128, 320, 512], 1e-5),
    "xs12": ([2, 2, 6, 2], [56, 104, 264, 424], 1e-5),
    "s12": ([2, 2, 6, 2], [64, 128, 320, 512], 1e-5),
    "s24": ([4, 4, 12, 4], [64, 128, 320, 512], 1e-5),
    "s36": ([6, 6, 18, 6], [64, 128, 320, 512], 1e-6),
    "m36": ([6, 6, 18, 6], [96, 192, 384, 768], 1e-6),
    "m48": ([8, 8, 24, 8], [96, 192, 384, 768], 1e-6),
}


def _from_timm(state, model):
    """timm's MetaFormer layout of PoolFormer v1 (hf-hub timm/poolformer_*.sail_in1k) -> ours.

    The weights are sail-sg's; timm applies its head norm after the global pooling, we keep the
    official order (norm, then pooling), so our logits are the official code's."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^stem\.conv\.", "patch_embed.proj.", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.conv\.", lambda m: f"network.{2 * int(m[1]) - 1}.proj.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.", lambda m: f"network.{2 * int(m[1])}.", key)
        key = re.sub(r"layer_scale(\d)\.scale$", r"layer_scale_\1", key)
        key = re.sub(r"^head\.norm\.", "norm.", key)
        out[re.sub(r"^head\.fc\.", "head.", key)] = value
    return out


def _from_mmpretrain(state, model):
    """open-mmlab/mmpretrain's RIFormer (ImageClassifier: backbone, GAP neck, LinearClsHead) -> ours."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^backbone\.norm6\.", "norm.", key)
        key = re.sub(r"^backbone\.", "", key)
        out[re.sub(r"^head\.fc\.", "head.", key)] = value
    return out


# Official layouts (our layout is sail-sg/poolformer's).
POOLFORMER_LAYOUTS = (
    Layout("sail-sg/poolformer", "PoolFormer v1 release (github.com/sail-sg/poolformer/releases/download/v1.0/"
           "poolformer_{s12..m48}.pth.tar: a plain state dict)", r"^network\.0\.0\.mlp\.fc1\.weight$"),
    Layout("timm", "PoolFormer v1 as timm hosts it (hf-hub timm/poolformer_{s12..m48}.sail_in1k)",
           r"^stem\.conv\.weight$", _from_timm),
)
RIFORMER_LAYOUTS = (
    Layout("open-mmlab/mmpretrain", "RIFormer release (download.openmmlab.com/mmclassification/v1/riformer/"
           "riformer-*_32xb128_in1k*.pth: {'meta', 'state_dict'}, train form)", r"^backbone\.patch_embed\.",
           _from_mmpretrain),
)
checkpoint_filter_fn = family_filter(POOLFORMER_LAYOUTS + RIFORMER_LAYOUTS)

for _prefix, _block, _sizes, _layouts in (
        ("poolformer_v1", PoolFormerBlock, CONFIGS, POOLFORMER_LAYOUTS),
        ("riformer", RIFormerBlock, ("s12", "s24", "s36", "m36", "m48"), RIFORMER_LAYOUTS)):
    for _size in _sizes:
        _layers, _dims, _ls_init = CONFIGS[_size]
        register_family_model(__name__, f"{_prefix}_{_size}",
                              f"{_prefix} {_size.upper()}: layers {_layers}, widths {_dims}",
                              partial(MetaFormerV1, layers=_layers, embed_dims=_dims, block=_block),
                              imagenet_cfg("patch_embed.proj", pool_size=(7, 7)), _layouts,
                              layer_scale_init_value=_ls_init)
