"""Spatial-MLP baselines of RIFormer Table 6: Swin-Mixer and ResMLP-B24 (patch 16).

Swin-Mixer (Liu et al., "Swin Transformer", appendix; released as "Swin MLP" in
microsoft/Swin-Transformer) is Swin with each window attention replaced by one linear layer
over the tokens of the window. The channels are split into head groups and every group has
its own token-mixing matrix ("D6" = 6 channels per group). Shifted blocks do not roll the map
as Swin does: they zero-pad it by (window - shift) before and `shift` after, so the padded
map has one more window per side.

ResMLP-B24 (Touvron et al., "ResMLP") is timm's ResMLP at width 768, 24 blocks and 16x16
patches; timm only registers the 8x8-patch B24 (`resmlp_big_24_224`), so we reuse its
classes with the paper's patch size.
"""
import re
from functools import partial
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse

from riformer._builder import (GradCheckpointing, cfg_for_img_size, check_choice, imagenet_cfg, load_local_checkpoint, local_checkpoint,
                               prune_after, refuse_pretrained, register_timm_model, stage_intermediates)
from riformer.checkpoints import Layout, register_layouts

__all__ = ["SwinMixer"]


class WindowSpatialMlp(nn.Module):
    """Token mixer of Swin-Mixer: per (shifted) window and per head group, a linear map over
    the window's tokens. A grouped 1x1 Conv1d holds one (w*w x w*w) matrix per group."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by {num_heads} heads"
        assert 0 <= shift_size < window_size
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        tokens = window_size * window_size
        self.spatial_mlp = nn.Conv1d(num_heads * tokens, num_heads * tokens, kernel_size=1, groups=num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B, H, W, C
        B, H, W, C = x.shape
        w, s = self.window_size, self.shift_size
        if s > 0:  # shift by zero padding (w - s) before and s after, in H and W
            x = F.pad(x, (0, 0, w - s, s, w - s, s))
        Hp, Wp = x.shape[1:3]
        windows = window_partition(x, (w, w)).reshape(-1, w * w, self.num_heads, C // self.num_heads)
        windows = windows.transpose(1, 2).reshape(-1, self.num_heads * w * w, C // self.num_heads)
        windows = self.spatial_mlp(windows)
        windows = windows.reshape(-1, self.num_heads, w * w, C // self.num_heads).transpose(1, 2)
        x = window_reverse(windows.reshape(-1, w, w, C), (w, w), Hp, Wp)
        if s > 0:
            x = x[:, w - s:w - s + H, w - s:w - s + W, :]
        return x


class SwinMixerBlock(nn.Module):
    """Swin block with WindowSpatialMlp in place of (shifted) window attention."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int,
                 mlp_ratio: float = 4., drop_path: float = 0., norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = WindowSpatialMlp(dim, num_heads, window_size, shift_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B, H, W, C
        x = x + self.drop_path(self.token_mixer(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class SwinMixerStage(GradCheckpointing, nn.Module):
    def __init__(self, in_dim: int, dim: int, resolution: Tuple[int, int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float, drop_path: List[float], norm_layer, downsample: bool):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, norm_layer=norm_layer) if downsample else nn.Identity()
        # as in Swin: a map no larger than the window is one window, and is not shifted
        if min(resolution) <= window_size:
            window_size, shift_size = min(resolution), 0
        else:
            shift_size = window_size // 2
        self.blocks = nn.Sequential(*[
            SwinMixerBlock(dim, num_heads, window_size, shift_size if i % 2 else 0,
                           mlp_ratio=mlp_ratio, drop_path=drop_path[i], norm_layer=norm_layer)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(self.blocks, self.downsample(x))


class SwinMixer(GradCheckpointing, nn.Module):
    """Swin-Mixer: Swin-T/B macro design (patch 4, four stages, patch merging) with window
    spatial MLPs. Built for one input size (the token-mixing matrices are window-sized and
    the window shrinks on maps smaller than it). Features are channels-last (B, H, W, C), as
    timm's Swin: `output_fmt` 'NHWC', `feature_dim` -1."""
    global_pools = ("avg", "")
    output_fmt = "NHWC"
    feature_dim = -1

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4., drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer=nn.LayerNorm, global_pool: str = "avg"):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      norm_layer=norm_layer, output_fmt="NHWC")
        grid = self.patch_embed.grid_size
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        # linear over blocks, split by stage (timm's calculate_drop_path_rates, absent before timm 1.0.16)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages = []
        for i, depth in enumerate(depths):
            resolution = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            stages.append(SwinMixerStage(
                dims[max(i - 1, 0)], dims[i], resolution, depth, num_heads[i], window_size, mlp_ratio,
                dpr[i], norm_layer, downsample=i > 0))
        self.stages = nn.Sequential(*stages)
        self.feature_info = [dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}")
                             for i, dim in enumerate(dims)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.patch_embed(x)))  # B, H, W, C

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's feature API: each stage's output at `indices` (NCHW, or NHWC as the model computes it),
        and the final features (forward_features) unless `intermediates_only`; `norm` is accepted and
        ignored, as by timm's hierarchical models."""
        check_choice(output_fmt, ("NCHW", "NHWC"), "output_fmt")

        def step(stage, x):
            x = stage(x)
            return x, (x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x)

        return stage_intermediates(self.stages, self.patch_embed(x), indices, stop_early, intermediates_only, step,
                                   self.norm)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last of `indices` (and the head); the absolute indices kept."""
        return prune_after(self, indices, prune_norm, prune_head,
                           lambda last: setattr(self, "stages", self.stages[:last + 1]))


def _cfg(img_size: int = 224, first_conv: str = "patch_embed.proj", pool_size=None, **kwargs):
    return imagenet_cfg(first_conv, img_size=img_size, pool_size=pool_size, fixed_input_size=True, **kwargs)


default_cfgs = generate_default_cfgs({
    "swin_mixer_tiny_d6": _cfg(img_size=256, pool_size=(8, 8)),
    "swin_mixer_base_d24": _cfg(pool_size=(7, 7)),
    "resmlp_b24_p16": _cfg(first_conv="stem.proj", crop_pct=0.875),  # tokens, no map: no pool_size
})


def _from_swin_mlp(state, model):
    """microsoft/Swin-Transformer's SwinMLP (downsampling at the end of a stage) -> ours (timm's
    order: at the start of the next stage; the patch-merging channel order is the same)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.", key)
        key = re.sub(r"\.spatial_mlp\.", ".token_mixer.spatial_mlp.", key)
        out[re.sub(r"^layers\.", "stages.", key)] = value
    return out


SWIN_MLP_LAYOUTS = (Layout("microsoft/Swin-Transformer", "Swin-MLP release (github.com/microsoft/Swin-Transformer "
                           "get_started.md, swin_mlp_*.pth: {'model': ...})", r"^layers\.0\.blocks\.0\.spatial_mlp\.",
                           _from_swin_mlp),)
register_layouts(["swin_mixer_tiny_d6", "swin_mixer_base_d24"], SWIN_MLP_LAYOUTS)


def _from_deit_resmlp(state, model):
    from timm.models.mlp_mixer import checkpoint_filter_fn as timm_mixer_filter

    return timm_mixer_filter(state, model)


register_layouts(["resmlp_b24_p16"], (Layout(
    "facebookresearch/deit", "ResMLP release (facebookresearch/deit resmlp_models.py, resmlpB_24_no_dist.pth: "
    "{'model': ...})", r"^blocks\.0\.gamma_1$|^patch_embed\.proj\.", _from_deit_resmlp),))


def _create_swin_mixer(variant: str, pretrained: bool, **kwargs) -> SwinMixer:
    checkpoint_path = local_checkpoint(kwargs.pop("checkpoint_path", None), kwargs)
    refuse_pretrained(variant, pretrained, checkpoint_path, loads_local_files=True)
    features = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))  # timm's Swin: the stages, NHWC
    model = build_model_with_cfg(SwinMixer, variant, pretrained=False, feature_cfg=features,
                                 **cfg_for_img_size(kwargs, stride=32))
    return load_local_checkpoint(model, variant, checkpoint_path)


@register_timm_model
def swin_mixer_tiny_d6(pretrained=False, **kwargs) -> SwinMixer:
    """Swin-Mixer-T/D6 (official "SwinMLP-T/C6"): 6 channels per head group, window 8, used at 256."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(16, 32, 64, 128), window_size=8,
                      drop_path_rate=0.2)
    return _create_swin_mixer("swin_mixer_tiny_d6", pretrained, **dict(model_args, **kwargs))


@register_timm_model
def swin_mixer_base_d24(pretrained=False, **kwargs) -> SwinMixer:
    """Swin-Mixer-B "D24" as printed (Swin paper, RIFormer Table 6: 61M, 10.4G at 224).

    The only released Swin-Mixer-B (official "SwinMLP-B", same 61M / 10.4G / 81.3%) has heads
    (4, 8, 16, 32) on widths (128 ... 1024), i.e. 32 channels per group; 24 does not divide 128,
    so we build that released configuration under the printed name."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7,
                      drop_path_rate=0.5)
    return _create_swin_mixer("swin_mixer_base_d24", pretrained, **dict(model_args, **kwargs))


@register_timm_model
def resmlp_b24_p16(pretrained=False, **kwargs) -> MlpMixer:
    """ResMLP-B24 with 16x16 patches (ResMLP paper: 116M, 23.0G); timm's ResMLP classes."""
    checkpoint_path = local_checkpoint(kwargs.pop("checkpoint_path", None), kwargs)
    refuse_pretrained("resmlp_b24_p16", pretrained, checkpoint_path, loads_local_files=True)
    model_args = dict(patch_size=16, num_blocks=24, embed_dim=768, mlp_ratio=4,
                      block_layer=partial(ResBlock, init_values=1e-6), norm_layer=Affine)
    model = build_model_with_cfg(MlpMixer, "resmlp_b24_p16", pretrained=False,
                                 feature_cfg=dict(out_indices=3, feature_cls="getter"), **dict(model_args, **kwargs))
    return load_local_checkpoint(model, "resmlp_b24_p16", checkpoint_path)
