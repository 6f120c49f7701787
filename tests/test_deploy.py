"""riformer.deploy(): folds every model of the suite, refuses bad input, never returns a wrong model;
fold_layer_scales(): the beyond-the-paper fold of RIFormer's layer scales and norm2 affine."""
import copy

import pytest
import torch
import torch.nn as nn

import riformer  # noqa: F401  (before timm: torchvision shim)
from riformer import repa
from riformer.deploy import deploy, has_deploy_form, is_deployed
from riformer.fold_extra import fold_layer_scales
from riformer.metaformer import RIFormerBlock
import timm

from helpers import assert_fold_is_exact, max_relative_error, one_thread, randomize_  # noqa: F401  (one_thread: autouse fixture)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def random_riformer(name="riformer_s12", dtype=torch.float64, seed=0):
    """RIFormer with random affine mixers, norms and layer scales (all at their defaults otherwise)."""
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(name)
    for block in (m for m in model.modules() if isinstance(m, RIFormerBlock)):
        for p in (block.token_mixer.affine.weight, block.token_mixer.affine.bias, block.norm1.weight,
                  block.norm1.bias, block.norm2.weight, block.norm2.bias, block.mlp.fc1.bias, block.mlp.fc2.bias):
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 0.5)
        for p in (block.layer_scale_1, block.layer_scale_2):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval().to(dtype)


def test_training_mode_is_refused():
    model = timm.create_model("repa_deit_tiny", img_size=32)
    with pytest.raises(ValueError, match="eval mode"):
        deploy(model)
    model.eval()
    model.blocks[1].mlp.train()  # one submodule left in training mode is just as wrong
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp"):
        deploy(model)


@pytest.mark.parametrize("name", ["repa_deit_tiny", "riformer_s12"])
def test_deploying_twice_warns_and_changes_nothing(name):
    kwargs = {"img_size": 32} if name.startswith("repa") else {}
    model = deploy(timm.create_model(name, **kwargs).eval())
    before = state(model)
    with pytest.warns(UserWarning, match="already in its deploy form"):
        assert deploy(model) is model
    assert same_state(before, state(model))


def test_model_without_folds_warns():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32).eval()
    assert not has_deploy_form(model)
    with pytest.warns(UserWarning, match="nothing to fold"):
        deploy(model)


def test_partly_deployed_model_folds_the_rest():
    ffns = nn.Sequential(*(randomize_(repa.ChannelIdleFFN(8, 32), seed=i) for i in range(3))).eval().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = ffns(x)
        ffns[1].switch_to_deploy()
        deploy(ffns)
        assert all(is_deployed(f) for f in ffns)
        assert max_relative_error(expected, ffns(x)) < 1e-10


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_riformer_deploy_is_exact(dtype, tolerance):
    model = random_riformer(dtype=dtype)
    assert has_deploy_form(model)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        deploy(model)
        assert all(b.deploy for b in model.modules() if isinstance(b, RIFormerBlock))
        assert max_relative_error(expected, model(x)) <= tolerance


# --- fold_layer_scales (beyond the paper) ----------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fold_layer_scales_is_exact(dtype, tolerance):
    model = deploy(random_riformer(dtype=dtype))
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(x)
        fold_layer_scales(model)
        got = model(x)
    assert max_relative_error(expected, got) <= tolerance
    blocks = [m for m in model.modules() if isinstance(m, RIFormerBlock)]
    assert all(not b.use_layer_scale and not hasattr(b, "layer_scale_1") and not b.norm2.affine for b in blocks)
    # two layer scales and norm2's weight and bias, C each, leave every block
    removed = sum(4 * b.norm_reparam.num_channels for b in blocks)
    assert params_before - sum(p.numel() for p in model.parameters()) == removed


def test_fold_layer_scales_refuses_bad_input():
    with pytest.raises(ValueError, match="deploy form"):
        fold_layer_scales(random_riformer())
    with pytest.raises(ValueError, match="no"):
        fold_layer_scales(timm.create_model("repa_deit_tiny", img_size=32).eval())
    model = fold_layer_scales(deploy(random_riformer()))
    before = state(model)
    with pytest.warns(UserWarning, match="already folded"):
        fold_layer_scales(model)
    assert same_state(before, state(model))


def test_repa_models_deploy_through_the_one_entry_point():
    model = randomize_(timm.create_model("repa_poolformer_s12")).eval().double()
    assert has_deploy_form(model)
    folded = assert_fold_is_exact(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), 1e-10)
    assert all(f.deployed for f in folded.modules() if isinstance(f, repa.ChannelIdleFFN))
    assert copy.deepcopy(folded)  # a folded model is an ordinary module
