"""RePaFormer: the channel-idle FFN folds exactly (Eqs. 3-7), and the RePa variants match Table 1's sizes.

Equivalence is checked with random weights and random BatchNorm running statistics, in eval mode,
per FFN: every ChannelIdleFFN's output is recorded with hooks before and after `deploy`, and the
first one whose outputs differ is named. Fast tests use small inputs (32-64 px) and, for the big
backbones, a reduced depth with the real widths (`REDUCED`); `-m slow` runs every variant at full
depth and every idle ratio.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import riformer  # noqa: F401  (before timm: torchvision shim)
from riformer import repa
from riformer.deploy import deploy
import timm

from helpers import assert_fold_is_exact, one_thread, randomize_  # noqa: F401  (one_thread: autouse fixture)

THETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}

# Small but faithful builds: real widths everywhere; depth cut where the full model is slow on CPU.
REDUCED = {
    "repa_deit_tiny": dict(img_size=32),
    "repa_deit_small": dict(img_size=32),
    "repa_deit_base": dict(img_size=32, depth=3),
    "repa_vit_large": dict(img_size=32, depth=2),
    "repa_vit_huge": dict(img_size=32, depth=2),
    "repa_swin_tiny": dict(img_size=64, window_size=4),
    "repa_swin_small": dict(img_size=64, window_size=4, depths=(2, 2, 2, 2)),
    "repa_swin_base": dict(img_size=64, window_size=4, depths=(2, 2, 2, 2)),
    "repa_lvvit_s": dict(img_size=32, depth=4),
    "repa_lvvit_m": dict(img_size=32, depth=2),
    "repa_poolformer_s12": dict(img_size=32),
    "repa_poolformer_s24": dict(img_size=32),
    "repa_poolformer_s36": dict(img_size=32),
    "repa_mixer_b16": dict(img_size=32, num_blocks=3),
    "repa_mixer_l16": dict(img_size=32, num_blocks=2),
}
VARIANTS = list(repa.VARIANTS)
# One variant per kind of block: ViT, Swin, LV-ViT, PoolFormer (NCHW, layer scale), Mixer.
ONE_PER_BLOCK_KIND = ["repa_deit_tiny", "repa_swin_tiny", "repa_lvvit_s", "repa_poolformer_s12", "repa_mixer_b16"]


def build(name, dtype=torch.float64, idle_ratio=None, **overrides):
    kwargs = {**REDUCED[name], **overrides}
    model = timm.create_model(name, idle_ratio=idle_ratio, **kwargs)
    model = randomize_(model).eval().to(dtype)
    size = kwargs.get("img_size", 32)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)
    return model, x


# --- the FFN alone --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("theta", THETAS + (None,))
@pytest.mark.parametrize("options", [{}, {"channels_first": True, "layer_scale_init": 1e-5},
                                     {"branch_scale": 0.5}], ids=["tokens", "nchw_layer_scale", "branch_scale"])
def test_ffn_fold_is_exact(theta, dtype, options):
    ffn = repa.ChannelIdleFFN(24, 96, idle_ratio=theta, **options)
    shape = (2, 24, 5, 5) if options.get("channels_first") else (2, 7, 24)
    model = randomize_(nn.Sequential(ffn)).eval().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    assert_fold_is_exact(model, x, TOLERANCE[dtype])


@pytest.mark.parametrize("theta, active, deploy_linears", [
    (0.0, 96, 2), (0.25, 72, 3), (0.5, 48, 3), (0.75, 24, 3), (1.0, 0, 1), (None, 24, 3)])
def test_ffn_deploy_structure(theta, active, deploy_linears):
    """Eq. 7's three linears: fc1 C→μC, fc2 μC→C, W̃ C×C; θ=1 only W̃, θ=0 no W̃ (it would be I)."""
    ffn = repa.ChannelIdleFFN(24, 96, idle_ratio=theta).eval()
    assert ffn.num_active == active
    deploy(nn.Sequential(ffn).eval())
    linears = [m for m in ffn.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == deploy_linears
    assert not [m for m in ffn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if active:
        assert ffn.fc1.weight.shape == (active, 24) and ffn.fc2.weight.shape == (24, active)
    assert (ffn.shortcut is None) == (theta == 0.0)
    # params: weights (2μ + 1)C² (Sec. 4.3) plus one bias per output (fc1's μC, one C-vector overall)
    weights = 2 * active * 24 + (24 * 24 if theta != 0.0 else 0)
    assert sum(p.numel() for p in ffn.parameters()) == weights + active + 24


def test_ffn_training_mode_uses_batch_statistics():
    """Before the fold, train mode is Eq. 3 with batch statistics, whatever the running statistics."""
    torch.manual_seed(0)
    ffn = randomize_(nn.Sequential(repa.ChannelIdleFFN(16, 64, idle_ratio=0.5)))[0].train()
    other = copy.deepcopy(ffn)
    other.norm.running_mean.add_(3.0)
    other.norm_hidden.running_var.mul_(5.0)
    x = torch.randn(3, 10, 16)

    def batch_norm(bn, t):
        flat = t.reshape(-1, t.shape[-1])
        return F.batch_norm(flat, None, None, bn.weight, bn.bias, training=True, eps=bn.eps).reshape(t.shape)

    h = F.linear(batch_norm(ffn.norm, x), ffn.fc1.weight, ffn.fc1.bias)
    h = torch.cat([F.gelu(h[..., :32]), h[..., 32:]], dim=-1)
    expected = x + F.linear(batch_norm(ffn.norm_hidden, h), ffn.fc2.weight, ffn.fc2.bias)
    mean_before = ffn.norm.running_mean.clone()
    out = ffn(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other(x), out, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ffn.norm.running_mean, mean_before)  # running statistics still update


def test_ffn_refuses_to_fold_in_training_mode_and_twice():
    ffn = repa.ChannelIdleFFN(8, 32).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        ffn.switch_to_deploy()
    ffn.eval().switch_to_deploy()
    state = {k: v.clone() for k, v in ffn.state_dict().items()}
    with pytest.warns(UserWarning, match="already"):
        ffn.switch_to_deploy()
    assert all(torch.equal(state[k], v) for k, v in ffn.state_dict().items())


# --- the RePa variants ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_fold_is_exact(name, dtype):
    """Every variant at its default θ (μ = 1), real widths, depth per REDUCED."""
    model, x = build(name, dtype)
    folded = assert_fold_is_exact(model, x, TOLERANCE[dtype])
    assert not [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and not _in_stem(folded, m)]


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("name", ONE_PER_BLOCK_KIND)
def test_variant_fold_is_exact_for_every_idle_ratio(name, theta):
    model, x = build(name, idle_ratio=theta)
    assert_fold_is_exact(model, x, TOLERANCE[torch.float64])


_FULL_DEPTH = {}  # name -> its full-depth build, random float64 weights (the variant under test only)


def full_depth(name, theta):
    """`name` at full depth as `timm.create_model(name, idle_ratio=theta)` builds it, with random float64
    weights. The weights' shapes do not depend on θ (only each FFN's number of active channels does), and
    building and randomizing them is most of the time (ViT-H: ~25 s of CPU): one set per variant serves
    its five θ, each taking its active channels from the entrypoint's own build at θ on the meta device."""
    full = {k: v for k, v in REDUCED[name].items() if k in ("img_size", "window_size")}
    if name not in _FULL_DEPTH:
        _FULL_DEPTH.clear()
        _FULL_DEPTH[name] = randomize_(timm.create_model(name, **full)).eval().double()
    with torch.device("meta"):
        at_theta = timm.create_model(name, idle_ratio=theta, **full)
    # the last θ takes the shared build itself (folded in place: ViT-H's is 5 GB)
    model = _FULL_DEPTH.pop(name) if theta == THETAS[-1] else copy.deepcopy(_FULL_DEPTH[name])
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in at_theta.named_modules()]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in at_theta.state_dict().items()}
    ffns = [(m, built) for m, built in zip(model.modules(), at_theta.modules()) if isinstance(m, repa.ChannelIdleFFN)]
    assert ffns
    for ffn, built in ffns:
        ffn.num_active = built.num_active
    assert all(ffn.idle_ratio == pytest.approx(theta, abs=0.5 / ffn.hidden_dim) for ffn, _ in ffns)
    return model, full["img_size"]


@pytest.mark.slow
@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_and_idle_ratio_at_full_depth(name, theta):
    """Full depth, small input, folded in place: ViT-H alone needs ~10 GB (float64) and minutes."""
    model, size = full_depth(name, theta)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    assert_fold_is_exact(model, x, TOLERANCE[torch.float64], in_place=True)


def _in_stem(model, module):
    """LV-ViT's conv stem keeps its own BatchNorms (conv+BN, not part of the FFN fold)."""
    stem = getattr(model, "patch_embed", None)
    return stem is not None and any(module is m for m in stem.modules())


def test_variant_training_mode_is_unaffected_by_running_statistics():
    """A RePa model trains with batch statistics: its running statistics do not change its output."""
    model = randomize_(timm.create_model("repa_deit_tiny", img_size=32)).train()
    other = copy.deepcopy(model)
    for bn in (m for m in other.modules() if isinstance(m, nn.BatchNorm1d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 10.0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), other(x))


def test_variant_structure():
    """BatchNorm replaces the LayerNorm before the FFN; the attention norm and the final norm stay."""
    model = timm.create_model("repa_deit_tiny", img_size=32)
    block = model.blocks[0]
    assert isinstance(block, repa.RePaViTBlock) and isinstance(block.norm1, nn.LayerNorm)
    assert not hasattr(block, "norm2") and isinstance(block.mlp, repa.ChannelIdleFFN)
    assert isinstance(block.mlp.norm, nn.BatchNorm1d) and isinstance(model.norm, nn.LayerNorm)
    assert timm.create_model("repa_deit_tiny", img_size=32, idle_ratio=0.5).blocks[0].mlp.num_active == 384
    assert timm.create_model("repa_lvvit_s", img_size=32, depth=1).blocks[0].mlp.idle_ratio == pytest.approx(2 / 3)


def test_pretrained_is_refused():
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("repa_deit_tiny", pretrained=True)


# --- Table 1 sizes (parameters only: MACs are reported by `reproduce table`) -----------------------

# (pre, post) M params as printed in RePaFormer Table 1 (θ = 0.75, or 2/3 for LV-ViT's ρ = 3).
PRINTED_TABLE_1 = {
    "repa_deit_tiny": ("5.7", "3.5"), "repa_deit_small": ("22.1", "13.2"), "repa_deit_base": ("86.6", "51.1"),
    "repa_vit_large": ("304.5", "178.4"), "repa_vit_huge": ("632.5", "369.9"),
    "repa_swin_tiny": ("28.3", "17.5"), "repa_swin_small": ("49.7", "29.9"), "repa_swin_base": ("87.9", "52.8"),
    "repa_lvvit_s": ("26.2", "19.1"), "repa_lvvit_m": ("55.9", "40.1"),
    "repa_poolformer_s12": ("11.9", "6.0"), "repa_poolformer_s24": ("21.4", "9.6"),
    "repa_poolformer_s36": ("30.9", "13.1"), "repa_mixer_b16": ("59.9", "24.4"), "repa_mixer_l16": ("208.4", "82.2"),
}
# Cells we do not match at the printed precision, and why (the fold itself is checked by pre - post).
# The paper's ViT-H has exactly one more 1280→1000 linear than timm's ViT-H/16 (a distillation
# head?): with it, both cells match, and pre - post (262.7M) matches the printed 632.5 - 369.9.
EXTRA_PARAMS = {"repa_vit_huge": (1280 * 1000 + 1000) / 1e6}
NEAR_MISSES = {
    "repa_mixer_b16": 0.06,  # 59.954M before: 60.0 rounded, printed 59.9 (timm Mixer-B 59.88 + 0.07M BN)
    "repa_lvvit_s": 0.06,    # 19.049M after: 19.0 rounded, printed 19.1 (pre 26.189 matches)
}


def count_params(name, idle_ratio=None):
    with torch.device("meta"):  # sizes only: no memory, no init
        model = timm.create_model(name, idle_ratio=idle_ratio).eval()
    pre = sum(p.numel() for p in model.parameters()) / 1e6
    deploy(model)
    return pre, sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name", VARIANTS)
def test_table_1_params(name):
    pre, post = count_params(name)
    printed_pre, printed_post = PRINTED_TABLE_1[name]
    assert abs((pre - post) - (float(printed_pre) - float(printed_post))) <= 0.1  # what the fold removes
    if name in NEAR_MISSES:
        assert max(abs(pre - float(printed_pre)), abs(post - float(printed_post))) <= NEAR_MISSES[name]
        return
    extra = EXTRA_PARAMS.get(name, 0.0)
    assert f"{pre + extra:.{_decimals(printed_pre)}f}" == printed_pre
    assert f"{post + extra:.{_decimals(printed_post)}f}" == printed_post


# Table 4 / Table 8: params after the fold for other idle ratios (θ = 0.25, 0.5, 1.0), as printed.
PRINTED_IDLE_RATIOS = {
    ("repa_deit_base", 1.0): "37.0", ("repa_deit_base", 0.5): "65.3", ("repa_deit_base", 0.25): "79.5",
    ("repa_swin_base", 1.0): "38.8", ("repa_swin_base", 0.5): "66.8", ("repa_swin_base", 0.25): "80.8",
    ("repa_deit_tiny", 0.5): "4.4", ("repa_deit_tiny", 0.25): "5.3",
    ("repa_swin_tiny", 0.5): "21.8", ("repa_swin_tiny", 0.25): "26.1",
    ("repa_poolformer_s12", 0.5): "8.4", ("repa_poolformer_s12", 0.25): "10.7",
}


@pytest.mark.parametrize("name, theta", list(PRINTED_IDLE_RATIOS))
def test_idle_ratio_params(name, theta):
    _, post = count_params(name, theta)
    assert f"{post:.1f}" == PRINTED_IDLE_RATIOS[name, theta]


def _decimals(text):
    return len(text.split(".")[1]) if "." in text else 0
