"""Folds beyond the papers: what RIFormer's deploy block still computes but need not.

RIFormer's deploy block (paper Eq. 4) is

    x = x + ls1 * norm_reparam(x)
    x = x + ls2 * fc2(act(fc1(norm2(x))))

The per-channel layer scales and norm2's per-channel affine are all linear maps next to a
per-channel affine or a 1x1 convolution, so they fold exactly:

    ls1 into norm_reparam's affine:  gamma' = ls1 * gamma,  beta' = ls1 * beta
    norm2's affine into fc1:         W1' = W1 diag(gamma2),  b1' = b1 + W1 beta2   (norm2 keeps no affine)
    ls2 into fc2:                    W2' = diag(ls2) W2,     b2' = ls2 * b2

The result computes the same function with no layer-scale multiplies and no norm2 affine. It is an
extra of this suite, never used for a paper row (it changes the parameter count by 4C per block).
"""
import warnings

import torch
import torch.nn as nn

from riformer.metaformer import RIFormerBlock

__all__ = ["fold_layer_scales"]


def _fold_block(block: RIFormerBlock):
    ls1, ls2 = block.layer_scale_1, block.layer_scale_2
    norm = block.norm_reparam
    norm.weight.mul_(ls1)
    norm.bias.mul_(ls1)

    fc1, fc2, norm2 = block.mlp.fc1, block.mlp.fc2, block.norm2
    w1 = fc1.weight.flatten(1)  # 1x1 conv (out, in, 1, 1) as a matrix (out, in)
    fc1.bias.add_(w1 @ norm2.bias)
    fc1.weight.mul_(norm2.weight.reshape(1, -1, 1, 1))
    fc2.weight.mul_(ls2.reshape(-1, 1, 1, 1))
    fc2.bias.mul_(ls2)

    block.norm2 = type(norm2)(norm2.num_channels, eps=norm2.eps, affine=False)
    del block.layer_scale_1, block.layer_scale_2
    block.use_layer_scale = False


@torch.no_grad()
def fold_layer_scales(model: nn.Module) -> nn.Module:
    """Fold every RIFormer deploy block's layer scales and norm2 affine (see module doc), in place."""
    blocks = [m for m in model.modules() if isinstance(m, RIFormerBlock)]
    if not blocks:
        raise ValueError("fold_layer_scales() folds RIFormer blocks; this model has none")
    if any(not b.deploy for b in blocks):
        raise ValueError("fold_layer_scales() needs RIFormer in deploy form: call riformer.deploy(model) first")
    todo = [b for b in blocks if b.use_layer_scale or b.norm2.affine]
    if not todo:
        warnings.warn("fold_layer_scales(): already folded; the model is returned unchanged", stacklevel=3)
        return model
    for block in todo:
        if not block.use_layer_scale:
            raise ValueError("a RIFormer block without layer scales: nothing this fold knows how to do")
        _fold_block(block)
    return model
