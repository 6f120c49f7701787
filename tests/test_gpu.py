"""The throughput harness on a CUDA device: synchronised timing, autocast, out-of-memory halving."""
import pytest
import torch

from reproduce import measure
from reproduce.registry import load_protocol

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_paper_protocol_runs_on_cuda_with_autocast():
    protocol = measure.Protocol.for_device(load_protocol("sit"), "cuda", 224)
    quick = measure.Protocol(batch_size=64, runs=1, repeats=2, warmup=1, dtype=protocol.dtype, amp=protocol.amp,
                             seconds=protocol.seconds)
    result = measure.measure_throughput(measure.build_model("sit_ti", form="deploy"), 224, quick, "cuda")
    assert result["img_per_s"] > 0 and "cuda" in measure.environment("cuda")


def test_a_batch_that_does_not_fit_is_halved_and_recorded():
    free, _ = torch.cuda.mem_get_info()
    batch = 1 << ((free // (3 * 224 * 224 * 4)).bit_length() + 1)  # the input alone exceeds free memory
    protocol = measure.Protocol(batch_size=batch, runs=1, repeats=1, warmup=1)
    result = measure.measure_throughput(measure.build_model("poolformer_v1_s12"), 224, protocol, "cuda")
    assert result["batch_size"] < batch and any("out of memory" in n for n in result["notes"])
