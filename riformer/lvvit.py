"""LV-ViT (Jiang et al. 2021, "All Tokens Matter: Token Labeling for Training Better Vision Transformers").

Two families share one model class, `LVViT`; they differ only in the patch embedding and in
whether the token-labeling head takes part in inference:

* `lvvit_ti/s/m/l`: the LV-ViTs that SiT uses as teachers (SiT §4.1: "the patch embedding replaced
  by lightweight stacked convolutions inspired by LeViT"). The stem is a stack of 3x3 stride-2
  conv+BN layers (4 of them; 6 for L, two of which keep the resolution), mlp ratio 3, SiT Table 2a
  depths/widths/heads; `lvvit_l` is built at 288. Their token-labeling `aux_head` is kept (official
  checkpoints have it, printed sizes count it) but not used for inference: logits come from the
  class token only, as in the official SiT code.
* `lvvit_s_tl/m_tl/l_tl`: the original LV-ViT-S/M/L of the token-labeling paper (cited by SiT Table 3
  and RePaFormer): a 7x7 conv + two 3x3 convs at 1/2 resolution, then an 8x8 stride-8 projection.
  At inference the logits are `head(cls) + 0.5 * max over patches of aux_head(patch)`, as there.

Every transformer block is pre-norm with residual branches divided by `skip_lam` (LV-ViT's
"re-scaling" of residual connections), and no bias on the qkv projection. The same class, with
`stem="patch16", qkv_bias=True, norm_eps=1e-6, skip_lam=1, mlp_ratio=4, aux_head=False`, is timm's
DeiT (same weight names), the body of SiT on DeiT-S (SiT Table 1, `riformer.sit`).

Who trains the aux head: the token-labeling loss, through `forward_dense` (a plain classification
forward never reaches it, as in the official code, whose training forward returns it for the
token-labeling loss only). SiT students inherit it from their teacher and freeze it, as the official
SiT code does (`requires_grad = False`; see `riformer.sit`).

Parameter counts (all parameters, aux head included, see `tests/test_models_sit.py`): the original
LV-ViT-S/M at 224 give 26.2M/55.8M and LV-ViT-L at 288 gives 150.1M (SiT Table 3); the SiT teachers
are a different, smaller model (README of Sense-X/SiT: 15.7M/25.4M/55.2M/147M).

timm's interface: `global_pool` 'token' (the class token, default), 'avg' (mean of the patch tokens)
or '' (all tokens); features (`forward_intermediates`, `features_only=True`) are the blocks' patch
tokens, NCHW on the 1/16 grid or NLC, the last 3 blocks by default as timm's ViTs. The model is
built for one size (its position embedding is not resized).

Outputs: `forward(x)` returns logits (B, num_classes) in both modes. `forward_dense(x, mix_box)`
returns (class logits, per-patch aux logits (B, N, num_classes)) for token-labeling training, with
MixToken inside `mix_box` (see `mix_tokens`), and
`forward_block_tokens(x)` returns (logits, [patch tokens after each block]) — what a SiT student
distils from in feature recalibration distillation (FRD).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models._features import feature_take_indices

from riformer._builder import GradCheckpointing, check_choice, imagenet_cfg, init_vit_weights, register_family_model, tokens_to_nchw
from riformer.checkpoints import Layout, family_filter

__all__ = ["LVViT", "Attention", "Block", "ConvStem", "TokenLabelingStem", "checkpoint_filter_fn"]


class Attention(nn.Module):
    """Multi-head self-attention (no qkv bias, as LV-ViT) computed with SDPA."""

    def __init__(self, dim, num_heads, attn_drop=0., proj_drop=0., qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block; each residual branch is divided by `skip_lam`."""

    def __init__(self, dim, num_heads, mlp_ratio=3., skip_lam=1., drop=0., attn_drop=0., drop_path=0.,
                 qkv_bias=False, norm_eps=1e-5):
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        return x


class ConvBN(nn.Sequential):
    def __init__(self, in_chs, out_chs, kernel_size, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)


class ConvStem(nn.Module):
    """SiT's LeViT-like patch embedding: 3x3 conv+BN layers, GELU between them, overall stride 16.

    `layers` lists (width divisor, stride): width = embed_dim // divisor.
    """
    FOUR = ((8, 2), (4, 2), (2, 2), (1, 2))
    SIX = ((8, 2), (8, 1), (8, 1), (4, 2), (2, 2), (1, 2))  # SiT-L / LV-ViT-L teacher

    def __init__(self, embed_dim, layers=FOUR, in_chans=3):
        super().__init__()
        convs, chs = [], in_chans
        for divisor, stride in layers:
            convs.append(ConvBN(chs, embed_dim // divisor, 3, stride))
            chs = embed_dim // divisor
        self.convs = nn.ModuleList(convs)
        self.act = nn.GELU()

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = self.act(x)
        return x


class TokenLabelingStem(nn.Module):
    """The original LV-ViT patch embedding: 7x7/2 conv, two 3x3 convs (BN+ReLU), 8x8/8 projection."""

    def __init__(self, embed_dim, width=64, in_chans=3):
        super().__init__()
        self.convs = nn.ModuleList([ConvBN(in_chans, width, 7, 2), ConvBN(width, width, 3, 1),
                                    ConvBN(width, width, 3, 1)])
        self.act = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=8, stride=8)

    def forward(self, x):
        for conv in self.convs:
            x = self.act(conv(x))
        return self.proj(x)


class PatchStem(nn.Module):
    """ViT/DeiT's patch embedding: one 16x16 stride-16 convolution (timm's `patch_embed.proj`)."""

    def __init__(self, embed_dim, in_chans=3, patch_size=16):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


def make_stem(stem, embed_dim, in_chans, stem_width=64):
    if stem == "patch16":
        return PatchStem(embed_dim, in_chans)
    if stem == "conv4":
        return ConvStem(embed_dim, ConvStem.FOUR, in_chans)
    if stem == "conv6":
        return ConvStem(embed_dim, ConvStem.SIX, in_chans)
    if stem == "token_labeling":
        return TokenLabelingStem(embed_dim, stem_width, in_chans)
    raise ValueError(f"unknown stem {stem!r}")


class LVViT(GradCheckpointing, nn.Module):
    global_pools = ("token", "avg", "")
    num_prefix_tokens = 1  # the class token

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=384, depth=16, num_heads=6,
                 mlp_ratio=3., skip_lam=2., stem="conv4", stem_width=64, aux_head_in_eval=False,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., qkv_bias=False, norm_eps=1e-5,
                 aux_head=True, global_pool="token", **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        self.num_classes = num_classes
        self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.feature_info = [dict(num_chs=embed_dim, reduction=16, module=f"blocks.{i}") for i in range(depth)]
        self.aux_head_in_eval = aux_head_in_eval
        self.patch_embed = make_stem(stem, embed_dim, in_chans, stem_width)
        self.grid_size = (img_size // 16, img_size // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, skip_lam, drop_rate, attn_drop_rate, dpr[i], qkv_bias, norm_eps)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # Token-labeling head: one prediction per patch token (Jiang et al. 2021); none for a DeiT body.
        self.aux_head = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) if aux_head else None

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_choice(global_pool, self.global_pools, "global_pool")
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.aux_head is not None:
            self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x, mix_box=None):
        """Patch tokens (MixToken-mixed inside `mix_box`, see `mix_tokens`), class token, positions."""
        x = self.patch_embed(x)
        if mix_box is not None:
            x = mix_tokens(x, mix_box, dims=(2, 3))
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x):
        return self.norm(self.run_blocks(self.blocks, self.embed(x)))

    def pool(self, x):
        """What the head reads of the (B, N, C) tokens, by `global_pool`."""
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(1)
        return x

    def forward_head(self, x, pre_logits=False):
        pooled = self.pool(x)
        if pre_logits:
            return pooled
        logits = self.head(pooled)
        if self.aux_head_in_eval and not self.training and self.num_classes > 0 and self.global_pool:
            logits = logits + 0.5 * self.aux_head(x[:, 1:]).max(1)[0]
        return logits

    def after_block(self, i, x):
        """What follows block `i` before the next one: nothing here (SiT slims the tokens)."""
        return x

    def forward_intermediates(self, x, indices=None, return_prefix_tokens=False, norm=False, stop_early=False,
                              output_fmt="NCHW", intermediates_only=False):
        """timm's ViT feature API: the patch tokens after each block at `indices` (the last n if an
        int), NCHW on the patch grid or NLC, with the final norm if `norm`, paired with the prefix
        tokens if `return_prefix_tokens`; and the final features (forward_features) unless
        `intermediates_only`."""
        check_choice(output_fmt, ("NCHW", "NLC"), "output_fmt")
        take, last = feature_take_indices(len(self.blocks), indices)
        blocks = last + 1 if stop_early or intermediates_only else len(self.blocks)
        p = self.num_prefix_tokens
        intermediates = []
        x = self.embed(x)
        for i, block in enumerate(self.blocks[:blocks]):
            x = block(x)
            if i in take:
                y = self.norm(x) if norm else x
                patches = y[:, p:] if output_fmt == "NLC" else self.patch_grid(i, y[:, p:])
                intermediates.append((patches, y[:, :p]) if return_prefix_tokens else patches)
            x = self.after_block(i, x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if blocks == len(self.blocks) else x), intermediates

    def patch_grid(self, i, patches):
        """Block `i`'s patch tokens (B, N, C) as a (B, C, H, W) map on the patch grid."""
        return tokens_to_nchw(patches, *self.grid_size)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the blocks after the last of `indices` (and the norm, the heads); the absolute indices kept."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_dense(self, x, mix_box=None):
        """(class-token logits, per-patch token-labeling logits (B, N, classes)): token labeling.

        With `mix_box` (MixToken, Jiang et al. 2021 Sec. 3.2): the patch tokens inside the box come
        from the batch-flipped images, and the patch logits inside it are swapped back afterwards, so
        patch logit j of image b is always the prediction for image b's own patch j."""
        x = self.norm(self.run_blocks(self.blocks, self.embed(x, mix_box)))
        dense = self.aux_head(x[:, 1:])
        if mix_box is not None:
            dense = mix_tokens(dense.reshape(dense.shape[0], *self.grid_size, -1), mix_box, dims=(1, 2)).flatten(1, 2)
        return self.head(x[:, 0]), dense

    def forward_block_tokens(self, x):
        """(logits, list of the patch tokens (B, N, C) output by each block): the FRD targets."""
        x = self.embed(x)
        block_tokens = []
        for block in self.blocks:
            x = self.run_block(block, x)
            block_tokens.append(x[:, 1:])
        return self.forward_head(self.norm(x)), block_tokens


def mix_tokens(x, box, dims):
    """MixToken: inside `box` = (row0, col0, row1, col1) of the token grid (tensor dims `dims`),
    take every image's tokens from the batch-flipped image (b <- B-1-b); applying it twice undoes it."""
    (r0, c0, r1, c1), (dim_r, dim_c) = box, dims
    index = [slice(None)] * x.ndim
    index[dim_r], index[dim_c] = slice(r0, r1), slice(c0, c1)
    mixed = x.clone()
    mixed[tuple(index)] = x.flip(0)[tuple(index)]
    return mixed


def rename_stem_key(key):
    """patch_embed.conv{i}/bn{i} of the official code -> patch_embed.convs.{i-1}.conv/bn."""
    parts = key.split(".")
    if parts[0] != "patch_embed" or len(parts) < 3 or parts[1] in ("proj", "convs"):  # convs: ours already
        return key
    layer = parts[1]
    kind = "conv" if layer.startswith("conv") else "bn"
    index = int(layer[len(kind):]) - 1
    return ".".join(["patch_embed", "convs", str(index), kind] + parts[2:])


def _from_official(state_dict, model):
    """Map an official TokenLabeling / SiT LV-ViT checkpoint onto our module names."""
    out = {}
    for key, value in state_dict.items():
        key = rename_stem_key(key)
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resize_pos_embed(value, model.pos_embed.shape[1] - 1)
        out[key] = value
    return out


def resize_pos_embed(pos_embed, num_patches):
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new = int(grid.shape[1] ** 0.5), int(num_patches ** 0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def _cfg(kwargs):
    """Built for one size (the position embedding is not resized); tokens, so no pool_size."""
    first_conv = "patch_embed.convs.0.conv"
    return imagenet_cfg(first_conv, img_size=kwargs.get("img_size", 224), fixed_input_size=True)


FEATURE_CFG = {"out_indices": 3}  # the last 3 blocks by default, as timm's ViTs


# The same key layout, released by two projects (names differ only in the stem's conv/bn indices).
TOKEN_LABELING_LAYOUT = Layout(
    "zihangJiang/TokenLabeling", "LV-ViT release (github.com/zihangJiang/TokenLabeling README, "
    "lvvit_{s,m,l}-*.pth.tar: a plain state dict)", r"^patch_embed\.conv1\.weight$", _from_official)
SIT_TEACHER_LAYOUT = Layout(
    "Sense-X/SiT", "SiT's LV-ViT teachers (github.com/Sense-X/SiT README, Google Drive: {'model': ...})",
    r"^patch_embed\.conv1\.weight$", _from_official)
checkpoint_filter_fn = family_filter((TOKEN_LABELING_LAYOUT,))


# SiT's teachers (Sense-X/SiT models/lvvit.py): LeViT-like conv stems, SiT Table 2a shapes.
SIT_TEACHERS = {
    "ti": dict(embed_dim=320, depth=14, num_heads=5, skip_lam=2., stem="conv4"),
    "s": dict(embed_dim=384, depth=16, num_heads=6, skip_lam=2., stem="conv4"),
    "m": dict(embed_dim=512, depth=20, num_heads=8, skip_lam=2., stem="conv4"),
    "l": dict(embed_dim=768, depth=24, num_heads=12, skip_lam=3., stem="conv6", img_size=288),
}
# The original token-labeling LV-ViTs (zihangJiang/TokenLabeling).
TOKEN_LABELING = {
    "lvvit_s_tl": dict(embed_dim=384, depth=16, num_heads=6, skip_lam=2., stem_width=64),
    "lvvit_m_tl": dict(embed_dim=512, depth=20, num_heads=8, skip_lam=2., stem_width=64),
    "lvvit_l_tl": dict(embed_dim=768, depth=24, num_heads=12, skip_lam=3., stem_width=128, img_size=288),
}


for _size, _config in SIT_TEACHERS.items():
    register_family_model(__name__, f"lvvit_{_size}", f"SiT's LV-ViT-{_size.upper()} teacher: {_config}",
                          LVViT, _cfg, (SIT_TEACHER_LAYOUT,), feature_cfg=FEATURE_CFG, **_config)
for _name, _config in TOKEN_LABELING.items():
    register_family_model(__name__, _name, f"original token-labeling LV-ViT: {_config}", LVViT, _cfg,
                          (TOKEN_LABELING_LAYOUT,), feature_cfg=FEATURE_CFG, **_config, stem="token_labeling",
                          aux_head_in_eval=True)
