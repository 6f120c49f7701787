"""Latency breakdowns (reproduce/figures.py): the ablated models are what the figures say they are,
and `reproduce figure ...` writes a CSV and a PNG. Small inputs (32 px), one thread."""
import pandas as pd
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import riformer  # noqa: F401  (before timm: torchvision shim)
import timm
from reproduce import figures, measure
from riformer.metaformer import MetaFormerBlock, Mlp, Pooling

IMG = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit_steps():
    torch.manual_seed(0)
    return figures.vit_breakdown_variants(img_size=IMG)


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, IMG, IMG)


def _block_parts(model) -> set[str]:
    """Names of the block sub-modules that still hold parameters ('attn', 'mlp', 'norm1', ...)."""
    return {name.split(".")[2] for name, _ in model.named_parameters() if name.startswith("blocks.")}


def test_vit_steps_add_one_part_at_a_time(vit_steps):
    assert list(vit_steps) == [step for step, _ in figures.VIT_STEPS]
    names = {n for n, _ in vit_steps["embedding"].named_parameters()}
    assert names == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert _block_parts(vit_steps["layernorm"]) == {"norm1", "norm2"}
    assert _block_parts(vit_steps["attention"]) == {"norm1", "norm2", "attn"}
    assert _block_parts(vit_steps["channel_mlp"]) == {"norm1", "norm2", "attn", "mlp"}
    assert len(vit_steps["channel_mlp"].blocks) == 12


@torch.inference_mode()
def test_full_step_is_vit_base_forward_features(vit_steps, image):
    full = vit_steps["channel_mlp"]
    vit_base = timm.create_model("vit_base_patch16_224", img_size=IMG).eval()
    missing, unexpected = vit_base.load_state_dict(full.state_dict(), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    torch.testing.assert_close(full(image), vit_base.forward_features(image), rtol=0, atol=0)


@torch.inference_mode()
def test_partial_steps_compute_what_they_keep(vit_steps, image):
    full = vit_steps["channel_mlp"]
    tokens = full._pos_embed(full.patch_embed(image))
    torch.testing.assert_close(vit_steps["embedding"](image), tokens, rtol=0, atol=0)
    x = tokens
    for block in full.blocks:  # attention step: residual attention, the FFN's residual adds LN(x)
        x = x + block.attn(block.norm1(x))
        x = x + block.norm2(x)
    torch.testing.assert_close(vit_steps["attention"](image), full.norm(x), rtol=1e-5, atol=1e-5)


def test_component_ablations_remove_exactly_their_part():
    variants = figures.component_variants("poolformer_v1_s12", img_size=IMG)
    full = variants["full"]

    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    assert count(full, Pooling) == count(full, MetaFormerBlock) == 12
    assert count(variants["no_token_mixer"], Pooling) == 0 and count(variants["no_token_mixer"], Mlp) == 12
    assert count(variants["no_ffn"], Mlp) == 0 and count(variants["no_ffn"], Pooling) == 12
    assert count(variants["no_blocks"], MetaFormerBlock) == 0
    assert count(full, Pooling) == 12, "ablating must not touch the original"
    with torch.inference_mode():
        x = torch.randn(1, 3, IMG, IMG)
        assert all(v(x).shape == (1, 1000) for v in variants.values())


def test_every_figure_model_has_known_blocks():
    for name in figures.REPAFORMER_3_MODELS:
        with torch.device("meta"):  # structure only: no memory, no init cost
            model = measure.build_model(name)
        assert figures._blocks(model), name
    with pytest.raises(measure.MeasureError, match="no block"):
        figures.ablate(nn.Sequential(nn.Conv2d(3, 8, 3)), "ffn")


def _run_figure(tmp_path, *args):
    result = CliRunner().invoke(figures.figure_command, [*args, "--device", "cpu", "--img-size", str(IMG),
                                                        "--batch-size", "1", "--runs", "1", "--repeats", "1",
                                                        "--warmup", "0", "--results-dir", str(tmp_path),
                                                        "--quiet"])
    assert result.exit_code == 0, result.output
    csv_path, png_path = figures.figure_paths(args[0], "cpu", tmp_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return pd.read_csv(csv_path, dtype={"reported_added_ms": str, "reported_added_share_pct": str,
                                        "reported_share_pct": str}, keep_default_na=False)


def test_riformer_1_writes_csv_and_png(tmp_path):
    frame = _run_figure(tmp_path, "riformer-1")
    assert list(frame["step"]) == ["embedding", "layernorm", "attention", "channel_mlp"]
    attention = frame.set_index("step").loc["attention"]
    assert (attention["reported_added_ms"], attention["reported_added_share_pct"]) == ("1433.6", "46.3")
    assert frame["added_ms"].sum() == pytest.approx(frame["latency_ms"].iloc[-1], abs=0.01)
    assert (frame["latency_ms"] > 0).all()
    assert frame["device"].iloc[0] == measure.device_name("cpu")
    assert "batch 1, 1 passes × 1 repeats" in frame["protocol"].iloc[0]


def test_repaformer_3_writes_csv_and_png(tmp_path):
    frame = _run_figure(tmp_path, "repaformer-3", "--models", "deit_tiny_patch16_224,poolformer_v1_s12")
    assert list(dict.fromkeys(frame["model"])) == ["deit_tiny_patch16_224", "poolformer_v1_s12"]
    for _, rows in frame.groupby("model"):
        shares = rows.set_index("component")["share_pct"]
        assert list(shares.index) == ["total", *figures.COMPONENTS]
        assert shares["total"] == 100
        assert shares[list(figures.COMPONENTS)].sum() == pytest.approx(100, abs=0.01)
    assert set(frame["batch_size"]) == {1}


def test_unknown_model_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(figures.figure_command, ["repaformer-3", "--models", "no_such_model",
                                                         "--results-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 2 and "no_such_model" in result.output


# ---------------------------------------------------------------------------------------------
# Speed-accuracy figures defined as data (recipes/figures/*.yaml)


def _figure_yaml(tmp_path, monkeypatch, text: str) -> str:
    folder = tmp_path / "figures"
    folder.mkdir(exist_ok=True)
    (folder / "toy.yaml").write_text(text)
    monkeypatch.setattr(figures, "FIGURES_DIR", folder)
    return "toy"


TOY = """
id: toy
title: toy speed-accuracy
table: sit-3
x: {column: throughput, label: throughput, scale: log}
y: {column: top1, label: top-1}
lines: true
panels:
  - series:
      - {label: DeiT, color: "#3d6fa8", rows: [deit_t]}
      - {label: LeViT, color: "#d9534f", rows: [levit_256]}
"""


def test_the_papers_figures_load_against_their_tables():
    for figure_id in ("repaformer-2", "sit-6"):
        figure = figures.load_figure(figure_id)
        rows = [r for panel in figure["panels"] for s in panel["series"] for r in s["rows"]]
        assert rows and all(r in figure["spec"].rows for r in rows)


@pytest.mark.parametrize("bad, message", [
    ("rows: [deit_t]", "names rows ['deit_tx']"),
    ("column: throughput", "x.column 'speed' is not a column of sit-3"),
])
def test_a_wrong_figure_definition_names_the_field(bad, message, tmp_path, monkeypatch):
    text = TOY.replace("rows: [deit_t]", "rows: [deit_tx]") if "rows" in bad else TOY.replace(
        "x: {column: throughput", "x: {column: speed")
    figure_id = _figure_yaml(tmp_path, monkeypatch, text)
    with pytest.raises(figures.RegistryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        figures.load_figure(figure_id)


def test_points_say_whether_accuracy_was_measured_or_reported(tmp_path, monkeypatch):
    """A full-scale result for LeViT-256 makes its point measured (filled); DeiT-T stays the paper's."""
    from reproduce import runner

    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    from helpers import write_accepted_result

    write_accepted_result(tmp_path / "runs", "sit-3", "levit_256", 79.5)
    figure = figures.load_figure(_figure_yaml(tmp_path, monkeypatch, TOY))
    frame = figures.speed_accuracy(figure, "cpu", runner.MeasurementCache(tmp_path / "cache"),
                                   runs=1, repeats=2, warmup=0)
    points = frame.set_index("row")
    assert points.loc["levit_256", "accuracy"] == 79.5 and points.loc["levit_256", "accuracy_source"] == "measured"
    assert points.loc["deit_t", "accuracy"] == 74.5 and points.loc["deit_t", "accuracy_source"] == "reported"
    for row in ("deit_t", "levit_256"):
        assert points.loc[row, "throughput_source"] == "measured"
        assert points.loc[row, "throughput_min"] <= points.loc[row, "throughput"] <= points.loc[row, "throughput_max"]
    assert "repeats" in points.loc["deit_t", "protocol"] and points.loc["deit_t", "device"]
    csv_path, png_path = figures.write_figure("toy", frame, figures.plot_speed_accuracy(frame, figure), "cpu", tmp_path)
    assert png_path.read_bytes()[:4] == b"\x89PNG" and pd.read_csv(csv_path)["accuracy_source"].tolist() == \
        frame["accuracy_source"].tolist()
