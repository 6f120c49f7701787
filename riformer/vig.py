"""Pyramid ViG: Vision GNN (Han et al., NeurIPS 2022), a RIFormer Table 5 teacher (Pyramid ViG-B).

The image is a graph whose nodes are the feature-map positions. Every block rebuilds the graph
(k = 9 nearest neighbours in feature space, after L2 normalisation, biased by a fixed relative
position term) and mixes nodes with a *max-relative* graph convolution: each node is
concatenated with `max over neighbours (x_j - x_i)` and passed through a grouped 1x1 conv.
A block is `Grapher` (1x1 conv, graph conv, 1x1 conv, residual) followed by an `FFN` (two 1x1
convs, residual), all with BatchNorm. Pyramid: a conv stem to stride 4, stages at strides
4/8/16/32 joined by stride-2 3x3 convs; in the first two stages the neighbours are searched among
nodes average-pooled by 4 and 2. The neighbour dilation grows with depth, `min(idx // 4 + 1, 5)`.

Semantics follow the official code (huawei-noah/Efficient-AI-Backbones, `vig_pytorch/`); the
layout is ours and `checkpoint_filter_fn` maps the official keys onto it. The position embedding
and relative-position terms are built for one `img_size` (224 by default). The official
`relative_pos` is an `nn.Parameter` with `requires_grad=False`; we keep it as a buffer (same
state-dict key), so it is not counted as a parameter. Below 224 px the last stages have fewer
than k x dilation nodes: we then shrink the dilation (and k) to what the graph holds, which
never happens at 224.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function
from timm.models._features import feature_take_indices

from riformer._builder import GradCheckpointing, check_choice, imagenet_cfg, register_family_model, stage_intermediates
from riformer.checkpoints import Layout, family_filter

__all__ = ["PyramidViG", "checkpoint_filter_fn"]


def conv_bn(in_chans, out_chans, kernel_size=1, stride=1):
    return nn.Sequential(nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding=kernel_size // 2),
                         nn.BatchNorm2d(out_chans))


def sincos_pos_embed_2d(dim, grid_size):
    """MAE-style 2-D sine-cosine embedding, (grid_size**2, dim): half the channels per axis."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(positions):
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1)  # the official code puts the width axis first


def relative_position_bias(dim, grid_size, reduce_ratio):
    """Distance bias added before the kNN search, (1, N, N / r^2): minus the embeddings' similarity."""
    pos = sincos_pos_embed_2d(dim, grid_size)
    similarity = 2 * pos @ pos.T / dim
    num_nodes = grid_size * grid_size
    similarity = F.interpolate(similarity[None, None].float(), size=(num_nodes, num_nodes // reduce_ratio ** 2),
                               mode="bicubic", align_corners=False)
    return -similarity[0]


@register_notrace_function  # a leaf for torch.fx: k and the dilation depend on the node count
@torch.no_grad()
def neighbours(nodes, candidates, relative_pos, num_neighbours, dilation):
    """Indices (B, N, k) of each node's dilated k nearest candidates (in L2-normalised feature space,
    plus the relative-position bias)."""
    nodes, candidates = F.normalize(nodes, dim=-1), F.normalize(candidates, dim=-1)
    distance = (nodes.pow(2).sum(-1, keepdim=True) - 2 * nodes @ candidates.transpose(1, 2)
                + candidates.pow(2).sum(-1).unsqueeze(1))
    if relative_pos is not None:
        distance = distance + relative_pos
    num_candidates = candidates.shape[1]
    dilation = max(1, min(dilation, num_candidates // num_neighbours))  # see the module doc
    k = min(num_neighbours, num_candidates)
    return torch.topk(-distance, k=k * dilation).indices[..., ::dilation]


@register_notrace_function  # a leaf for torch.fx: the branch depends on the input's size
def resize_to(embedding, size):
    """`embedding`, (1, H0, W0) or (1, C, H0, W0), resized bicubically to `size` = (H, W) unless it has
    that size already."""
    size = tuple(size)
    if tuple(embedding.shape[-2:]) == size:
        return embedding
    if embedding.dim() == 3:
        return F.interpolate(embedding[None], size=size, mode="bicubic")[0]
    return F.interpolate(embedding, size=size, mode="bicubic")


class MaxRelativeGraphConv(nn.Module):
    """kNN graph on the fly, then [x_i, max_j (x_j - x_i)] through a grouped 1x1 conv."""

    def __init__(self, in_chans, out_chans, num_neighbours=9, dilation=1, reduce_ratio=1):
        super().__init__()
        self.num_neighbours = num_neighbours
        self.dilation = dilation
        self.reduce_ratio = reduce_ratio
        self.proj = nn.Sequential(nn.Conv2d(in_chans * 2, out_chans, 1, groups=4), nn.BatchNorm2d(out_chans),
                                  nn.GELU())

    def forward(self, x, relative_pos=None):
        batch, chans, height, width = x.shape
        candidates = F.avg_pool2d(x, self.reduce_ratio) if self.reduce_ratio > 1 else x
        nodes = x.flatten(2).transpose(1, 2)  # (B, N, C)
        candidates = candidates.flatten(2).transpose(1, 2)  # (B, M, C)
        index = neighbours(nodes, candidates, relative_pos, self.num_neighbours, self.dilation)  # (B, N, k)
        gathered = torch.gather(candidates.unsqueeze(1).expand(-1, index.shape[1], -1, -1), 2,
                                index.unsqueeze(-1).expand(-1, -1, -1, chans))  # (B, N, k, C)
        max_relative = (gathered - nodes.unsqueeze(2)).amax(dim=2)  # (B, N, C)
        # interleave x_i and its max-relative feature channel by channel, as the official code does
        # (the conv is grouped, so the order matters for checkpoints)
        x = torch.stack([nodes, max_relative], dim=-1).reshape(batch, -1, 2 * chans)
        x = x.transpose(1, 2).reshape(batch, 2 * chans, height, width)
        return self.proj(x)


class Grapher(nn.Module):
    def __init__(self, dim, grid_size, num_neighbours, dilation, reduce_ratio, drop_path=0.0):
        super().__init__()
        self.grid_size = grid_size
        self.reduce_ratio = reduce_ratio
        self.fc1 = conv_bn(dim, dim)
        self.graph_conv = MaxRelativeGraphConv(dim, dim * 2, num_neighbours, dilation, reduce_ratio)
        self.fc2 = conv_bn(dim * 2, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.register_buffer("relative_pos", relative_position_bias(dim, grid_size, reduce_ratio))

    def forward(self, x):
        shortcut = x
        x = self.fc1(x)
        height, width = x.shape[-2:]
        size = (height * width, height * width // self.reduce_ratio ** 2)  # (nodes, candidates)
        x = self.graph_conv(x, resize_to(self.relative_pos, size))
        return shortcut + self.drop_path(self.fc2(x))


class FFN(nn.Module):
    def __init__(self, dim, hidden_dim, drop_path=0.0):
        super().__init__()
        self.fc1 = conv_bn(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = conv_bn(hidden_dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim, drop_path=0.0, **grapher_kwargs):
        super().__init__()
        self.grapher = Grapher(dim, drop_path=drop_path, **grapher_kwargs)
        self.ffn = FFN(dim, dim * 4, drop_path=drop_path)

    def forward(self, x):
        return self.ffn(self.grapher(x))


class PyramidViG(GradCheckpointing, nn.Module):
    """timm's names: `num_features` is the last stage's width, `head_hidden_size` the 1x1-conv
    pre-logits width after the pooling (`hidden_dim`); `global_pool=''` keeps the map, the pre-logits
    convs then apply at every position (as timm's models with a head conv after the pooling)."""
    global_pools = ("avg", "")

    def __init__(self, depths, embed_dims, num_neighbours=9, reduce_ratios=(4, 2, 1, 1), img_size=224,
                 in_chans=3, num_classes=1000, hidden_dim=1024, drop_rate=0.0, drop_path_rate=0.0,
                 global_pool="avg"):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.num_features, self.head_hidden_size = embed_dims[-1], hidden_dim
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}.blocks")
                             for i, dim in enumerate(embed_dims)]
        dim = embed_dims[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, stride=1, padding=1), nn.BatchNorm2d(dim))
        grid = img_size // 4
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid, grid))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        max_dilation = 49 // num_neighbours  # the official rule: k x dilation fits the 7x7 last stage
        stages, index = [], 0
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            stage = nn.Module()
            stage.downsample = conv_bn(embed_dims[i - 1], dim, 3, stride=2) if i > 0 else nn.Identity()
            grid = grid // 2 if i > 0 else grid
            blocks = []
            for _ in range(depth):
                blocks.append(Block(dim, drop_path=rates[index], grid_size=grid, num_neighbours=num_neighbours,
                                    dilation=min(index // 4 + 1, max_dilation), reduce_ratio=reduce_ratios[i]))
                index += 1
            stage.blocks = nn.Sequential(*blocks)
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.pre_logits = nn.Sequential(nn.Conv2d(embed_dims[-1], hidden_dim, 1), nn.BatchNorm2d(hidden_dim),
                                        nn.GELU(), nn.Dropout(drop_rate))
        self.head = nn.Conv2d(hidden_dim, num_classes, 1) if num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.head = nn.Conv2d(self.head_hidden_size, num_classes, 1) if num_classes > 0 else nn.Identity()

    def embed(self, x):
        """The stem plus the position embedding (resized if the input is not the built size)."""
        x = self.stem(x)
        return x + resize_to(self.pos_embed, x.shape[-2:])

    def forward_features(self, x):
        x = self.embed(x)
        for stage in self.stages:
            x = self.run_blocks(stage.blocks, stage.downsample(x))
        return x

    def forward_head(self, x, pre_logits=False):
        if self.global_pool == "avg":
            x = self.pre_logits(F.adaptive_avg_pool2d(x, 1))
            return x.flatten(1) if pre_logits else self.head(x).flatten(1)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's feature API: each stage's output (NCHW) at `indices`, and the final features
        (forward_features) unless `intermediates_only`. `norm` is accepted and ignored (no final norm)."""
        check_choice(output_fmt, ("NCHW",), "output_fmt")

        def step(stage, x):
            x = stage.blocks(stage.downsample(x))
            return x, x

        return stage_intermediates(self.stages, self.embed(x), indices, stop_early, intermediates_only, step)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last of `indices` (and the head); the absolute indices kept."""
        take, last = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:last + 1]
        if prune_head:
            self.pre_logits = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _official_prefixes(model):
    """Official flat `backbone.{n}` prefixes -> ours: a downsampling conv, then blocks, per stage."""
    mapping, index = {}, 0
    for i, stage in enumerate(model.stages):
        if i > 0:
            mapping[f"backbone.{index}.conv."] = f"stages.{i}.downsample."
            index += 1
        for j in range(len(stage.blocks)):
            mapping[f"backbone.{index}.0."] = f"stages.{i}.blocks.{j}.grapher."
            mapping[f"backbone.{index}.1."] = f"stages.{i}.blocks.{j}.ffn."
            index += 1
    return mapping


def _from_official(state_dict, model):
    """Map an official Pyramid ViG checkpoint (huawei-noah/Efficient-AI-Backbones vig_pytorch) onto our layout."""
    prefixes = _official_prefixes(model)
    out = {}
    for key, value in state_dict.items():
        if key.startswith("stem.convs."):
            key = "stem." + key[len("stem.convs."):]
        elif key.startswith("backbone."):
            prefix = ".".join(key.split(".")[:3]) + "."  # backbone.{n}.{0|1|conv}.
            key = prefixes[prefix] + key[len(prefix):]
            key = key.replace("graph_conv.gconv.nn.", "graph_conv.proj.")
        elif key.startswith("prediction.4."):
            key = "head." + key[len("prediction.4."):]
        elif key.startswith("prediction."):
            key = "pre_logits." + key[len("prediction."):]
        out[key] = value
    return out


LAYOUTS = (Layout("huawei-noah/Efficient-AI-Backbones", "Pyramid ViG release (vig_pytorch/readme.md, "
                   "pvig_{ti,s,m,b}_*.pth.tar: a plain state dict)", r"^backbone\.0\.0\.", _from_official),)
checkpoint_filter_fn = family_filter(LAYOUTS)


def _cfg(kwargs):
    """Built for one size, as the official model (position embedding and relative positions)."""
    img_size = kwargs.get("img_size", 224)
    return imagenet_cfg("stem.0", img_size=img_size, crop_pct=0.95, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        fixed_input_size=True, pool_size=(img_size // 32, img_size // 32))


register_family_model(__name__, "pvig_b_224",
                      "Pyramid ViG-B (official `pvig_b_224_gelu`): depths 2/2/18/2, widths 128/256/512/1024.",
                      partial(PyramidViG, (2, 2, 18, 2), (128, 256, 512, 1024)), _cfg, LAYOUTS)
register_family_model(__name__, "pvig_ti_224",
                      "Pyramid ViG-Ti (official `pvig_ti_224_gelu`): depths 2/2/6/2, widths 48/96/240/384; the "
                      "smallest released Pyramid ViG, which the loader tests use.",
                      partial(PyramidViG, (2, 2, 6, 2), (48, 96, 240, 384)), _cfg, LAYOUTS)
