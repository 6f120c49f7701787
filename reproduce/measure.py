"""The one measurement module: build a model, count its params and MACs, time its throughput.

MACs are fvcore "flops" (fvcore counts one multiply-add as one flop). Which operations count is a
*convention*, declared per table row; `CONVENTIONS` lists them and docs/counting.md explains why
each exists. Throughput follows a paper's protocol (recipes/protocols/*.yaml), scaled down on CPU,
and every result carries the metadata needed to read it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import riformer  # noqa: F401  (registers the suite's models; installs the torchvision shim first)
import timm
from riformer.deploy import deploy, has_deploy_form

# name -> what it counts, on top of fvcore's defaults (convs, linears, matmul/bmm/einsum, norms).
CONVENTIONS = {
    "fvcore": "fvcore as is: attention computed by scaled_dot_product_attention, pooling, "
              "activations, softmax and FFT count zero",
    "fvcore+attn": "fvcore plus the two matmuls of scaled_dot_product_attention (QK^T and AV)",
    "fvcore+fft": "fvcore plus FFTs and the global filter's complex multiply (GFNet)",
    "fvcore+attn+fft": "fvcore plus attention matmuls and FFTs",
}


# train: as built; deploy: riformer.deploy folds the training-time structure (the papers' inference
# models); deploy+fold: also folds RIFormer's layer scales and norm2 affine (beyond the paper).
FORMS = ("train", "deploy", "deploy+fold")


class ModelNotImplemented(LookupError):
    """The suite has no implementation of this model (yet)."""


class MeasureError(RuntimeError):
    """A measurement could not be made; the message names the model and what to fix."""


@contextlib.contextmanager
def attention_through_sdpa():
    """Build timm models whose attention all runs through scaled_dot_product_attention.

    Some timm models (Swin) default to explicit matmuls, which fvcore counts, while others use
    SDPA, which it does not. Counting with every model on SDPA makes the attention products an
    explicit choice of the convention ("+attn") instead of an accident of the implementation.
    """
    from timm.layers import config

    previous = config._USE_FUSED_ATTN
    config.set_fused_attn(True, experimental=True)
    try:
        yield
    finally:
        config._USE_FUSED_ATTN = previous


def build_model(name: str, model_kwargs: dict | None = None, form: str = "train",
                for_counting: bool = False, meta: bool = False) -> nn.Module:
    """Create `name` from the timm registry in eval mode, folded into its deploy form if asked.

    `for_counting` routes all attention through SDPA (see `attention_through_sdpa`); timing uses
    each model's own default attention implementation. `meta` builds the full-size structure on
    the meta device (no memory, no initialization): enough to read its architecture or to know
    that it builds, in a fraction of a second even for ViT-H.
    """
    if name is None or name not in timm.list_models():
        raise ModelNotImplemented(f"model not implemented: {name}")
    if form not in FORMS:
        raise MeasureError(f"unknown form '{form}'; choose from {', '.join(FORMS)}")
    with attention_through_sdpa() if for_counting else contextlib.nullcontext(), \
            torch.device("meta") if meta else contextlib.nullcontext():
        model = timm.create_model(name, pretrained=False, **(model_kwargs or {})).eval()
    if form != "train":
        if not has_deploy_form(model):
            raise MeasureError(f"{name} has no deploy form (no module with switch_to_deploy); "
                               "use form: train for it")
        deploy(model)
    if form == "deploy+fold":
        from riformer.fold_extra import fold_layer_scales

        fold_layer_scales(model)
    return model


def count_params(model: nn.Module) -> float:
    """Parameters in millions (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def _extra_handles(convention: str) -> dict[str, Callable]:
    if convention not in CONVENTIONS:
        raise MeasureError(f"unknown MACs convention '{convention}'; known: {', '.join(CONVENTIONS)}")
    from reproduce import op_counters

    handles = {}
    if "+attn" in convention:
        handles.update(op_counters.ATTENTION_HANDLES)
    if "+fft" in convention:
        handles.update(op_counters.FFT_HANDLES)
    return handles


def count_macs(model: nn.Module, img_size: int, convention: str = "fvcore") -> float:
    """MACs in G for one image at `img_size` under `convention`."""
    from fvcore.nn import FlopCountAnalysis

    handles = _extra_handles(convention)
    x = torch.zeros(1, 3, img_size, img_size)
    with torch.no_grad():
        analysis = FlopCountAnalysis(model.eval(), x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        for op, handle in handles.items():
            analysis.set_op_handle(op, handle)
        return analysis.total() / 1e9


ARCHITECTURE_KEYS = ("embed_dim", "depth", "num_heads")


def architecture(model: nn.Module) -> dict:
    """Width, depth and heads as the papers print them, read off the model's blocks.

    A block is a module with a `norm1` and a channel MLP (`mlp` or `mlp_channels`). Consecutive
    blocks of one width form a stage; several stages print as lists ([96, 192, 384, 768]),
    one stage as numbers; models without attention print heads as "n/a".
    """
    blocks = [m for m in model.modules()
              if hasattr(m, "norm1") and (hasattr(m, "mlp") or hasattr(m, "mlp_channels"))]
    if not blocks:
        raise MeasureError(f"{type(model).__name__}: no blocks with norm1 and an MLP to describe")
    stages: list[list] = []
    for block in blocks:
        norm = block.norm1
        width = getattr(norm, "normalized_shape", None)
        width = width[0] if width else getattr(norm, "num_channels", None) or getattr(norm, "num_features", None)
        ffn = getattr(block, "mlp", None) or getattr(block, "mlp_channels", None)
        width = getattr(ffn, "dim", None) or width  # RePa-Mixer's norm1 is over the tokens (riformer/repa.py)
        heads = getattr(getattr(block, "attn", None), "num_heads", None)
        if stages and stages[-1][0] == width:
            stages[-1][1] += 1
        else:
            stages.append([width, 1, heads])
    one = len(stages) == 1
    widths, depths, heads = zip(*stages)
    return {"embed_dim": widths[0] if one else list(widths),
            "depth": depths[0] if one else list(depths),
            "num_heads": "n/a" if heads[0] is None else heads[0] if one else list(heads)}


def _metaformer_blocks(model: nn.Module) -> list[list]:
    """[width, blocks, token-mixer class names] per stage of a MetaFormer (a block has norm2 and mlp;
    RIFormer's deploy block has no token mixer left)."""
    stages: list[list] = []
    for block in (m for m in model.modules() if hasattr(m, "norm2") and hasattr(m, "mlp")):
        width = getattr(block.norm2, "num_channels", None) or getattr(block.norm2, "normalized_shape", [None])[0]
        mixer = type(block.token_mixer).__name__ if hasattr(block, "token_mixer") else "none"
        if stages and stages[-1][0] == width:
            stages[-1][1] += 1
            stages[-1][2].add(mixer)
        else:
            stages.append([width, 1, {mixer}])
    if not stages:
        raise MeasureError(f"{type(model).__name__}: no MetaFormer blocks (norm2 and mlp) to compare")
    return stages


def removed_from(model: nn.Module, reference: nn.Module) -> str:
    """What `model` removes from the MetaFormer `reference` (RIFormer Table 8's "Type"): depth
    (fewer blocks), width (narrower stages), token_mixer (blocks without one), or none."""
    mine, theirs = _metaformer_blocks(model), _metaformer_blocks(reference)
    removed = []
    if len(mine) != len(theirs) or any(a[1] < b[1] for a, b in zip(mine, theirs)):
        removed.append("depth")
    if any(a[0] < b[0] for a, b in zip(mine, theirs)):
        removed.append("width")
    if all(stage[2] == {"none"} for stage in mine) and any(stage[2] != {"none"} for stage in theirs):
        removed.append("token_mixer")
    return "+".join(removed) or "none"


def input_size(model: nn.Module) -> tuple[int, str]:
    """The input resolution a built model is made for, and where it was read: its patch embedding's
    fixed image size if it has one, else the resolution of its timm config."""
    embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if embed_size:
        return int(embed_size[0] if isinstance(embed_size, (tuple, list)) else embed_size), "its patch embedding"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return int(cfg["input_size"][-1]), "its timm config (input_size)"
    raise MeasureError(f"{type(model).__name__} has neither a fixed-size patch embedding nor a timm config")


def idle_ratio(model: nn.Module) -> float:
    """RePaFormer's idle ratio θ, read off the model's channel-idle FFNs (one value for the model)."""
    from riformer.repa import ChannelIdleFFN

    ratios = {round(m.idle_ratio, 6) for m in model.modules() if isinstance(m, ChannelIdleFFN)}
    if len(ratios) != 1:
        raise MeasureError(f"{type(model).__name__}: idle ratios {sorted(ratios)}; expected one value")
    return ratios.pop()


# ---------------------------------------------------------------------------------------------
# Throughput


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_tag(device: str) -> str:
    """A short, stable folder name for results measured on `device` (e.g. cpu-amd-epyc-2c)."""
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\bprocessor\b", "", device_name(device).lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    if device.startswith("cuda"):
        return f"cuda-{slug}"
    return f"cpu-{slug}-{os.cpu_count()}c"


def same_device(paper_device: str, name: str) -> bool:
    """True if every model token of the paper's device ('A100', '80GB') is in `name`."""
    tokens = [t for t in re.findall(r"[a-z0-9]+", paper_device.lower()) if t not in ("nvidia", "gpu", "rtx", "one")]
    have = set(re.findall(r"[a-z0-9]+", name.lower()))
    return bool(tokens) and all(t in have for t in tokens)


def resolve_device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MeasureError("--device cuda asked for, but torch sees no CUDA device "
                               f"(torch {torch.__version__}); use --device cpu")
        return device
    raise MeasureError(f"unknown device '{device}'; use cpu or cuda[:N]")


def environment(device: str) -> dict:
    """What a throughput number needs beside it to mean anything."""
    env = {"device": device_name(device), "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = _nvidia_driver()
    return env


def _nvidia_driver() -> str | None:
    with contextlib.suppress(OSError):
        return open("/proc/driver/nvidia/version").readline().strip()
    return None


@dataclass(frozen=True)
class Protocol:
    """How to time: a paper's protocol, or its scaled-down CPU form."""
    batch_size: int
    runs: int                 # forward passes timed back to back (or seconds, if `seconds`)
    repeats: int              # independent timings; the median is reported
    warmup: int               # untimed passes first (or seconds, if `seconds`)
    dtype: str = "float32"
    amp: bool = False         # autocast to `dtype` around the forward (weights stay float32)
    seconds: bool = False     # LeViT's time-based loop: each pass timed alone until `runs` s
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None  # intra-op threads while timing (None: torch's default)

    @classmethod
    def for_device(cls, protocol: dict, device: str, img_size: int) -> "Protocol":
        """The paper's protocol on CUDA; its `cpu:` section (small batch, few runs) on CPU."""
        section = dict(protocol)
        if not device.startswith("cuda"):
            section.update(protocol.get("cpu") or {})
        batch = section.get("batch_size", 128)
        by_size = section.get("batch_size_by_img_size") or {}
        batch = by_size.get(img_size, by_size.get(str(img_size), batch))
        units = section.get("units") or {}
        return cls(batch_size=int(batch), runs=int(section.get("runs", 30)),
                   repeats=int(section.get("repeats", 3)), warmup=int(section.get("warmup", 10)),
                   dtype=section.get("dtype", "float32"), amp=bool(section.get("amp", False)),
                   seconds=units.get("runs") == "s", channels_last=bool(section.get("channels_last", False)),
                   compile=bool(section.get("compile", False)), threads=section.get("threads"))

    def describe(self) -> str:
        unit = "s" if self.seconds else " passes"
        precision = f"autocast {self.dtype}" if self.amp else self.dtype
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return (f"batch {self.batch_size}, {self.runs}{unit} × {self.repeats} repeats (median), "
                f"warmup {self.warmup}{unit}, {precision}, channels_last={self.channels_last}, "
                f"compile={self.compile}{threads}")


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Time with `n` threads: on a small shared VM one thread is much steadier than all cores."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Timer:
    """Times one model under a protocol; `sample()` is one repeat (images/s)."""

    def __init__(self, model: nn.Module, img_size: int, protocol: Protocol, device: str):
        self.protocol, self.device = protocol, device
        dtype = getattr(torch, protocol.dtype)
        memory_format = torch.channels_last if protocol.channels_last else torch.contiguous_format
        weights = torch.float32 if protocol.amp else dtype
        self.model = model.eval().to(device=device, dtype=weights, memory_format=memory_format)
        if protocol.compile:
            self.model = torch.compile(self.model)
        self.autocast = (torch.autocast(device.split(":")[0], dtype=dtype) if protocol.amp
                         else contextlib.nullcontext())
        self.batch_size = protocol.batch_size
        self.notes: list[str] = []
        while True:
            try:  # the input alone may not fit: allocate it inside the guard too
                self.x = torch.randn(self.batch_size, 3, img_size, img_size, device=device, dtype=weights)
                self.x = self.x.contiguous(memory_format=memory_format)
                with intra_op_threads(protocol.threads):
                    self._passes(protocol.warmup, by_time=protocol.seconds)
                break
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise MeasureError("out of memory at batch size 1") from None
                self.batch_size //= 2
                self.notes.append(f"out of memory: batch halved to {self.batch_size}")
                self.x = None
                torch.cuda.empty_cache()

    def _pass(self) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), self.autocast:
            self.model(self.x)
        _sync(self.device)
        return time.perf_counter() - start

    def _passes(self, n: int, by_time: bool) -> list[float]:
        """n passes, or passes until n seconds are spent; the time of each."""
        times = []
        while (sum(times) < n) if by_time else (len(times) < n):
            times.append(self._pass())
        return times

    def sample(self) -> float:
        with intra_op_threads(self.protocol.threads):
            if self.protocol.seconds:  # LeViT: batch / mean time of one synchronised pass
                times = self._passes(self.protocol.runs, by_time=True)
                return self.batch_size * len(times) / sum(times)
            start = time.perf_counter()
            with torch.inference_mode(), self.autocast:
                for _ in range(self.protocol.runs):
                    self.model(self.x)
            _sync(self.device)
            return self.batch_size * self.protocol.runs / (time.perf_counter() - start)


def summarize(samples: list[float]) -> dict:
    return {"img_per_s": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def time_interleaved(timers: dict, advance: Callable[[], None] = lambda: None) -> dict:
    """Sample every timer round-robin (a, b, a, b, ...) so that drift in the machine's speed hits
    every model alike, then summarize each: {key: {img_per_s, min, max, samples, batch_size, notes}}."""
    samples = {key: [] for key in timers}
    for _ in range(max((t.protocol.repeats for t in timers.values()), default=0)):
        for key, timer in timers.items():
            samples[key].append(timer.sample())
            advance()
    return {key: {**summarize(samples[key]), "batch_size": timer.batch_size, "notes": timer.notes}
            for key, timer in timers.items()}


def measure_throughput(model: nn.Module, img_size: int, protocol: Protocol, device: str = "cpu") -> dict:
    """Median images/s over `protocol.repeats` timings of `protocol.runs` batches each."""
    return time_interleaved({"model": Timer(model, img_size, protocol, device)})["model"]


def cache_key(**parts) -> str:
    """A stable key for the measurement cache (see runner.MeasurementCache)."""
    return json.dumps(parts, sort_keys=True, default=str)


_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def source_fingerprint() -> str:
    """Hash of the code that defines models and counting: a change invalidates cached numbers."""
    sources = sorted((_ROOT / "riformer").glob("*.py")) + [_ROOT / "reproduce" / "measure.py",
                                                            _ROOT / "reproduce" / "op_counters.py"]
    digest = hashlib.sha1()
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
