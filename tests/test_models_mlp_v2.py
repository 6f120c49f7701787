"""Swin-Mixer, ResMLP-B24/16 (riformer/mlp.py) and the MetaFormer-baselines family
(riformer/metaformer_v2.py): shapes, parameter counts against the papers, the affine fold."""
import pytest
import torch
import torch.nn as nn

import riformer  # noqa: F401  (before timm: torchvision shim)
import riformer.metaformer_v2 as v2
import riformer.mlp  # noqa: F401  (registers the models)
import timm
from riformer.deploy import deploy

torch.set_num_threads(1)

ALL_MODELS = ["swin_mixer_tiny_d6", "swin_mixer_base_d24", "resmlp_b24_p16", "identityformer_s12",
              "identityformer_s18", "randformer_s12", "affineformer_s12", "affineformer_s18"]


def count_params(model: nn.Module, trainable=None) -> int:
    """Number of parameters (all, trainable only, or frozen only)."""
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def millions(model: nn.Module, trainable=None) -> float:
    return count_params(model, trainable) / 1e6


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """Structure only (no memory, no init): enough to count parameters of the big models."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


# -- build and forward ------------------------------------------------------------------------

# Swin-Mixer-B (window 7) runs only where every stage's map is a multiple of 7 or at most 7: 224.
FORWARD_SIZES = {"swin_mixer_tiny_d6": 64, "swin_mixer_base_d24": 224, "resmlp_b24_p16": 64}


@pytest.mark.parametrize("name", ALL_MODELS)
def test_builds_and_forward_shape(name):
    size = FORWARD_SIZES.get(name, 64)
    kwargs = {} if name.startswith(("identityformer", "affineformer")) else {"img_size": size}
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    batch = 1 if name == "swin_mixer_base_d24" else 2
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pretrained_weights_are_refused(name):
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


# -- parameter counts against the printed values ---------------------------------------------

@pytest.mark.parametrize("name, printed_m", [
    ("swin_mixer_tiny_d6", 23),     # RIFormer Table 6 / Swin paper, at 256
    ("swin_mixer_base_d24", 61),    # at 224
    ("resmlp_b24_p16", 116),        # at 224
])
def test_spatial_mlp_params_match_table6(name, printed_m):
    assert round(millions(build_on_meta(name))) == printed_m


def test_resmlp_b24_p16_is_the_patch16_model():
    ours, timms = build_on_meta("resmlp_b24_p16"), build_on_meta("resmlp_big_24_224")
    assert ours.stem.proj.kernel_size == (16, 16) and timms.stem.proj.kernel_size == (8, 8)
    assert ours.blocks[0].linear_tokens.in_features == 196
    assert len(ours.blocks) == 24 and ours.embed_dim == 768


def test_identityformer_and_randformer_params_match_metaformer_baselines():
    # MetaFormer Baselines for Vision, Table: IdentityFormer-S12 11.9M; RandFormer-S12 11.9M + 0.2M frozen
    assert round(millions(build_on_meta("identityformer_s12")), 1) == 11.9
    rand = build_on_meta("randformer_s12")
    assert round(millions(rand, trainable=True), 1) == 11.9
    assert round(millions(rand, trainable=False), 1) == 0.2
    # S18 (depths 3-3-9-3) is not in that paper: only our own count, kept from drifting
    assert round(millions(build_on_meta("identityformer_s18")), 1) == 16.6


@pytest.mark.parametrize("depth, name", [(12, "affineformer_s12"), (18, "affineformer_s18")])
def test_affine_students_cost_s_and_t_in_training_and_one_bias_after_deploy(depth, name):
    identity = count_params(build_on_meta(name.replace("affine", "identity")))
    student = timm.create_model(name).eval()
    dims = [b.norm1.num_channels for b in student.modules() if isinstance(b, v2.MetaFormerBlock)]
    assert len(dims) == depth
    assert count_params(student) == identity + 2 * sum(dims)  # s and t per block
    deploy(student)
    assert count_params(student) == identity + sum(dims)      # the folded norm's bias


# -- architecture details ----------------------------------------------------------------------

def test_swin_mixer_tiny_d6_has_6_channels_per_group_and_window_8():
    model = build_on_meta("swin_mixer_tiny_d6")  # default img_size 256
    assert model.patch_embed.img_size == (256, 256)
    for stage, dim in zip(model.stages, (96, 192, 384, 768)):
        for i, block in enumerate(stage.blocks):
            mixer = block.token_mixer
            assert dim // mixer.num_heads == 6
            assert mixer.window_size == 8
            # the last stage's 8x8 map is a single window, never shifted
            assert mixer.shift_size == (4 if i % 2 and dim < 768 else 0)


def test_swin_mixer_shift_pads_instead_of_rolling():
    """Unshifted windows start at 0; a shift s pads (w - s) zeros before, so the first shifted
    window covers only tokens [0, s) and the next one [s, s + w)."""
    w, s = 4, 2
    mixer = riformer.mlp.WindowSpatialMlp(dim=2, num_heads=1, window_size=w, shift_size=s).double()
    nn.init.normal_(mixer.spatial_mlp.weight)
    x = torch.randn(1, 8, 8, 2, dtype=torch.float64)

    def touched(i, j):
        bumped = x.clone()
        bumped[0, i, j] += 1.0
        changed = (mixer(bumped) - mixer(x)).abs().sum(-1)[0] > 0
        return changed.nonzero().tolist()

    assert {tuple(t) for t in touched(s - 1, s - 1)} <= {(a, b) for a in range(s) for b in range(s)}
    assert {tuple(t) for t in touched(s, s)} == {(a, b) for a in range(s, s + w) for b in range(s, s + w)}


def test_randformer_matrices_follow_img_size_and_are_frozen():
    default = build_on_meta("randformer_s12")
    small = timm.create_model("randformer_s12", img_size=64)
    for model, tokens in ((default, (196, 49)), (small, (16, 4))):
        mixers = [m for m in model.modules() if isinstance(m, v2.RandomMixing)]
        assert len(mixers) == 6 + 2
        assert {m.random_matrix.shape[0] for m in mixers[:6]} == {tokens[0]}
        assert {m.random_matrix.shape[0] for m in mixers[6:]} == {tokens[1]}
        assert not any(m.random_matrix.requires_grad for m in mixers)
    rows = small.stages[2].blocks[0].token_mixer.random_matrix.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    with pytest.raises(ValueError, match="built for 16 tokens"):
        small(torch.randn(1, 3, 96, 96))


# -- the affine fold ---------------------------------------------------------------------------

def randomize_affine_and_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Move every affine mixer, norm and scale away from its identity init (weights stay small
    enough that twelve StarReLU blocks do not overflow)."""
    def uniform(p, low, high):
        p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) * (high - low) + low)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "token_mixer.affine.weight" in name:
                uniform(p, -1.0, 2.0)       # s, including s < 1 and s near 0
            elif "token_mixer.affine.bias" in name or name.endswith(".bias"):
                uniform(p, -0.5, 0.5)       # t and any norm / head bias
            elif "norm" in name or "scale" in name:
                uniform(p, 0.5, 1.5)        # norm gammas, res scales, StarReLU scale


@pytest.mark.parametrize("name", ["affineformer_s12", "affineformer_s18"])
def test_affine_students_train_and_deploy_forms_agree_in_float64(name):
    generator = torch.Generator().manual_seed(0)
    model = timm.create_model(name, num_classes=10).double().eval()
    randomize_affine_and_norms(model, generator)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        train_out = model(x)
        deploy(model)
        deploy_out = model(x)
    assert not any(isinstance(m, v2.Affine) for m in model.modules())
    assert all(b.norm1.bias is not None for b in model.modules() if isinstance(b, v2.MetaFormerBlock))
    assert train_out.abs().max() > 1e-3  # a real signal, not a vanishing one
    assert (train_out - deploy_out).abs().max() < 1e-10


@pytest.mark.parametrize("norm", [nn.GroupNorm(1, 8, eps=1e-6), timm.layers.LayerNorm2d(8)])
def test_fold_keeps_an_existing_norm_bias(norm):
    """Eq. 4 with beta != 0: the case of norms that have a bias (e.g. PoolFormer v1's)."""
    generator = torch.Generator().manual_seed(1)
    norm = norm.double()
    affine = v2.Affine(8).double()
    with torch.no_grad():
        for p in (*norm.parameters(), *affine.parameters()):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, generator=generator)
    folded = v2.fold_affine_into_norm(norm, affine)
    assert type(folded) is type(norm)
    with torch.no_grad():
        assert (affine(norm(x)) - folded(x)).abs().max() < 1e-12


# -- MACs at the printed resolutions (fvcore) ----------------------------------------------------

@pytest.mark.parametrize("name, size, printed_g", [
    ("swin_mixer_tiny_d6", 256, 4.0), ("swin_mixer_base_d24", 224, 10.4), ("resmlp_b24_p16", 224, 23.0),
    ("identityformer_s12", 224, 1.8), ("randformer_s12", 224, 1.9),
])
def test_fvcore_macs_within_0_1g_of_printed(name, size, printed_g):
    from fvcore.nn import FlopCountAnalysis
    model = timm.create_model(name).eval()
    flops = FlopCountAnalysis(model, torch.zeros(1, 3, size, size))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    assert abs(flops.total() / 1e9 - printed_g) <= 0.1
