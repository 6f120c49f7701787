"""PoolFormer v1 and RIFormer: sizes, printed params, and the exact deploy fold (paper Eq. 4)."""
import copy

import pandas as pd
import pytest
import timm
import torch

import riformer
from reproduce.registry import REFERENCE_DIR
from reproduce.report import compare

SIZES = ["s12", "s24", "s36", "m36", "m48"]
TABLE6 = pd.read_csv(REFERENCE_DIR / "riformer-6.csv", dtype=str, keep_default_na=False)


def printed_params(row):
    return TABLE6[(TABLE6.row == row) & (TABLE6.column == "params")].reported.item()


def randomize(model):
    """Move every parameter away from its init so that a wrong fold cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.mark.parametrize("size", SIZES)
def test_params_match_table6(size):
    for name, row in ((f"poolformer_v1_{size}", f"poolformer_{size}"), (f"riformer_{size}", f"riformer_{size}")):
        model = timm.create_model(name)
        if name.startswith("riformer"):
            riformer.deploy(model.eval())
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert compare(printed_params(row), params, 0.1, "params")[0] == "match", (name, params)


@pytest.mark.parametrize("size", SIZES)
def test_deploy_form_computes_the_same_function(size):
    torch.manual_seed(0)
    model = randomize(timm.create_model(f"riformer_{size}")).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        after = riformer.deploy(copy.deepcopy(model))(x)
    rel = ((before - after).abs().max() / before.abs().max()).item()
    assert rel < 1e-10, rel


def test_deploy_removes_the_mixer_and_matches_poolformer_layout():
    model = riformer.deploy(timm.create_model("riformer_s12").eval())
    blocks = model.blocks()
    assert all(b.deploy and not hasattr(b, "token_mixer") and not hasattr(b, "norm1") for b in blocks)
    ours = {k for k in model.state_dict() if "norm_reparam" not in k}
    pool = {k for k in timm.create_model("poolformer_v1_s12").state_dict()
            if "token_mixer" not in k and "norm1" not in k}
    assert ours == pool


def test_deploy_needs_eval_mode_and_is_idempotent():
    model = timm.create_model("riformer_s12")
    with pytest.raises(ValueError, match="eval mode"):
        riformer.deploy(model)
    model.eval()
    riformer.deploy(model)
    state = copy.deepcopy(model.state_dict())
    riformer.deploy(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_slim_poolformers_are_slimmer_than_s12():
    s12, s9, xs12 = (timm.create_model(f"poolformer_v1_{s}") for s in ("s12", "s9", "xs12"))
    assert len(s9.blocks()) == 9 and len(xs12.blocks()) == 12
    assert xs12.num_features == 424 and s12.num_features == 512


def test_official_checkpoint_layout_loads_through_timm(tmp_path):
    source = timm.create_model("poolformer_v1_s12")
    path = tmp_path / "poolformer_s12.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = timm.create_model("poolformer_v1_s12", checkpoint_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="cannot be downloaded"):
        timm.create_model("riformer_s12", pretrained=True)


def test_poolformer_pools_three_by_three_as_the_official_code():
    """A 5x5 window keeps params and MACs and costs a few % at most on a CPU, under the throughput
    guard's 5 % tolerance (docs/benchmarking.md): the structure itself is checked here. Official
    PoolFormer: nn.AvgPool2d(pool_size=3, stride=1, padding=pool_size//2, count_include_pad=False)."""
    model = timm.create_model("poolformer_v1_s12")
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert len(pools) == 12
    assert {(p.kernel_size, p.stride, p.padding, p.count_include_pad) for p in pools} == {(3, 1, 1, False)}


def test_a_five_by_five_pooling_fails_the_structure_check(monkeypatch):
    from helpers import guard_plants

    with guard_plants().pooling(5), pytest.raises(AssertionError):
        test_poolformer_pools_three_by_three_as_the_official_code()
