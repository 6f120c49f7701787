"""LV-ViT teachers and SiT students: shapes, token slimming, deploy, checkpoints, printed sizes."""
import pytest
import torch

import riformer  # noqa: F401  (before timm)
import riformer.lvvit  # noqa: F401  (registers the models)
import timm
from fvcore.nn import FlopCountAnalysis
from riformer.deploy import deploy
from riformer.sit import SiT, SiTTrainOutput, TokenSlimming, training_only_params

torch.set_num_threads(1)

LVVITS = ["lvvit_ti", "lvvit_s", "lvvit_m", "lvvit_l", "lvvit_s_tl", "lvvit_m_tl", "lvvit_l_tl"]
SITS = ["sit_ti", "sit_xs", "sit_s", "sit_m", "sit_l", "sit_ti_dist", "sit_xs_dist", "sit_s_dist", "sit_m_dist"]
SMALL = 64  # 4x4 patch tokens


def param_millions(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


def build_meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", LVVITS)
def test_lvvit_forwards(name):
    model = timm.create_model(name, img_size=SMALL, num_classes=10)
    x = torch.randn(2, 3, SMALL, SMALL)
    assert model(x).shape == (2, 10)
    logits, block_tokens = model.eval().forward_block_tokens(x)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert len(block_tokens) == len(model.blocks)
    assert all(t.shape == (2, 16, model.embed_dim) for t in block_tokens)
    cls_logits, aux_logits = model.forward_dense(x)
    assert aux_logits.shape == (2, 16, 10)


@pytest.mark.parametrize("name", SITS)
def test_sit_train_and_eval_forwards(name):
    model = timm.create_model(name, img_size=SMALL, num_classes=10)
    assert model.stage_tokens == [16, 8, 4, 2]  # keep ratio 0.5 of the 4x4 grid, three times
    x = torch.randn(2, 3, SMALL, SMALL)
    out = model.train().forward_train(x)
    assert isinstance(out, SiTTrainOutput)
    assert out.logits.shape == out.dist_logits.shape == (2, 10)
    assert len(out.block_tokens) == len(model.blocks)
    # FRD compares with the teacher's tokens: every block gives the full token count back.
    assert all(t.shape == (2, 16, model.embed_dim) for t in out.block_tokens)
    assert model.eval()(x).shape == (2, 10)
    # timm's contract in both modes: forward is forward_head of forward_features, a tensor.
    for mode in (True, False):
        model.train(mode)
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        b = model.forward_head(model.forward_features(x))
        assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    model.eval()
    logits, dist_logits, _ = model.forward_train(x)
    assert torch.allclose(model(x), (logits + dist_logits) / 2, atol=1e-6)


def test_token_counts_follow_resolution_and_keep_ratio():
    assert timm.create_model("sit_ti", img_size=96).stage_tokens == [36, 18, 9, 4]
    assert timm.create_model("sit_ti", img_size=SMALL, keep_ratio=0.25).stage_tokens == [16, 4, 1, 1]


def test_tsm_is_a_convex_combination_of_tokens():
    tsm = TokenSlimming(dim=8, num_out=3)
    token = torch.randn(1, 1, 8)
    assert torch.allclose(tsm(token.expand(2, 5, 8)), token.expand(2, 3, 8), atol=1e-6)
    x = torch.randn(2, 5, 8)
    out = tsm(x)
    assert out.shape == (2, 3, 8)
    assert (out <= x.max(1, keepdim=True).values + 1e-6).all() and (out >= x.min(1, keepdim=True).values - 1e-6).all()


@pytest.mark.parametrize("slimming, layout, tokens", [
    ("avgpool", "grid", [16, 4, 1, 1]), ("conv", "grid", [16, 4, 1, 1]),
    ("avgpool", "sequence", [16, 8, 4, 2]), ("conv", "sequence", [16, 8, 4, 2]),
    ("token_mlp", "grid", [16, 8, 4, 2]), ("tsm", "grid", [16, 8, 4, 2])])
def test_table7_slimmings(slimming, layout, tokens):
    model = timm.create_model("sit_ti", img_size=SMALL, num_classes=10, slimming=slimming, strided_layout=layout)
    assert model.stage_tokens == tokens
    x = torch.randn(1, 3, SMALL, SMALL)
    assert all(t.shape == (1, 16, 320) for t in model.train().forward_train(x).block_tokens)
    assert model.eval()(x).shape == (1, 10)


@pytest.mark.parametrize("name", ["sit_ti", "sit_ti_dist"])
def test_deploy_removes_rtsm_and_keeps_eval_outputs(name):
    model = timm.create_model(name, img_size=SMALL, num_classes=10).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    before = model(x)
    extra = training_only_params(model)
    params = sum(p.numel() for p in model.parameters())
    assert extra > 0
    deploy(model)
    assert model.rtsm is None and training_only_params(model) == 0
    assert not any("rtsm" in n for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == params - extra
    assert torch.equal(model(x), before)


def test_pretrained_needs_a_local_checkpoint():
    for name in ("sit_ti", "lvvit_s"):
        with pytest.raises(ValueError, match="checkpoint_path"):
            timm.create_model(name, pretrained=True)


def to_official_keys(state_dict):
    """Our names -> Sense-X/SiT's (patch_embed.conv1/bn1, tsm.k.weight.{0,1,3}, rtsm.i.mlp1/mlp2)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[:2] == ["patch_embed", "convs"]:
            parts = ["patch_embed", f"{parts[3]}{int(parts[2]) + 1}"] + parts[4:]
        elif parts[0] == "tsm" and parts[2] in ("norm", "fc1", "fc2"):
            parts[2:3] = ["weight", {"norm": "0", "fc1": "1", "fc2": "3"}[parts[2]]]
        elif parts[0] == "rtsm" and parts[2] in ("token_mlp", "channel_mlp"):
            parts[2] = {"token_mlp": "mlp1", "channel_mlp": "mlp2"}[parts[2]]
        out[".".join(parts)] = value
    return out


@pytest.mark.parametrize("name, source", [("sit_ti", "sit_ti"), ("sit_ti", "lvvit_ti"),
                                          ("lvvit_s_tl", "lvvit_s_tl")])
def test_official_checkpoints_load(tmp_path, name, source):
    official = timm.create_model(source, img_size=SMALL, num_classes=10).eval()
    path = tmp_path / "official.pth"
    torch.save({"model": to_official_keys(official.state_dict())}, path)
    x = torch.randn(1, 3, SMALL, SMALL)
    if name == source:  # the model function and timm.create_model both load through the family's layout
        model = timm.models.model_entrypoint(name)(img_size=SMALL, num_classes=10, checkpoint_path=str(path)).eval()
        assert torch.equal(model(x), official(x))
        model = timm.create_model(name, img_size=SMALL, num_classes=10, checkpoint_path=str(path)).eval()
        assert torch.equal(model(x), official(x))
    else:  # a teacher file is not a student: refused, unless the student-only modules may stay fresh
        from riformer.checkpoints import CheckpointError, load_checkpoint
        from riformer.sit import STUDENT_ONLY

        with pytest.raises(CheckpointError, match="missing"):
            timm.create_model(name, img_size=SMALL, num_classes=10, checkpoint_path=str(path))
        model = timm.create_model(name, img_size=SMALL, num_classes=10)
        load_checkpoint(model, path, allow_missing=STUDENT_ONLY)
        assert torch.equal(model.blocks[0].attn.qkv.weight, official.blocks[0].attn.qkv.weight)


# Printed sizes: SiT Table 2a / Table 3 (SiT students, ‡ rows, LV-ViT-S/M/L) and the teacher table
# of the Sense-X/SiT README. Inference form: aux token-labeling head counted, RTSM not.
PRINTED_PARAMS = {
    "sit_ti": "15.9", "sit_xs": "25.6", "sit_s": "25.6", "sit_m": "55.6", "sit_l": "148.2",
    "sit_ti_dist": "16.2", "sit_xs_dist": "26.0", "sit_s_dist": "26.0", "sit_m_dist": "56.2",
    "lvvit_s_tl": "26.2", "lvvit_m_tl": "55.8", "lvvit_l_tl": "150.1",
    "lvvit_ti": "15.7", "lvvit_s": "25.4", "lvvit_m": "55.2", "lvvit_l": "147",
}


@pytest.mark.parametrize("name", sorted(PRINTED_PARAMS))
def test_params_match_printed(name):
    printed = PRINTED_PARAMS[name]
    model = build_meta(name)
    if isinstance(model, SiT):
        model.switch_to_deploy()
    decimals = len(printed.partition(".")[2])
    assert f"{param_millions(model):.{decimals}f}" == printed


def macs_with_attention(model, img_size):
    """fvcore MACs (SDPA uncounted) plus 2*N^2*C per block for q@k^T and attn@v."""
    flops = FlopCountAnalysis(model, torch.randn(1, 3, img_size, img_size))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    if isinstance(model, SiT):
        tokens = [n + model.num_prefix_tokens for d, n in zip(model.stage_depths, model.stage_tokens) for _ in range(d)]
    else:
        tokens = [model.num_patches + 1] * len(model.blocks)
    return (flops.total() + sum(2 * n * n * model.embed_dim for n in tokens)) / 1e9


def test_table7_macs_match_printed():
    """SiT Table 7 (SiT-Ti at 224): baseline 3.5, TSM 1.0, Token-Mixer 1.1 GFLOPs (= MACs)."""
    for name, kwargs, printed in [("lvvit_ti", {}, "3.5"), ("sit_ti", {}, "1.0"),
                                  ("sit_ti", {"slimming": "token_mlp"}, "1.1"),
                                  ("sit_ti", {"slimming": "avgpool", "strided_layout": "sequence"}, "1.0"),
                                  ("sit_ti", {"slimming": "conv", "strided_layout": "sequence"}, "1.0")]:
        model = deploy(timm.create_model(name, **kwargs).eval())
        assert f"{macs_with_attention(model, 224):.1f}" == printed, (name, kwargs)
