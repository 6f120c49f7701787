"""Every registered model honours timm's model contract (docs/timm.md).

What a timm user does with a model, for every name `import riformer` registers (60): its cfg is
registered and complete; it is listed under its own module; at its native size (on the meta device:
shapes only) forward, `num_classes=0`, `reset_classifier(0, '')`, `global_pool`, `forward_features`
against the cfg's `pool_size`, and `features_only` against `feature_info`; at a small input (64 px,
the model built for it where it is built for one size) the same in real numbers, plus
`forward == forward_head(forward_features)`, backward, `torch.fx` tracing (timm's leaf modules and
functions) and, where a deploy form exists, features of the train and the deploy form equal in float64.

Plain `make test` runs the registry and cfg checks on every model and every check on one model per
family (`REPRESENTATIVES`, ViG aside); `--runslow` runs every check on every model, and at the native
size in real numbers for the models built for one size.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import riformer
import timm
from timm.layers import create_feature_extractor, get_graph_node_names
from timm.models import _registry

from helpers import one_thread  # noqa: F401  (autouse fixture)

MODELS = sorted(name for name, fn in _registry._model_entrypoints.items() if fn.__module__.startswith("riformer."))
FAMILIES = {"riformer.metaformer": 12, "riformer.metaformer_v2": 5, "riformer.pvt": 3, "riformer.gfnet": 4,
            "riformer.vig": 2, "riformer.mlp": 3, "riformer.lvvit": 7, "riformer.sit": 10, "riformer.repa": 15}
# One model per family (and per backbone kind of the RePa family) for plain `make test`.
# ViG's only model (92M parameters, a graph rebuilt in every block) is checked under --runslow only.
REPRESENTATIVES = ["riformer_s12", "affineformer_s12", "pvt_v1_small", "gfnet_h_ti", "swin_mixer_tiny_d6",
                   "lvvit_s_tl", "sit_ti_dist", "repa_deit_tiny"]
SMALL = 64
SMALL_SIZE = {"swin_mixer_base_d24": 224}  # window 7 needs every stage's map a multiple of 7 (or at most 7)
# Parameters that require grad but take no part in the plain forward: LV-ViT's token-labeling head (used by
# the training losses, or in eval only) and SiT's RTSM (used by forward_train). Training semantics: issue 10.
NO_GRAD_IN_FORWARD = {"lvvit": ("aux_head.",), "sit": ("rtsm.",), "repa_lvvit": ("aux_head.",)}


def each(names, slow_unless=()):
    """`names` as parameters, each marked slow unless it is in `slow_unless`."""
    return [pytest.param(n, marks=() if n in slow_unless else pytest.mark.slow) for n in names]


def cfg_of(name):
    return timm.models.get_pretrained_cfg(name).to_dict()


def small_build(name):
    """(kwargs, size): the model at a small input, built for it where it is built for one size."""
    size = SMALL_SIZE.get(name, SMALL)
    return ({"img_size": size} if cfg_of(name)["fixed_input_size"] and size != cfg_of(name)["input_size"][-1]
            else {}), size


_BUILT = {}
# tests/conftest.py runs this module's tests model by model (GROUP_BY_PARAM), so one build is shared by
# the consecutive checks that ask for it, and only the last build is kept: every model's builds, kept,
# would need ~40 GB (the slow suite grew past 15 GB and could not finish on a 24 GB machine).
GROUP_BY_PARAM = "name"


def build(name, **kwargs):
    """A fresh copy of `name` built with `kwargs`, built once for the checks in a row that ask for it
    (building is the slow part)."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT.clear()
        torch.manual_seed(0)
        _BUILT[key] = timm.create_model(name, **kwargs)
    return copy.deepcopy(_BUILT[key])


def output_fmt(model, features):
    """'NCHW', 'NHWC' (the model says so) or 'NLC' (tokens) for a tensor the model computed."""
    return "NLC" if features.ndim == 3 else str(getattr(model, "output_fmt", "NCHW")).split(".")[-1]


def spatial(tensor, fmt):
    return tuple(tensor.shape[2:]) if fmt == "NCHW" else tuple(tensor.shape[1:3])


def channels(tensor, fmt):
    return tensor.shape[1] if fmt == "NCHW" else tensor.shape[-1]


def missing_grad_prefixes(name):
    for prefix, missing in NO_GRAD_IN_FORWARD.items():
        if name.startswith(prefix):
            return missing
    return ()


# -- registry and cfgs (every model, no build) ----------------------------------------------------

def test_every_model_is_listed_under_its_own_module():
    listed = {module: timm.list_models(module=module) for module in FAMILIES}
    assert {module: len(names) for module, names in listed.items()} == FAMILIES
    assert sorted(n for names in listed.values() for n in names) == MODELS
    for timm_module in ("metaformer", "mlp_mixer", "vision_transformer", "pvt_v2", "deit"):
        assert not set(timm.list_models(module=timm_module)) & set(MODELS), timm_module
    assert "poolformer_s12" in timm.list_models(module="metaformer")  # timm's own are still there


@pytest.mark.parametrize("name", MODELS)
def test_registered_cfg_is_complete(name):
    cfg = cfg_of(name)
    assert cfg["architecture"] == name
    assert not (cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("file")), "no weights can be downloaded here"
    assert len(cfg["input_size"]) == 3 and cfg["input_size"][0] == 3
    assert isinstance(cfg["fixed_input_size"], bool)
    assert cfg["interpolation"] in ("bicubic", "bilinear") and 0 < cfg["crop_pct"] <= 1
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["first_conv"] and cfg["classifier"] and cfg["num_classes"] in (0, 1000)
    assert name in timm.list_models(name, name_matches_cfg=True)


# -- shapes at the native size (meta device: no memory, no arithmetic) -----------------------------

@pytest.mark.parametrize("name", each(MODELS, slow_unless=REPRESENTATIVES))
def test_shapes_at_native_size_follow_cfg_global_pool_and_feature_info(name):
    cfg = cfg_of(name)
    batch, size = 2, cfg["input_size"]
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        x = torch.empty(batch, *size)
        assert model.pretrained_cfg == cfg
        state = model.state_dict()
        assert f"{cfg['first_conv']}.weight" in state
        if cfg["num_classes"]:
            assert f"{cfg['classifier']}.weight" in state
        assert model(x).shape == (batch, cfg["num_classes"] or model.num_features)

        features = model.forward_features(x)
        fmt = output_fmt(model, features)
        if fmt == "NLC":  # tokens: no map to pool to
            assert cfg["pool_size"] is None and features.shape[-1] == model.num_features
        else:
            assert spatial(features, fmt) == tuple(cfg["pool_size"])
            assert channels(features, fmt) == model.num_features
        assert model.forward_head(features, pre_logits=True).shape == (batch, model.head_hidden_size)

        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == (batch, model.head_hidden_size)
        for unpooled in (timm.create_model(name, num_classes=0, global_pool="").eval(), model):
            if unpooled is model:
                model.reset_classifier(0, "")
            out = unpooled(x)
            assert out.ndim == features.ndim
            if fmt == "NLC":
                assert out.shape[1] == features.shape[1]
            else:
                assert spatial(out, fmt) == tuple(cfg["pool_size"])

        for pool in getattr(model, "global_pools", ("avg", "")):  # our classes say; timm's take at least these
            model.reset_classifier(0, pool)
            assert (model(x).ndim == 2) == bool(pool), pool
        if hasattr(model, "global_pools"):
            with pytest.raises(ValueError, match="global_pool must be one of"):
                model.reset_classifier(0, "nonsense")

        extractor = timm.create_model(name, features_only=True)
        check_features(extractor, extractor(x), size[-2:], batch)


def check_features(extractor, outputs, size, batch):
    """The extractor's outputs have the channels, reductions (or token counts) its feature_info gives."""
    info = extractor.feature_info
    fmt = str(extractor.output_fmt).split(".")[-1]
    assert len(outputs) == len(info.channels()) >= 1
    for out, chans, reduction, details in zip(outputs, info.channels(), info.reduction(), info.get_dicts()):
        assert out.shape[0] == batch and channels(out, fmt) == chans
        if fmt == "NLC":
            assert out.shape[1] == details["num_tokens"]
        else:
            assert spatial(out, fmt) == tuple(math.ceil(s / reduction) for s in size)


# -- real numbers at a small input -----------------------------------------------------------------

@pytest.mark.parametrize("name", each(MODELS, slow_unless=REPRESENTATIVES))
def test_forward_is_head_of_features_and_backward_reaches_every_parameter(name):
    kwargs, size = small_build(name)
    model = build(name, num_classes=7, **kwargs)
    x = torch.randn(2, 3, size, size)
    for training in (False, True):
        model.train(training)
        torch.manual_seed(1)
        out = model(x)
        torch.manual_seed(1)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 7) and torch.isfinite(out).all()
        assert torch.equal(out, model.forward_head(model.forward_features(x))), f"training={training}"
    out.mean().backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert {n for n in no_grad if not n.startswith(missing_grad_prefixes(name))} == set()
    expected = missing_grad_prefixes(name)
    assert all(any(n.startswith(prefix) for n in no_grad) for prefix in expected), (name, sorted(no_grad)[:3])


@pytest.mark.parametrize("name", each(MODELS, slow_unless=REPRESENTATIVES))
def test_grad_checkpointing_keeps_every_gradient_and_keeps_fewer_activations(name):
    """timm's `set_grad_checkpointing()`: the same gradients, fewer tensors saved for backward."""
    kwargs, size = small_build(name)
    model = build(name, num_classes=7, **kwargs).train()
    x = torch.randn(2, 3, size, size)

    def step(enable):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        saved = []
        torch.manual_seed(1)  # drop path / dropout: checkpoint replays the RNG state
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(x)
        out.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    plain, saved_plain = step(False)
    checkpointed, saved_checkpointed = step(True)
    assert plain.keys() == checkpointed.keys() and plain
    for key, grad in plain.items():
        assert torch.allclose(grad, checkpointed[key], rtol=1e-5, atol=1e-7), key
    assert saved_checkpointed < 0.7 * saved_plain, (saved_checkpointed, saved_plain)


def fx_model(model):
    """The model traced by torch.fx with timm's leaf modules and functions (what timm's fx feature
    extraction does), returning the model's output in train and in eval mode."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, return_nodes={"train": [train_nodes[-1]], "eval": [eval_nodes[-1]]})


def create_feature_extractor(model, return_nodes):  # noqa: F811  (timm's, with train and eval nodes apart)
    from torchvision.models.feature_extraction import create_feature_extractor as torchvision_extractor
    from timm.layers import get_notrace_functions, get_notrace_modules

    return torchvision_extractor(model, train_return_nodes=return_nodes["train"],
                                 eval_return_nodes=return_nodes["eval"],
                                 tracer_kwargs={"leaf_modules": get_notrace_modules(),
                                                "autowrap_functions": get_notrace_functions()})


@pytest.mark.parametrize("name", each(MODELS, slow_unless=REPRESENTATIVES))
def test_fx_traced_model_computes_the_model(name):
    kwargs, size = small_build(name)
    model = build(name, num_classes=7, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    traced = fx_model(model)
    with torch.no_grad():
        assert torch.equal(next(iter(traced(x).values())), model(x))
    traced.train()  # the train-mode graph (drop paths draw in their own order: compare shapes only)
    out = next(iter(traced(x).values()))
    out.mean().backward()
    assert out.shape == (2, 7) and any(p.grad is not None for p in traced.parameters())


@pytest.mark.parametrize("name", each(MODELS, slow_unless=REPRESENTATIVES))
def test_features_only_is_forward_intermediates(name):
    kwargs, size = small_build(name)
    model = build(name, **kwargs).eval()
    torch.manual_seed(0)  # as `build`: the same weights
    extractor = timm.create_model(name, features_only=True, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        outputs = extractor(x)
        check_features(extractor, outputs, (size, size), 2)
        if hasattr(model, "forward_intermediates") and hasattr(extractor, "model"):  # FeatureGetterNet
            fmt = str(extractor.output_fmt).split(".")[-1]
            final, reference = model.forward_intermediates(x, indices=extractor.feature_info.out_indices,
                                                           output_fmt=fmt)
            assert torch.equal(final, model.forward_features(x))
            assert all(torch.equal(a, b) for a, b in zip(outputs, reference))


DEPLOYABLE = [name for name in MODELS if name.startswith(("riformer_", "affineformer", "repa_", "sit_"))]


@torch.no_grad()
def randomize(model, seed=0):
    """Every parameter and BatchNorm statistic away from its init (a fold that ignores one shows)."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.02)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


@pytest.mark.slow  # builds every model
def test_deployable_models_are_the_ones_with_a_deploy_form():
    with torch.device("meta"):
        assert [n for n in MODELS if riformer.has_deploy_form(timm.create_model(n))] == DEPLOYABLE


@pytest.mark.parametrize("name", each(DEPLOYABLE, slow_unless=REPRESENTATIVES))
def test_features_of_train_and_deploy_form_are_equal(name):
    kwargs, size = small_build(name)
    train_form = randomize(timm.create_model(name, features_only=True, **kwargs)).double().eval()
    deploy_form = riformer.deploy(copy.deepcopy(train_form))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        before, after = train_form(x), deploy_form(x)
        check_features(deploy_form, after, (size, size), 2)
        for a, b in zip(before, after):
            assert ((a - b).abs().max() / a.abs().max()).item() < 1e-9
        del train_form, deploy_form, before, after  # float64 copies: ViT-H's are 5 GB each
        deployed = riformer.deploy(build(name, **kwargs).eval())  # and the deploy form traces
        assert torch.equal(next(iter(fx_model(deployed)(x.float()).values())), deployed(x.float()))


# -- real numbers at the native size of the models built for one -----------------------------------

FIXED_SIZE = [name for name in MODELS if cfg_of(name)["fixed_input_size"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXED_SIZE)
def test_native_size_forward_fx_and_features(name):
    size = cfg_of(name)["input_size"][-1]
    model = build(name).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all() and torch.equal(out, model.forward_head(model.forward_features(x)))
        assert torch.equal(next(iter(fx_model(model)(x).values())), out)
        extractor = timm.create_model(name, features_only=True).eval()
        check_features(extractor, extractor(x), (size, size), 1)


def test_checks_run_model_by_model(request):
    """tests/conftest.py groups this module's tests by model, so `build` holds one model at a time."""
    names = [item.callspec.params["name"] for item in request.session.items
             if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params]
    runs = [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]
    assert len(runs) == len(set(runs)), "a model's checks are split apart: each would build it again"
