"""RePaFormer: the channel-idle FFN and its structural reparameterization (RePaFormer paper, Sec. 4).

Training form of one FFN (paper Eq. 3), on tokens Y with C channels and ρC hidden channels:

    Y_in  = BN(Y) W_in                                   BatchNorm *replaces* the LayerNorm before the FFN
    Y_act = Concat(Act(Y_in[:, :μC]), Y_in[:, μC:])      only the first μC hidden channels are activated
    Z     = BN(Y_act) W_out + Y                          a second BatchNorm; `+ Y` is the block's own residual

The idle channels form a linear path through the activation, so at inference (`switch_to_deploy`,
Eqs. 4-7) both BatchNorms fold into W_in / W_out, the idle path and the residual fold into one C×C
linear W̃ = W_in[:, μC:] W_out[μC:, :] + I, and the FFN becomes

    Z = Act(Y W_in[:, :μC]) W_out[:μC, :] + Y W̃          (Eq. 7; all biases folded into one)

The idle ratio is θ = 1 - μ/ρ. θ = 1 leaves no activation: the whole FFN is the single linear W̃.
θ = 0 idles nothing: W̃ would be I, so the deploy form keeps a plain residual addition instead.

The RePa variants are the backbones as timm (or this suite) builds them, with every block's FFN and
the norm before it swapped for a `ChannelIdleFFN` that owns the block's second residual. Each RePa
block class below is its backbone's block with only `forward` changed (the FFN call includes the
residual); `_use_channel_idle_ffn` turns a built block into one. The attention / token-mixer norm,
the final norm and everything else stay as the backbone has them.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import timm
from timm.layers import DropPath, register_notrace_module, trunc_normal_
from timm.models.mlp_mixer import MixerBlock, MlpMixer
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock

from riformer import lvvit, metaformer
from riformer._builder import finish_timm_model, pop_feature_kwargs, refuse_pretrained, register, strip_timm_kwargs

__all__ = ["ChannelIdleFFN", "num_active_channels", "VARIANTS"]


def num_active_channels(hidden_dim: int, dim: int, idle_ratio: Optional[float]) -> int:
    """μC, the hidden channels that go through the activation.

    `idle_ratio=None` is the paper's default μ = 1 (μC = C active channels): θ = 0.75 at ρ = 4,
    θ = 2/3 for LV-ViT's ρ = 3 (the setting behind its printed 19.1M / 40.1M).
    """
    if idle_ratio is None:
        return min(dim, hidden_dim)
    if not 0.0 <= idle_ratio <= 1.0:
        raise ValueError(f"idle_ratio must be in [0, 1], got {idle_ratio}")
    return round(hidden_dim * (1.0 - idle_ratio))


@register_notrace_module  # a leaf for torch.fx, as nn.BatchNorm1d is: its forward inspects x.dim()
class BatchNormLast(nn.BatchNorm1d):
    """BatchNorm over the last dim of a (..., C) tensor: statistics over every token of the batch."""

    def forward(self, x):
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _bn_scale_shift(bn: nn.BatchNorm1d):
    """BN(x) = x * scale + shift in eval mode (running statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _linear(in_features, out_features, bias=True, like=None):
    layer = nn.Linear(in_features, out_features, bias=bias)
    return layer.to(like) if like is not None else layer


class ChannelIdleFFN(nn.Module):
    """The RePaFormer FFN (Eq. 3) including the block's residual; `switch_to_deploy()` gives Eq. 7.

    Works on channels-last tokens (..., C); `channels_first=True` takes NCHW maps (PoolFormer).
    `layer_scale_init` adds a learnable per-channel scale on the residual branch (PoolFormer's
    layer_scale_2), `branch_scale` a fixed one (LV-ViT's 1 / skip_lam); both fold into W_out.
    """

    def __init__(self, dim, hidden_dim, idle_ratio=None, act_layer=nn.GELU, drop_path=0.0,
                 layer_scale_init=None, branch_scale=1.0, channels_first=False):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_active = num_active_channels(hidden_dim, dim, idle_ratio)
        self.channels_first = channels_first
        self.branch_scale = branch_scale
        self.deployed = False

        self.norm = BatchNormLast(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.norm_hidden = BatchNormLast(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.layer_scale = (nn.Parameter(layer_scale_init * torch.ones(dim))
                            if layer_scale_init is not None else None)
        self.drop_path = drop_path if isinstance(drop_path, nn.Module) else (
            DropPath(drop_path) if drop_path > 0.0 else nn.Identity())
        self.shortcut = None  # deploy form: W̃ (None while training, or when θ = 0: plain residual)
        for fc in (self.fc1, self.fc2):
            trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    @property
    def idle_ratio(self) -> float:
        return 1.0 - self.num_active / self.hidden_dim

    def extra_repr(self):
        form = "deploy" if self.deployed else "train"
        return f"dim={self.dim}, hidden={self.hidden_dim}, active={self.num_active}, form={form}"

    def _activate_first(self, h):
        a = self.num_active
        if a == self.hidden_dim:
            return self.act(h)
        if a == 0:
            return h
        return torch.cat([self.act(h[..., :a]), h[..., a:]], dim=-1)

    def _branch(self, x):
        """The residual branch of Eq. 3 (training form)."""
        y = self.fc2(self.norm_hidden(self._activate_first(self.fc1(self.norm(x)))))
        if self.layer_scale is not None:
            y = y * self.layer_scale
        return y * self.branch_scale if self.branch_scale != 1.0 else y

    def _deployed(self, x):
        """Eq. 7: Act(x W1) W2 + x W̃, with one bias (on fc2, or on W̃ when θ = 1)."""
        y = self.shortcut(x) if self.shortcut is not None else x
        if self.num_active:
            y = y + self.fc2(self.act(self.fc1(x)))
        return y

    def forward(self, x):
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        x = self._deployed(x) if self.deployed else x + self.drop_path(self._branch(x))
        return x.permute(0, 3, 1, 2) if self.channels_first else x

    @torch.no_grad()
    def switch_to_deploy(self):
        if self.deployed:
            warnings.warn("ChannelIdleFFN is already reparameterized; switch_to_deploy() does nothing",
                          stacklevel=2)
            return
        if self.training:
            raise RuntimeError("ChannelIdleFFN.switch_to_deploy() needs eval mode: the BatchNorm folds "
                               "use running statistics (call model.eval() first)")
        # Eq. 4: BN(x) = x * s + t, so BN(x) W^T + b = x (W diag(s))^T + (W t + b).
        s1, t1 = _bn_scale_shift(self.norm)
        w1 = self.fc1.weight * s1
        b1 = self.fc1.bias + self.fc1.weight @ t1
        s2, t2 = _bn_scale_shift(self.norm_hidden)
        w2 = self.fc2.weight * s2
        b2 = self.fc2.bias + self.fc2.weight @ t2
        out_scale = torch.full_like(b2, self.branch_scale)
        if self.layer_scale is not None:
            out_scale = out_scale * self.layer_scale
        w2, b2 = w2 * out_scale[:, None], b2 * out_scale

        a = self.num_active
        # Eq. 6: the idle path x W1[a:]^T W2[:, a:]^T plus the residual is one C×C linear W̃;
        # the idle path's bias b1[a:] W2[:, a:]^T joins the output bias.
        w_idle, bias = w2[:, a:] @ w1[a:], b2 + w2[:, a:] @ b1[a:]
        like = self.fc1.weight
        shortcut = None
        if a < self.hidden_dim:
            shortcut = _linear(self.dim, self.dim, bias=a == 0, like=like)
            shortcut.weight.copy_(w_idle + torch.eye(self.dim, dtype=w_idle.dtype, device=w_idle.device))
            if a == 0:
                shortcut.bias.copy_(bias)
        fc1 = fc2 = None
        if a:
            fc1 = _linear(self.dim, a, like=like)
            fc1.weight.copy_(w1[:a])
            fc1.bias.copy_(b1[:a])
            fc2 = _linear(a, self.dim, like=like)
            fc2.weight.copy_(w2[:, :a])
            fc2.bias.copy_(bias)
        self.fc1, self.fc2, self.shortcut = fc1, fc2, shortcut
        if not a:
            self.act = None
        del self.norm, self.norm_hidden
        self.layer_scale = None
        self.drop_path = nn.Identity()
        self.deployed = True
        self.train(self.training)  # the new linears take the module's (eval) mode


# ---------------------------------------------------------------------------------------------
# RePa blocks: each backbone's block whose second residual lives inside its ChannelIdleFFN.

class RePaViTBlock(ViTBlock):
    """timm's ViT/DeiT block: x + attn(LN(x)), then the channel-idle FFN (residual included)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return self.mlp(x)


class RePaSwinBlock(SwinTransformerBlock):
    """timm's Swin block: windowed attention on (B, H, W, C), then the channel-idle FFN."""

    def forward(self, x):
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return self.mlp(x)


class RePaMixerBlock(MixerBlock):
    """timm's Mixer block: the token-mixing MLP as is, the channel MLP channel-idle."""

    def forward(self, x):
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return self.mlp_channels(x)


class RePaPoolFormerBlock(metaformer.PoolFormerBlock):
    """PoolFormer v1 block: x + ls1 * pool-mixer(GN(x)), then the channel-idle FFN (ls2 inside)."""

    def forward(self, x):
        if self.use_layer_scale:
            x = x + self.drop_path(metaformer._channel(self.layer_scale_1) * self.mix(x))
        else:
            x = x + self.drop_path(self.mix(x))
        return self.mlp(x)


class RePaLVViTBlock(lvvit.Block):
    """LV-ViT block: x + attn(LN(x)) / skip_lam, then the channel-idle FFN (1 / skip_lam inside)."""

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return self.mlp(x)


def _fc_features(fc):
    if isinstance(fc, nn.Conv2d):
        return fc.in_channels, fc.out_channels
    return fc.in_features, fc.out_features


def _use_channel_idle_ffn(block, repa_cls, idle_ratio, mlp="mlp", norm="norm2", drop_path="drop_path2",
                          layer_scale=None, branch_scale=1.0, channels_first=False):
    """Swap `block`'s FFN and the norm before it for one ChannelIdleFFN and make it a `repa_cls`.

    `repa_cls` subclasses the block's own class and only changes `forward`, so re-classing the
    built block keeps every other module (attention, masks, buffers) exactly as the backbone made it.
    """
    old = getattr(block, mlp)
    dim, hidden = _fc_features(old.fc1)
    scale = getattr(block, layer_scale) if layer_scale else None
    ffn = ChannelIdleFFN(dim, hidden, idle_ratio, act_layer=type(old.act), drop_path=getattr(block, drop_path),
                         layer_scale_init=1.0 if scale is not None else None, branch_scale=branch_scale,
                         channels_first=channels_first)
    if scale is not None:
        ffn.layer_scale.data.copy_(scale.data)
        delattr(block, layer_scale)
    ffn.to(old.fc1.weight)
    setattr(block, mlp, ffn)
    delattr(block, norm)
    if drop_path != "drop_path":  # a drop path of its own (ViT, Swin); Mixer/PoolFormer/LV-ViT share theirs
        delattr(block, drop_path)
    block.__class__ = repa_cls
    return block


def _no_layer_scale(block):
    if not isinstance(block.ls2, nn.Identity):
        raise NotImplementedError("RePa-ViT with layer scale (init_values) is not part of the paper")
    del block.ls2


# timm's Mixer entry points fix `num_blocks`; building the class lets tests shorten the depth.
MIXER_SHAPES = {
    "mixer_b16_224": dict(patch_size=16, num_blocks=12, embed_dim=768),
    "mixer_l16_224": dict(patch_size=16, num_blocks=24, embed_dim=1024),
}


def _base_model(name, kwargs):
    """The backbone as registered (timm's or ours), never with weights: RePa models train from scratch."""
    strip_timm_kwargs(kwargs)
    if name in MIXER_SHAPES:
        model = MlpMixer(**{**MIXER_SHAPES[name], **kwargs})
        model.pretrained_cfg = model.default_cfg = timm.models.get_pretrained_cfg(name).to_dict()
        return model
    return timm.create_model(name, pretrained=False, **kwargs)


# Each converter swaps the FFN of every block of a built backbone for a ChannelIdleFFN.
def _repa_vit(model, idle_ratio):
    for block in model.blocks:
        _no_layer_scale(block)
        _use_channel_idle_ffn(block, RePaViTBlock, idle_ratio)


def _repa_swin(model, idle_ratio):
    for block in (block for stage in model.layers for block in stage.blocks):
        _use_channel_idle_ffn(block, RePaSwinBlock, idle_ratio)


def _repa_mixer(model, idle_ratio):
    for block in model.blocks:
        _use_channel_idle_ffn(block, RePaMixerBlock, idle_ratio, mlp="mlp_channels", drop_path="drop_path")


def _repa_poolformer(model, idle_ratio):
    for block in model.blocks():
        _use_channel_idle_ffn(block, RePaPoolFormerBlock, idle_ratio, drop_path="drop_path",
                              layer_scale="layer_scale_2" if block.use_layer_scale else None,
                              channels_first=True)


def _repa_lvvit(model, idle_ratio):
    for block in model.blocks:
        _use_channel_idle_ffn(block, RePaLVViTBlock, idle_ratio, drop_path="drop_path",
                              branch_scale=1.0 / block.skip_lam)


# name: (converter, backbone registered with timm, extra backbone kwargs)
VARIANTS = {
    "repa_deit_tiny": (_repa_vit, "deit_tiny_patch16_224", {}),
    "repa_deit_small": (_repa_vit, "deit_small_patch16_224", {}),
    "repa_deit_base": (_repa_vit, "deit_base_patch16_224", {}),
    "repa_vit_large": (_repa_vit, "vit_large_patch16_224", {}),
    "repa_vit_huge": (_repa_vit, "vit_huge_patch14_224", {"patch_size": 16}),  # ViT-H/16 at 224
    "repa_swin_tiny": (_repa_swin, "swin_tiny_patch4_window7_224", {}),
    "repa_swin_small": (_repa_swin, "swin_small_patch4_window7_224", {}),
    "repa_swin_base": (_repa_swin, "swin_base_patch4_window7_224", {}),
    # The original token-labeling LV-ViT-S/M (26.2M / 55.8M), which RePaFormer Table 2 compares with.
    "repa_lvvit_s": (_repa_lvvit, "lvvit_s_tl", {}),
    "repa_lvvit_m": (_repa_lvvit, "lvvit_m_tl", {}),
    "repa_poolformer_s12": (_repa_poolformer, "poolformer_v1_s12", {}),
    "repa_poolformer_s24": (_repa_poolformer, "poolformer_v1_s24", {}),
    "repa_poolformer_s36": (_repa_poolformer, "poolformer_v1_s36", {}),
    "repa_mixer_b16": (_repa_mixer, "mixer_b16_224", {}),
    "repa_mixer_l16": (_repa_mixer, "mixer_l16_224", {}),
}


# features_only, as each backbone gives it: the last 3 blocks of the isotropic ones (FeatureGetterNet
# over forward_intermediates, the default), every stage of the hierarchical ones (Swin's own list, NHWC).
FEATURE_CFGS = {
    _repa_vit: {"out_indices": 3},
    _repa_mixer: {"out_indices": 3},
    _repa_lvvit: {"out_indices": 3},
    _repa_swin: {"feature_cls": "list", "flatten_sequential": True, "out_indices": (0, 1, 2, 3)},
    _repa_poolformer: {},
}
# What a RePa model's cfg keeps of its backbone's: the input and eval transform, the layer names;
# not the backbone's weights, hub id, license or paper.
CFG_FIELDS = ("input_size", "fixed_input_size", "min_input_size", "interpolation", "crop_pct", "crop_mode",
              "mean", "std", "num_classes", "pool_size", "first_conv", "classifier")


def _repa_cfg(base_cfg: dict) -> dict:
    return {key: base_cfg[key] for key in CFG_FIELDS if base_cfg.get(key) is not None} | {"url": ""}


def _register(name, convert, base, base_kwargs):
    def build(pretrained=False, idle_ratio=None, **kwargs):
        refuse_pretrained(name, pretrained)
        features = pop_feature_kwargs(kwargs)
        model = _base_model(base, {**base_kwargs, **kwargs})
        convert(model, idle_ratio)
        return finish_timm_model(model, name, _repa_cfg(model.pretrained_cfg), FEATURE_CFGS[convert], features)

    register(__name__, name, build,
             f"RePaFormer on {base} {base_kwargs or ''}: channel-idle FFNs; idle_ratio=None is "
             "the paper's default μ = 1 (θ = 0.75 at mlp ratio 4)",
             _repa_cfg(timm.models.get_pretrained_cfg(base).to_dict()))


for _name, (_convert, _base, _base_kwargs) in VARIANTS.items():
    _register(_name, _convert, _base, _base_kwargs)
