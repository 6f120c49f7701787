"""MetaFormer-baselines models that timm lacks, and RIFormer's affine students on them.

All are timm's `MetaFormer` (Yu et al., "MetaFormer Baselines for Vision": StarReLU MLPs
without bias, res scale in stages 3-4, bias-free norms, linear head) with another token mixer:

* IdentityFormer: identity mixer.
* RandFormer: identity in stages 1-2, a frozen random token-mixing matrix in stages 3-4
  (a softmax-normalised uniform matrix, as in the official code); its size is the token count,
  so the model is built for one `img_size`.
* AffineFormer: RIFormer Table 9's students, IdentityFormer with a training-time per-channel
  affine mixer `affine(x) - x` (RIFormer Eq. 1) that `switch_to_deploy()` folds into the
  block's first norm (Eq. 4), leaving an identity mixer.

The block norm of these models, like the official `LayerNormGeneral(normalized_dim=(1, 2, 3),
bias=False)`, normalises over (C, H, W) and has a per-channel weight but no bias. Eq. 4 gives
the folded norm the bias beta' = beta (s - 1) + t = t, and there is no exact place for t
elsewhere (the next norm is not invariant to a per-channel shift, and the residual carries
it on), so the deployed norm is the same normalisation *with* a bias: C more parameters per
block than an IdentityFormer, and still C fewer than the training form (s and t go away).
"""
from typing import Optional

import torch
import torch.nn as nn

from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.metaformer import GroupNorm1NoBias, MetaFormer, MetaFormerBlock

from riformer import metaformer as metaformer_v1
from timm.models.metaformer import checkpoint_filter_fn as timm_metaformer_filter

from riformer._builder import (cfg_for_img_size, imagenet_cfg, load_local_checkpoint, local_checkpoint,
                               refuse_pretrained, register_timm_model)
from riformer.checkpoints import Layout, register_layouts, timm_layout
from riformer.metaformer import fold_affine_into_norm

__all__ = ["Affine", "RandomMixing", "AffineFormer", "fold_affine_into_norm"]

S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))
S18 = dict(depths=(3, 3, 9, 3), dims=(64, 128, 320, 512))


class Affine(metaformer_v1.Affine):
    """RIFormer's training-time mixer `affine(x) - x` (riformer/metaformer.py: a depthwise 1x1
    conv holding s and t), taking the extra keyword arguments timm's MetaFormer passes mixers."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(dim)


@register_notrace_function  # a leaf for torch.fx: the check depends on the input's size
def check_num_tokens(x: torch.Tensor, num_tokens: int) -> None:
    H, W = x.shape[-2:]
    if H * W != num_tokens:
        raise ValueError(f"RandomMixing was built for {num_tokens} tokens, got {H}x{W}; "
                         "build the model with the img_size it is run at")


class RandomMixing(nn.Module):
    """RandFormer's token mixer: a fixed random (N x N) matrix over the N tokens of the map,
    rows softmax-normalised; frozen (a parameter without grad, as in the official code, so
    checkpoints carry it and the MetaFormer-baselines paper's "11.9M + 0.2M" counts hold)."""
    num_tokens = 196

    def __init__(self, dim: int, num_tokens: Optional[int] = None, **kwargs):
        super().__init__()
        num_tokens = self.num_tokens = num_tokens or self.num_tokens
        self.random_matrix = nn.Parameter(torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1),
                                          requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B, C, H, W
        B, C, H, W = x.shape
        check_num_tokens(x, self.num_tokens)
        return torch.einsum("mn,bcn->bcm", self.random_matrix, x.reshape(B, C, H * W)).reshape(B, C, H, W)


def random_mixing_for(num_tokens: int) -> type:
    """RandomMixing sized for `num_tokens`, as a class: timm's MetaFormer stages take mixer
    classes (they test `issubclass`), so a `partial` will not do."""
    return type(f"RandomMixing{num_tokens}", (RandomMixing,), {"num_tokens": num_tokens})


class AffineFormer(MetaFormer):
    """MetaFormer whose blocks may carry an `Affine` mixer; `switch_to_deploy()` folds each
    into the norm before it and replaces the mixer by an identity."""

    def switch_to_deploy(self) -> None:
        for block in self.modules():
            if isinstance(block, MetaFormerBlock) and isinstance(block.token_mixer, Affine):
                block.norm1 = fold_affine_into_norm(block.norm1, block.token_mixer)
                block.token_mixer = nn.Identity()


def _stage_token_counts(img_size, num_stages: int = 4):
    """Tokens per stage of a MetaFormer: stem conv 7x7/4 pad 2, then 3x3/2 pad 1 downsamplings."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    h, w = (h - 3) // 4 + 1, (w - 3) // 4 + 1
    counts = [h * w]
    for _ in range(num_stages - 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        counts.append(h * w)
    return counts


def _cfg(**kwargs):
    return imagenet_cfg("stem.conv", "head.fc", pool_size=(7, 7), crop_pct=1.0, **kwargs)


# RandFormer is built for one size (its matrices are the token grid's).
default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in ("identityformer_s12", "identityformer_s18", "affineformer_s12", "affineformer_s18")},
    "randformer_s12": _cfg(fixed_input_size=True),
})


# sail-sg/metaformer's own layout (downsample_layers / stages.{i}.{j} / head) -> timm's MetaFormer, ours.
LAYOUTS = (Layout("sail-sg/metaformer", "MetaFormer-baselines release (github.com/sail-sg/metaformer README, "
                  "huggingface.co/sail/dl: {identity,rand}former_*.pth, a plain state dict)",
                  r"^downsample_layers\.0\.conv\.weight$", timm_metaformer_filter),)
register_layouts(["identityformer_s12", "randformer_s12"], LAYOUTS)


def _official_mlp_head_eps(model) -> None:
    """sail-sg/metaformer's MlpHead normalises with nn.LayerNorm's default eps 1e-5; timm's port uses 1e-6.
    No weight holds it, so a strict load alone leaves logits ~1e-7 relative apart (docs/weights.md)."""
    head = getattr(getattr(model, "head", None), "fc", None)
    if head is not None and isinstance(getattr(head, "norm", None), nn.LayerNorm):
        head.norm.eps = 1e-5


# timm's own ConvFormer / CAFormer / PoolFormerV2 (the riformer-9 and 384-recipe teachers), loaded from the
# authors' files: timm's filter maps the keys; the authors' head-norm eps is set on the model.
SAIL_SG_TEACHERS = ([f"{family}_{size}" for family in ("convformer", "caformer") for size in ("s18", "s36", "m36", "b36")]
                    + [f"poolformerv2_{size}" for size in ("s12", "s24", "s36", "m36", "m48")])
for _name in SAIL_SG_TEACHERS:
    register_layouts([_name], (Layout("sail-sg/metaformer", "MetaFormer-baselines release (github.com/sail-sg/metaformer "
                                      "README, huggingface.co/sail/dl: a plain state dict)",
                                      r"^downsample_layers\.0\.conv\.weight$", timm_metaformer_filter,
                                      prepare=_official_mlp_head_eps), timm_layout(_name)))


def _create(variant: str, pretrained: bool, token_mixers, arch: dict, model_cls=MetaFormer, **kwargs):
    """timm's MetaFormer; `features_only` through its `forward_intermediates` (FeatureGetterNet keeps the
    model, so `riformer.deploy` finds AffineFormer's fold in a feature extractor too); a local checkpoint
    loads through the suite's loader."""
    checkpoint_path = local_checkpoint(kwargs.pop("checkpoint_path", None), kwargs)
    refuse_pretrained(variant, pretrained, checkpoint_path, loads_local_files=True)
    model_args = dict(arch, token_mixers=token_mixers, norm_layers=GroupNorm1NoBias, use_mlp_head=False)
    model = build_model_with_cfg(model_cls, variant, pretrained=False,
                                 feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
                                 **dict(model_args, **kwargs))
    return load_local_checkpoint(model, variant, checkpoint_path)


@register_timm_model
def identityformer_s12(pretrained=False, **kwargs) -> MetaFormer:
    return _create("identityformer_s12", pretrained, nn.Identity, S12, **kwargs)


@register_timm_model
def identityformer_s18(pretrained=False, **kwargs) -> MetaFormer:
    """IdentityFormer at the S18 depths (3, 3, 9, 3) of ConvFormer/CAFormer-S18: the deploy-time
    architecture of the 18-layer students (the MetaFormer-baselines paper has no S18 of it)."""
    return _create("identityformer_s18", pretrained, nn.Identity, S18, **kwargs)


@register_timm_model
def randformer_s12(pretrained=False, img_size=224, **kwargs) -> MetaFormer:
    """RandFormer-S12; the random matrices of stages 3-4 are sized for `img_size`."""
    tokens = _stage_token_counts(img_size)
    mixers = [nn.Identity, nn.Identity, random_mixing_for(tokens[2]), random_mixing_for(tokens[3])]
    kwargs = cfg_for_img_size({**kwargs, "img_size": img_size}, stride=32)
    return _create("randformer_s12", pretrained, mixers, S12, kwargs_filter=("img_size",), **kwargs)


@register_timm_model
def affineformer_s12(pretrained=False, **kwargs) -> AffineFormer:
    """RIFormer Table 9 student, 12 layers (teachers RandFormer-S12, PoolFormerV2-S12)."""
    return _create("affineformer_s12", pretrained, Affine, S12, model_cls=AffineFormer, **kwargs)


@register_timm_model
def affineformer_s18(pretrained=False, **kwargs) -> AffineFormer:
    """RIFormer Table 9 student, 18 layers (teachers ConvFormer-S18, CAFormer-S18)."""
    return _create("affineformer_s18", pretrained, Affine, S18, model_cls=AffineFormer, **kwargs)
