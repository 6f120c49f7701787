"""GFNet: Global Filter Networks (Rao et al., NeurIPS 2021), RIFormer Table 6 baselines and teacher.

The token mixer is a *global filter*: a 2-D FFT over the token grid, an element-wise product with
a learned complex filter (one per position of the half spectrum and channel), an inverse FFT.
It is a global circular convolution computed in O(N log N).

One class builds both variants of the official code (raoyongming/GFNet, `gfnet.py`):
- isotropic (`gfnet_b`): one stage, 16x16 patches, blocks without layer scale;
- hierarchical (`gfnet_h_*`): 4x4 patches, then 2x2 stride-2 convs between four stages, blocks
  with a layer scale on the residual branch.
Note GFNet's block has a single residual around filter *and* MLP:
`x + mlp(norm2(filter(norm1(x))))`. The position embedding is added after the first embedding.

The filters' shape is tied to the token grid, so the model is built for one `img_size` (224 by
default, then grids 56/28/14/7 or 14): pass `img_size=64` to run at 64 px. Parameter counts at 224
are the printed ones. fvcore skips the FFTs: `reproduce/op_counters.py` counts them under the
`fvcore+fft` convention, the GFNet authors' own.
"""
import re

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models._features import feature_take_indices

from riformer._builder import GradCheckpointing, LinearHead, check_choice, imagenet_cfg, init_vit_weights, prune_after, register_family_model
from riformer.checkpoints import Layout, family_filter

__all__ = ["GFNet", "GlobalFilter", "checkpoint_filter_fn"]


class GlobalFilter(nn.Module):
    """rfft2 over the (height, width) grid, times a learned complex filter, irfft2 back.

    Input and output are channels-last grids (B, H, W, C). The filter covers the half spectrum
    of a real signal, H x (W // 2 + 1), stored as (real, imaginary) pairs.
    """

    def __init__(self, dim, grid_size):
        super().__init__()
        self.grid_size = grid_size
        self.complex_weight = nn.Parameter(torch.randn(grid_size, grid_size // 2 + 1, dim, 2) * 0.02)

    def forward(self, x):
        dtype, height, width = x.dtype, x.shape[1], x.shape[2]
        x = torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho")  # FFTs in fp32, also under AMP
        x = x * torch.view_as_complex(self.complex_weight)
        return torch.fft.irfft2(x, s=(height, width), dim=(1, 2), norm="ortho").to(dtype)


class Block(nn.Module):
    """x + drop_path(layer_scale * mlp(norm2(filter(norm1(x))))) on a (B, H, W, C) grid."""

    def __init__(self, dim, grid_size, mlp_ratio=4.0, drop=0.0, drop_path=0.0, layer_scale_init=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.filter = GlobalFilter(dim, grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)  # fc1, GELU, fc2, dropouts
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        # the hierarchical models scale the residual branch; the isotropic ones do not
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim)) if layer_scale_init else None

    def forward(self, x):
        branch = self.mlp(self.norm2(self.filter(self.norm1(x))))
        if self.gamma is not None:
            branch = self.gamma * branch
        return x + self.drop_path(branch)


class Stage(GradCheckpointing, nn.Module):
    """A strided conv (patch embedding or 2x2 downsampling), then blocks on a channels-last grid.

    The first stage also adds the learned position embedding, (1, H, W, C).
    """

    def __init__(self, in_chans, dim, stride, grid_size, depth, drop_path_rates, with_pos_embed=False,
                 drop=0.0, **block_kwargs):
        super().__init__()
        self.downsample = nn.Conv2d(in_chans, dim, kernel_size=stride, stride=stride)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size, grid_size, dim)) if with_pos_embed else None
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.Sequential(*(
            Block(dim, grid_size, drop=drop, drop_path=rate, **block_kwargs) for rate in drop_path_rates))

    def embed(self, x):
        """The strided conv (and position embedding): a (B, H, W, C) grid for the blocks."""
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.pos_embed is not None:
            x = self.pos_drop(x + self.pos_embed)
        return x

    def forward(self, x):
        return self.run_blocks(self.blocks, self.embed(x)).permute(0, 3, 1, 2)


class GFNet(GradCheckpointing, LinearHead, nn.Module):
    """Features (`feature_info`, `forward_intermediates`): one per stage of a hierarchical model,
    one per block of the isotropic one (as timm's ViTs), NCHW."""

    def __init__(self, embed_dims, depths, patch_size, img_size=224, mlp_ratio=4.0, layer_scale_init=None,
                 in_chans=3, num_classes=1000, drop_rate=0.0, drop_path_rate=0.0, global_pool="avg"):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.isotropic = len(depths) == 1
        if self.isotropic:
            self.feature_info = [dict(num_chs=embed_dims[0], reduction=patch_size, module=f"stages.0.blocks.{j}")
                                 for j in range(depths[0])]
        else:
            self.feature_info = [dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}")
                                 for i, dim in enumerate(embed_dims)]
        assert img_size % (patch_size * 2 ** (len(depths) - 1)) == 0, \
            f"img_size {img_size} must be a multiple of the total stride"
        grid = img_size // patch_size
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, done = [], 0
        for i, depth in enumerate(depths):
            stages.append(Stage(
                in_chans if i == 0 else embed_dims[i - 1], embed_dims[i], patch_size if i == 0 else 2,
                grid, depth, rates[done:done + depth], with_pos_embed=i == 0, drop=drop_rate,
                mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init))
            grid, done = grid // 2, done + depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.stages[0].pos_embed, std=0.02)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"stages.0.pos_embed"}

    def forward_features(self, x):
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x, pre_logits=False):
        x = self.norm(x.permute(0, 2, 3, 1))  # norm, then average the tokens
        x = x.mean(dim=(1, 2)) if self.global_pool == "avg" else x.permute(0, 3, 1, 2)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's feature API: the NCHW output of each stage (hierarchical) or block (isotropic) at
        `indices`, and the final features (forward_features) unless `intermediates_only`; `norm`
        applies the final norm to the intermediates (its width fits every one of an isotropic model)."""
        check_choice(output_fmt, ("NCHW",), "output_fmt")
        take, last = feature_take_indices(len(self.feature_info), indices)
        units = last + 1 if stop_early or intermediates_only else len(self.feature_info)
        intermediates = []
        if self.isotropic:
            stage = self.stages[0]
            x = stage.embed(x)
            for j, block in enumerate(stage.blocks[:units]):
                x = block(x)
                if j in take:
                    intermediates.append((self.norm(x) if norm else x).permute(0, 3, 1, 2))
            x = x.permute(0, 3, 1, 2)
        else:
            for i, stage in enumerate(self.stages[:units]):
                x = stage(x)
                if i in take:
                    intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages (blocks) after the last of `indices` (and the head); the absolute indices kept."""
        def truncate(last):
            if self.isotropic:
                self.stages[0].blocks = self.stages[0].blocks[:last + 1]
            else:
                self.stages = self.stages[:last + 1]

        return prune_after(self, indices, prune_norm, prune_head, truncate)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _from_official(state_dict, model):
    """Map an official GFNet checkpoint (raoyongming/GFNet: {'model': ...}) onto our layout.

    Official keys: isotropic `patch_embed.proj.*`, `blocks.{j}.*`; hierarchical `patch_embed.{i}.proj.*`,
    `blocks.{i}.{j}.*`; `pos_embed` is (1, H*W, C) where our `stages.0.pos_embed` is (1, H, W, C).
    """
    isotropic = len(model.stages) == 1
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^patch_embed\.proj\.", "stages.0.downsample.", key)
        key = re.sub(r"^patch_embed\.(\d+)\.proj\.", r"stages.\1.downsample.", key)
        if isotropic:
            key = re.sub(r"^blocks\.", "stages.0.blocks.", key)
        else:
            key = re.sub(r"^blocks\.(\d+)\.", r"stages.\1.blocks.", key)
        if key == "pos_embed":
            key, value = "stages.0.pos_embed", value.reshape(model.stages[0].pos_embed.shape)
        out[key] = value
    return out


LAYOUTS = (Layout("raoyongming/GFNet", "GFNet release (github.com/raoyongming/GFNet README, gfnet-*.pth: {'model': ...})",
                   r"^patch_embed\.(\d+\.)?proj\.weight$", _from_official),)
checkpoint_filter_fn = family_filter(LAYOUTS)


def _cfg(kwargs):
    """Built for one size (the filters are the token grid's): fixed_input_size, pool_size the last grid."""
    img_size = kwargs.get("img_size", 224)
    stride = kwargs["patch_size"] * 2 ** (len(kwargs["depths"]) - 1)
    return imagenet_cfg("stages.0.downsample", img_size=img_size, fixed_input_size=True,
                        pool_size=(img_size // stride, img_size // stride))


# Official configs (main_gfnet.py). Hierarchical: layer-scale init 1e-3 (H-Ti, the code's default),
# 1e-5 (H-S), 1e-6 (H-B); the isotropic models have no layer scale.
CONFIGS = {
    "gfnet_h_ti": ("GFNet-H-Ti: widths 64/128/256/512, depths 3/3/10/3.",
                   dict(embed_dims=(64, 128, 256, 512), depths=(3, 3, 10, 3), patch_size=4, layer_scale_init=1e-3)),
    "gfnet_h_s": ("GFNet-H-S: widths 96/192/384/768, depths 3/3/10/3.",
                  dict(embed_dims=(96, 192, 384, 768), depths=(3, 3, 10, 3), patch_size=4, layer_scale_init=1e-5)),
    "gfnet_h_b": ("GFNet-H-B: widths 96/192/384/768, depths 3/3/27/3.",
                  dict(embed_dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), patch_size=4, layer_scale_init=1e-6)),
    "gfnet_b": ("GFNet-B (isotropic): width 512, depth 19, 16x16 patches.",
                dict(embed_dims=(512,), depths=(19,), patch_size=16)),
}
for _name, (_doc, _config) in CONFIGS.items():
    _features = {"out_indices": 3} if len(_config["depths"]) == 1 else {}  # the last 3 blocks, as timm's ViTs
    register_family_model(__name__, _name, _doc, GFNet, _cfg, LAYOUTS, feature_cfg=_features, **_config)
