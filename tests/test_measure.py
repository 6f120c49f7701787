"""The measurement module: counting conventions against hand counts, protocols, the timer."""
import re

import pytest
import torch

from reproduce import measure
from reproduce.registry import load_protocol


def test_attention_convention_adds_exactly_the_two_attention_matmuls():
    # DeiT-S: 12 blocks, 6 heads of 64, 197 tokens: QK^T and AV are 2 * 6 * 197^2 * 64 MACs a block.
    model = measure.build_model("deit_small_patch16_224", for_counting=True)
    without = measure.count_macs(model, 224, "fvcore")
    with_attn = measure.count_macs(model, 224, "fvcore+attn")
    assert with_attn - without == pytest.approx(12 * 2 * 6 * 197**2 * 64 / 1e9, rel=1e-9)


def test_swin_attention_is_a_convention_not_an_implementation_detail():
    # timm's Swin uses explicit matmuls by default (fvcore would count them); built for counting,
    # its window attention goes through SDPA and only "+attn" counts it.
    plain = measure.count_macs(measure.build_model("swin_tiny_patch4_window7_224"), 224, "fvcore")
    counted = measure.build_model("swin_tiny_patch4_window7_224", for_counting=True)
    assert measure.count_macs(counted, 224, "fvcore") < plain
    assert measure.count_macs(counted, 224, "fvcore+attn") == pytest.approx(plain, rel=1e-3)


def test_unknown_convention_and_model_are_named():
    model = measure.build_model("poolformer_v1_s9")
    with pytest.raises(measure.MeasureError, match=re.escape("unknown MACs convention 'fvcore+magic'")):
        measure.count_macs(model, 32, "fvcore+magic")
    with pytest.raises(measure.ModelNotImplemented, match="no_such_model"):
        measure.build_model("no_such_model")


def test_protocols_scale_down_on_cpu_and_keep_the_paper_on_cuda():
    riformer = load_protocol("riformer")
    gpu = measure.Protocol.for_device(riformer, "cuda", 384)
    assert (gpu.batch_size, gpu.runs, gpu.repeats) == (1024, 30, 3)
    cpu = measure.Protocol.for_device(riformer, "cpu", 224)
    assert cpu.batch_size < 64 and "batch" in cpu.describe()
    sit = measure.Protocol.for_device(load_protocol("sit"), "cuda", 224)
    assert sit.seconds and sit.amp and sit.dtype == "float16"


def test_timer_counts_images_per_second_in_both_loops():
    model = measure.build_model("poolformer_v1_s9")
    for seconds in (False, True):
        protocol = measure.Protocol(batch_size=2, runs=1, repeats=2, warmup=0, seconds=seconds)
        result = measure.measure_throughput(model, 32, protocol, "cpu")
        assert result["img_per_s"] > 0 and len(result["samples"]) == 2 and result["batch_size"] == 2


def test_device_tag_and_environment_describe_this_machine():
    assert measure.device_tag("cpu").startswith("cpu-") and measure.device_tag("cpu").endswith("c")
    env = measure.environment("cpu")
    assert {"device", "torch", "timm", "threads"} <= set(env)
    with pytest.raises(measure.MeasureError, match="unknown device"):
        measure.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(measure.MeasureError, match="no CUDA device"):
            measure.resolve_device("cuda")


def test_same_device_matches_model_tokens():
    assert measure.same_device("NVIDIA A100 80GB", "NVIDIA A100-SXM4-80GB")
    assert not measure.same_device("NVIDIA A100 80GB", "NVIDIA H100 80GB HBM3")
    assert not measure.same_device("NVIDIA RTX A6000", "AMD EPYC")
