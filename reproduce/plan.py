"""`reproduce plan`: what each pending accuracy cell costs to fill, before any GPU time is spent.

Per pending accuracy cell, the path that fills it and an *estimate* of its cost (docs/training.md,
"What a table costs"):

  * released weights (the weights manifest, `released_weights`): one evaluation of 50,000 images,
    forward only: 50,000 x MACs x 2 FLOP;
  * a training recipe (`TableSpec.recipe_of`): epochs x 1,281,167 ImageNet-1k images, each costing
    3 x the student's forward MACs (forward + backward ~ 3 forwards) plus one forward of every teacher
    (distillation, module imitation: forward only), x 2 FLOP per MAC;

over a stated rate: the paper's GPU's peak (dense tensor-core TFLOP/s at the recipe's precision) x
a utilization, both printed and overridable (`--gpu a100 --utilization 0.4 --gpus 8`). GPU-hours
are the sum over GPUs; wall-clock hours divide them by `--gpus`.

And, where measured (`--measure-rates`, cached like every measurement): the training-step images/s
of the recipe's own configuration (student + teachers, recipe batch or the largest that fits, its
AMP dtype) on the current device, a few steps timed after a warm-up, giving device-hours on this
device and the utilization it reached (the calibration of `--utilization`).

Cells whose runs are the same recipe are one run: counted once in every total, and each names the
cells it shares its run with.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

from reproduce import files, measure
from reproduce.registry import DERIVED_KINDS, NOT_REPORTED, PAPERS, RECIPES, RegistryError, load_recipe, load_table
from reproduce.device import resolve
from reproduce.measure import source_fingerprint
from reproduce.runner import RESULTS_DIR, MeasurementCache, TableRun

TRAIN_IMAGES = 1_281_167   # ImageNet-1k train
EVAL_IMAGES = 50_000       # ImageNet-1k validation
FLOP_PER_MAC = 2
TRAIN_STEP_FORWARDS = 3    # forward + backward ~ 3 forward passes of the student

# Dense peak TFLOP/s by precision (vendors' datasheets, no sparsity). "fp32" is the plain FP32 rate.
GPUS = {
    "a100": {"label": "NVIDIA A100 (SXM)", "bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "v100": {"label": "NVIDIA V100 (SXM2)", "fp16": 125, "bf16": None, "tf32": None, "fp32": 15.7},
    "a6000": {"label": "NVIDIA RTX A6000", "bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "h100": {"label": "NVIDIA H100 (SXM)", "bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "h200": {"label": "NVIDIA H200 (SXM)", "bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
}
DEFAULT_GPU, DEFAULT_UTILIZATION, DEFAULT_GPUS = "a100", 0.4, 8


class PlanError(ValueError):
    """A plan cannot be made as asked; the message names the thing to fix."""


def released_weights(spec, row_id: str, column_id: str) -> dict | None:
    """The released checkpoint that fills this cell by evaluation: {"id", "model"} or None (the one
    place the plan asks the weights manifest: reproduce/weights.py)."""
    from reproduce import weights

    release = weights.release_for_cell(spec, row_id, column_id)
    return None if release is None else {"id": release.name, "model": release.model}


def precision_of(recipe: dict) -> str:
    """The peak a recipe's steps run at: its AMP dtype, else TF32 (PyTorch's default for convs)."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(str(recipe.get("amp", "off")), "tf32")


def peak_flops(gpu: str, precision: str) -> float:
    try:
        spec = GPUS[gpu]
    except KeyError:
        raise PlanError(f"unknown GPU '{gpu}'; known: {', '.join(GPUS)}") from None
    tflops = spec.get(precision) or spec["fp32"]  # V100 has no bf16/TF32 tensor cores
    return tflops * 1e12


def gpu_of_device(name: str) -> str | None:
    """Our GPU key for a device name ('NVIDIA H200' -> 'h200'), or None (a CPU, an unknown GPU)."""
    low = name.lower().replace(" ", "")
    return next((key for key in GPUS if key in low), None)


def teachers_of(recipe: dict) -> list[dict]:
    """Every model a training step forwards without gradients: each section's `teacher` that is on
    (`distill.type` not none, `imitation.enabled`, or any other section with `enabled: true`)."""
    found = []
    for section, cfg in recipe.items():
        if not isinstance(cfg, dict) or not isinstance(cfg.get("teacher"), dict):
            continue
        on = cfg.get("type", "none") != "none" if "type" in cfg else bool(cfg.get("enabled"))
        if on and cfg["teacher"].get("model"):
            found.append({"role": section, "model": cfg["teacher"]["model"], "kwargs": cfg["teacher"].get("kwargs") or {}})
    return found


# ---------------------------------------------------------------------------------------------
# MACs (fvcore, cached; the GPU machine has no fvcore: then from the cache or left out)


@lru_cache(maxsize=None)
def _fvcore_available() -> bool:
    """Checked once, before building any model to count (the GPU machine has no fvcore)."""
    try:
        import fvcore.nn  # noqa: F401
    except ImportError:
        return False
    return True


MACS_FAILURES: dict[str, str] = {}   # model -> why its MACs could not be counted (shown in the cell's note)


def count_macs_cached(model: str, kwargs: dict, img_size: int, cache: MeasurementCache) -> float | None:
    key = measure.cache_key(kind="macs", model=model, kwargs=json.dumps(kwargs, sort_keys=True), form="train",
                            img_size=img_size, convention="fvcore+attn", code=source_fingerprint())
    value = cache.get(key)
    if value is None and not _fvcore_available():
        MACS_FAILURES[model] = "MACs not counted here (fvcore missing): run `reproduce plan` where it is"
        return None
    if value is None:
        try:
            built = measure.build_model(model, kwargs, for_counting=True)
            value = measure.count_macs(built, img_size, "fvcore+attn")
        except ImportError:   # no fvcore here (the GPU machine): the estimate stays blank
            MACS_FAILURES[model] = "MACs not counted here (fvcore missing): run `reproduce plan` where it is"
            return None
        except Exception as e:  # a model the recipe cannot build: its cells say why, the plan goes on
            MACS_FAILURES[model] = f"MACs of {model} not counted ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            return None
        cache.put(key, value)
    return value


def _counting_kwargs(kwargs: dict, num_classes: int | None) -> dict:
    # drop rates change no MAC; num_classes changes the head
    kept = {k: v for k, v in kwargs.items() if not k.startswith("drop")}
    return {**kept, **({"num_classes": num_classes} if num_classes else {})}


# ---------------------------------------------------------------------------------------------
# Training-step rate on the current device


def _rate_key(recipe_path: str, recipe: dict, device: str, batch_size, img_size) -> str:
    config = {k: v for k, v in recipe.items() if k != "path"}  # the same on every machine
    return measure.cache_key(kind="train_rate", recipe=recipe_path, config=json.dumps(config, sort_keys=True, default=str),
                             device=resolve(device).tag, batch_size=batch_size, img_size=img_size,
                             code=source_fingerprint())


def measure_train_rate(recipe: dict, device: str, steps: int = 3, warmup: int = 1, batch_size: int | None = None,
                       img_size: int | None = None) -> dict:
    """Images/s of the recipe's training step on `device`: student forward + backward + AdamW update,
    every teacher forward under no_grad, at the recipe's AMP dtype (CUDA) and batch (halved on
    out-of-memory). Teachers carry random weights: the rate does not depend on them. Not included:
    data loading, augmentation, module imitation's feature losses (small next to the forwards)."""
    import torch
    import torch.nn.functional as F

    import timm

    model_cfg = recipe["model"]
    size = img_size or recipe["data"]["img_size"]
    num_classes = model_cfg.get("num_classes", 1000)
    student = timm.create_model(model_cfg["name"], num_classes=num_classes, **model_cfg.get("kwargs", {}))
    student = student.to(device).train()
    teachers = [measure.build_model(t["model"], {**t["kwargs"], "num_classes": num_classes}).to(device)
                for t in teachers_of(recipe)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(recipe.get("amp")))
    use_amp = device.startswith("cuda") and dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    batch = batch_size or recipe["batch_size"]
    notes = []

    def one_step(x, y):
        with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=use_amp):
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            for teacher in teachers:
                with torch.no_grad():
                    soft = teacher(x).float().softmax(-1)
                loss = loss + F.kl_div(logits.float().log_softmax(-1), soft, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    while True:
        try:
            x = torch.randn(batch, 3, size, size, device=device)
            y = torch.randint(0, num_classes, (batch,), device=device)
            for _ in range(warmup):
                one_step(x, y)
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                one_step(x, y)
            sync()
            seconds = time.perf_counter() - start
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise measure.MeasureError("out of memory at batch size 1") from None
            batch //= 2
            notes.append(f"out of memory: batch halved to {batch}")
            x = y = None
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return {"img_per_s": batch * steps / seconds, "batch_size": batch, "steps": steps, "img_size": size,
            "amp": str(recipe.get("amp")) if use_amp else "off", "notes": notes}


# ---------------------------------------------------------------------------------------------
# Calibration to published training times (recipes/plan_anchors.yaml)

ANCHORS_FILE = RECIPES / "plan_anchors.yaml"
ANCHOR_USES = ("calibrate", "reference", "bound")


@dataclass
class Anchor:
    """A published training run: what it trained, on which GPUs, in how many hours, and where it says so."""
    id: str
    model: str
    architecture: str
    epochs: int
    images_per_epoch: int
    batch_size: int
    img_size: int
    precision: str
    gpu: str
    gpus: int
    hours: float
    use: str
    source: dict
    step_gmacs: float | None = None   # 3 x forward MACs per image at img_size (set by the planner)

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus

    @property
    def images(self) -> int:
        return self.epochs * self.images_per_epoch

    def flop_gpu_hours(self, utilization: float) -> float | None:
        """The plan's FLOP estimate of this anchor's own run, on its own GPU kind at its precision."""
        if self.step_gmacs is None:
            return None
        return self.images * self.step_gmacs * 1e9 * FLOP_PER_MAC / (peak_flops(self.gpu, self.precision) * utilization) / 3600

    def achieved_utilization(self) -> float | None:
        """Fraction of its GPU's peak the published run reached: training FLOPs / (GPU-seconds x peak)."""
        if self.step_gmacs is None:
            return None
        return self.images * self.step_gmacs * 1e9 * FLOP_PER_MAC / (self.gpu_hours * 3600 * peak_flops(self.gpu, self.precision))

    def gpu_hours_per_gflop_image(self) -> float | None:
        """GPU-hours on its own GPU kind per GFLOP of training step per image."""
        if self.step_gmacs is None:
            return None
        return self.gpu_hours / (self.images * self.step_gmacs * FLOP_PER_MAC)


def load_anchors(path: Path | None = None) -> tuple[list[Anchor], list[str]]:
    """The anchors and the convnet name prefixes; a bad entry is one line naming it and its field."""
    import yaml

    path = Path(path or ANCHORS_FILE)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{path}: cannot read the anchors ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    anchors = []
    for i, entry in enumerate(data.get("anchors") or []):
        where = f"{path.name}: anchor {entry.get('id', i) if isinstance(entry, dict) else i}"
        if not isinstance(entry, dict):
            raise PlanError(f"{where}: not a mapping")
        missing = [k for k in ("id", "model", "architecture", "epochs", "images_per_epoch", "batch_size", "img_size",
                               "precision", "gpus", "hours", "use", "source") if k not in entry]
        if missing:
            raise PlanError(f"{where}: missing field(s) {', '.join(missing)}")
        gpus, source = entry["gpus"], entry["source"]
        if not isinstance(gpus, dict) or gpus.get("kind") not in GPUS or not int(gpus.get("count") or 0) > 0:
            raise PlanError(f"{where}: field `gpus` must be {{kind: one of {', '.join(GPUS)}, count: N > 0}}")
        if not isinstance(source, dict) or not source.get("cite") or not source.get("text"):
            raise PlanError(f"{where}: field `source` must give `cite` and the exact `text`")
        if entry["use"] not in ANCHOR_USES:
            raise PlanError(f"{where}: field `use` must be one of {', '.join(ANCHOR_USES)}")
        if entry["architecture"] not in ("convnet", "transformer"):
            raise PlanError(f"{where}: field `architecture` must be convnet or transformer")
        if entry["precision"] not in ("bf16", "fp16", "tf32", "fp32"):
            raise PlanError(f"{where}: field `precision` must be bf16, fp16, tf32 or fp32")
        if not float(entry["hours"]) > 0:
            raise PlanError(f"{where}: field `hours` must be > 0")
        anchors.append(Anchor(id=str(entry["id"]), model=entry["model"], architecture=entry["architecture"],
                              epochs=int(entry["epochs"]), images_per_epoch=int(entry["images_per_epoch"]),
                              batch_size=int(entry["batch_size"]), img_size=int(entry["img_size"]),
                              precision=entry["precision"], gpu=gpus["kind"], gpus=int(gpus["count"]),
                              hours=float(entry["hours"]), use=entry["use"], source=source))
    return anchors, [str(p) for p in data.get("convnet_prefixes") or []]


def architecture_of(model: str, convnet_prefixes: list[str]) -> str:
    return "convnet" if model.startswith(tuple(convnet_prefixes)) else "transformer"


def nearest_anchor(step_gmacs: float, architecture: str, anchors: list[Anchor]) -> Anchor | None:
    """The rule: a `calibrate` anchor of the run's architecture (any architecture if it has none),
    the nearest in training-step MACs (ratio, either way)."""
    usable = [a for a in anchors if a.use == "calibrate" and a.step_gmacs]
    same = [a for a in usable if a.architecture == architecture] or usable
    return min(same, key=lambda a: abs(math.log(step_gmacs / a.step_gmacs)), default=None)


# ---------------------------------------------------------------------------------------------
# Peak training memory per GPU (which GPU sizes a run fits, with and without gradient checkpointing)

GPU_MEMORY_GB = (32, 40, 80)      # V100 32 GB, A100 40 GB, A100/H100 80 GB (GiB of device memory)
MEMORY_USABLE = 0.9               # of it, for tensors: CUDA context, cuDNN workspaces, allocator fragmentation
BYTES_PER_TRAINED_PARAM = 16      # fp32 weight + its gradient + the optimizer's two moments (AdamW, Lamb)
BYTES_PER_FROZEN_PARAM = 4        # a teacher's fp32 weight (forward only, no gradient)
BYTES_PER_AMP_WEIGHT_COPY = 2     # autocast keeps a 16-bit copy of each weight for the step
# Activations of a 16-bit autocast step over the same float32 step: measured on CPU under bf16 autocast
# (saved-tensor bytes per image, batch 2 minus batch 1): DeiT-S 0.561, PoolFormer-S12 0.599, SiT-Ti 0.543,
# Swin-T 0.539 (docs/training.md); the largest, rounded up.
AMP_ACTIVATION_RATIO = 0.6


def _saved_tensor_bytes(model, batch: int, img_size: int) -> dict:
    """Bytes autograd keeps for backward over one training forward of `batch` images (meta device: shapes
    only, no memory, no time). Checkpointed segments (every call of torch.utils.checkpoint.checkpoint,
    which timm's and our blocks go through) keep only their inputs; during backward one segment at a
    time is recomputed with all its activations: that largest segment is counted once on top."""
    import torch
    import torch.utils.checkpoint as tuc

    outside, segment, kept_inputs, largest = {}, [None], [0], [0]

    def pack(t):   # by storage: views of one tensor (q, k, v of one qkv; a transpose) count once
        storage = t.untyped_storage()
        (segment[0] if segment[0] is not None else outside)[storage._cdata] = storage.nbytes()
        return t

    original = tuc.checkpoint

    def counted_checkpoint(function, *args, **kwargs):
        for key in ("use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug"):
            kwargs.pop(key, None)
        kept_inputs[0] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        segment[0] = {}
        try:
            out = function(*args, **kwargs)
        finally:
            largest[0] = max(largest[0], sum(segment[0].values()))
            segment[0] = None
        return out

    x = torch.randn(batch, 3, img_size, img_size, device="meta")
    tuc.checkpoint = counted_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.forward_train(x) if hasattr(model, "forward_train") else model(x)
    finally:
        tuc.checkpoint = original
    return {"saved": sum(outside.values()) + kept_inputs[0] + largest[0]}


def measure_activations(model: str, kwargs: dict, img_size: int, cache: MeasurementCache) -> dict | None:
    """Per image: bytes saved for backward by a float32 training forward of the model at img_size, with and
    without gradient checkpointing (batch 2 minus batch 1: weights and other fixed tensors drop out), and
    the parameter count. Cached; None (with the reason in MEMORY_FAILURES) when the model cannot be built."""
    key = measure.cache_key(kind="activations", model=model, kwargs=json.dumps(kwargs, sort_keys=True),
                            img_size=img_size, convention="meta-saved-tensors", code=source_fingerprint())
    value = cache.get(key)
    if value is not None:
        return value
    try:
        built = measure.build_model(model, kwargs, meta=True).train()
        per_image = {}
        for checkpointing in (False, True):
            if checkpointing and hasattr(built, "set_grad_checkpointing"):
                built.set_grad_checkpointing(True)
            one, two = (_saved_tensor_bytes(built, b, img_size)["saved"] for b in (1, 2))
            per_image[checkpointing] = max(two - one, 0)
        value = {"params": sum(p.numel() for p in built.parameters()), "per_image_bytes": per_image[False],
                 "per_image_bytes_checkpointed": per_image[True],
                 "checkpointing": hasattr(built, "set_grad_checkpointing")}
    except Exception as e:  # a model that cannot run here: its memory stays blank, the note says why
        MEMORY_FAILURES[model] = f"memory of {model} not estimated ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        return None
    cache.put(key, value)
    return value


MEMORY_FAILURES: dict[str, str] = {}


def count_params_cached(model: str, kwargs: dict, cache: MeasurementCache) -> int | None:
    key = measure.cache_key(kind="params_meta", model=model, kwargs=json.dumps(kwargs, sort_keys=True),
                            code=source_fingerprint())
    value = cache.get(key)
    if value is None:
        try:
            value = sum(p.numel() for p in measure.build_model(model, kwargs, meta=True).parameters())
        except Exception as e:
            MEMORY_FAILURES[model] = f"parameters of {model} not counted ({type(e).__name__})"
            return None
        cache.put(key, value)
    return value


def training_memory(recipe: dict, per_gpu_batch: int, cache: MeasurementCache) -> dict | None:
    """Estimated peak bytes per GPU of the recipe's training step at `per_gpu_batch` images, without and
    with gradient checkpointing: student weights + gradients + optimizer moments, teachers' weights, the
    autocast weight copies, an EMA copy if any, and the saved activations (measured per image, x batch;
    x AMP_ACTIVATION_RATIO under 16-bit autocast). Not counted: teachers' forward (no_grad: transient),
    the loss's own buffers, data-loader pinned memory."""
    model_cfg = recipe["model"]
    kwargs = {**(model_cfg.get("kwargs") or {}), "num_classes": model_cfg.get("num_classes", 1000)}
    act = measure_activations(model_cfg["name"], kwargs, recipe["data"]["img_size"], cache)
    if act is None:
        return None
    num_classes = model_cfg.get("num_classes", 1000)
    frozen = 0
    for teacher in teachers_of(recipe):
        count = count_params_cached(teacher["model"], {**teacher["kwargs"], "num_classes": num_classes}, cache)
        if count is None:
            return None
        frozen += count
    amp = precision_of(recipe) in ("bf16", "fp16")
    ema = float((recipe.get("ema") or {}).get("decay") or 0) > 0
    static = (act["params"] * (BYTES_PER_TRAINED_PARAM + (BYTES_PER_AMP_WEIGHT_COPY if amp else 0) + (4 if ema else 0))
              + frozen * (BYTES_PER_FROZEN_PARAM + (BYTES_PER_AMP_WEIGHT_COPY if amp else 0)))
    ratio = AMP_ACTIVATION_RATIO if amp else 1.0
    without = static + per_gpu_batch * act["per_image_bytes"] * ratio
    with_ckpt = static + per_gpu_batch * act["per_image_bytes_checkpointed"] * ratio
    return {"batch_per_gpu": per_gpu_batch, "gib": without / 2**30, "gib_checkpointed": with_ckpt / 2**30,
            "recipe_checkpointing": bool(model_cfg.get("grad_checkpointing")),
            "fits": [g for g in GPU_MEMORY_GB if without <= g * 2**30 * MEMORY_USABLE],
            "fits_checkpointed": [g for g in GPU_MEMORY_GB if with_ckpt <= g * 2**30 * MEMORY_USABLE]}


def memory_verdict(memory: dict | None) -> str:
    """Per GPU size: `ok` (fits as is), `ckpt` (fits only with gradient checkpointing), `no` (neither)."""
    if not memory:
        return ""
    return " ".join(f"{g}:{'ok' if g in memory['fits'] else 'ckpt' if g in memory['fits_checkpointed'] else 'no'}"
                    for g in GPU_MEMORY_GB)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Settings:
    gpu: str = DEFAULT_GPU
    utilization: float = DEFAULT_UTILIZATION
    gpus: int = DEFAULT_GPUS
    device: str = "cpu"
    anchors: Path | None = None   # the published training times (default recipes/plan_anchors.yaml)
    memory: bool = True           # estimate peak training memory per GPU (meta-device forward, cached)

    def __post_init__(self):
        if self.gpu not in GPUS:
            raise PlanError(f"unknown GPU '{self.gpu}'; known: {', '.join(GPUS)}")
        if not 0 < self.utilization <= 1:
            raise PlanError(f"--utilization must be in (0, 1], got {self.utilization}")
        if self.gpus < 1:
            raise PlanError(f"--gpus must be at least 1, got {self.gpus}")


@dataclass
class RunCost:
    """One run (a recipe, or one evaluation of released weights) and what it costs."""
    key: str
    path: str                 # recipe | weights
    images: int
    step_gmacs: float | None  # per image, student x3 + teachers (training) or forward (evaluation)
    precision: str
    epochs: int | None = None
    student: str = ""
    teachers: str = ""
    rate: dict | None = None  # measured images/s on the current device
    cells: list = field(default_factory=list)
    architecture: str = ""    # convnet | transformer (the anchors' rule)
    anchor: Anchor | None = None       # the published run its calibrated estimate follows
    memory: dict | None = None         # training_memory(): peak GiB per GPU without / with checkpointing

    def gpu_hours(self, settings: Settings) -> float | None:
        if self.step_gmacs is None:
            return None
        flops = self.images * self.step_gmacs * 1e9 * FLOP_PER_MAC
        return flops / (peak_flops(settings.gpu, self.precision) * settings.utilization) / 3600

    def device_hours(self) -> float | None:
        return self.images / self.rate["img_per_s"] / 3600 if self.rate else None

    def calibrated_gpu_hours(self, settings: Settings) -> float | None:
        """The FLOPs over the fraction of peak its anchor reached on the anchor's GPU, on `settings.gpu`
        at the run's precision: the anchor's GPU-hours per GFLOP-image x its GPU's peak / this GPU's peak."""
        if self.step_gmacs is None or self.anchor is None or self.path != "recipe":
            return None
        return self.gpu_hours(settings) * settings.utilization / self.anchor.achieved_utilization()

    def measured_gpu_hours(self, settings: Settings) -> float | None:
        """GPU-hours on `settings.gpu` from the rate measured on a known GPU (--measure-rates --device
        cuda): exact on that GPU kind, converted by the peak ratio at the run's precision to another. A CPU
        rate says nothing of a GPU: None."""
        gpu = gpu_of_device(measure.device_name(settings.device)) if settings.device.startswith("cuda") else None
        if not self.rate or gpu is None:
            return None
        return self.device_hours() * peak_flops(gpu, self.precision) / peak_flops(settings.gpu, self.precision)

    def hours_range(self, settings: Settings) -> tuple[float | None, float | None, str]:
        """(low, high, basis): the measured rate where there is one, else the FLOP estimate and the
        calibrated one, the lower first."""
        measured = self.measured_gpu_hours(settings)
        if measured is not None:
            return measured, measured, "measured"
        flop, calibrated = self.gpu_hours(settings), self.calibrated_gpu_hours(settings)
        if flop is None:
            return None, None, ""
        if calibrated is None:
            return flop, flop, "flop"
        return min(flop, calibrated), max(flop, calibrated), f"flop+{self.anchor.id}"


def pending_accuracy_cells(spec) -> list[tuple[str, str]]:
    """(row, column) of the printed accuracy cells that no result fills yet (derived cells follow)."""
    run = TableRun(spec, "cpu", kinds=set(), show_progress=False)
    cells = []
    for ref in spec.reference.itertuples():
        row, column = spec.rows[ref.row], spec.columns[ref.column]
        if column.kind != "accuracy" or column.kind in DERIVED_KINDS or ref.reported in NOT_REPORTED or row.cited:
            continue
        if run.accuracy_value(row, column) is None:
            cells.append((row.id, column.id))
    return cells


class Planner:
    def __init__(self, settings: Settings, cache: MeasurementCache | None = None):
        self.settings, self.cache = settings, cache or MeasurementCache()
        self.device = resolve(settings.device)  # once: its tag keys every rate in the cache
        self.runs: dict[str, RunCost] = {}
        self.rows: list[dict] = []
        self.anchors, self.convnet_prefixes = load_anchors(settings.anchors)
        for anchor in self.anchors:
            macs = count_macs_cached(anchor.model, {}, anchor.img_size, self.cache)
            anchor.step_gmacs = None if macs is None else TRAIN_STEP_FORWARDS * macs

    def _recipe_run(self, recipe_path: str) -> RunCost:
        if recipe_path in self.runs:
            return self.runs[recipe_path]
        recipe = load_recipe(recipe_path)
        size, num_classes = recipe["data"]["img_size"], recipe["model"].get("num_classes")
        student_cfg = recipe["model"]
        student = count_macs_cached(student_cfg["name"], _counting_kwargs(student_cfg.get("kwargs", {}), num_classes),
                                    size, self.cache)
        teachers = teachers_of(recipe)
        teacher_macs = [count_macs_cached(t["model"], _counting_kwargs(t["kwargs"], num_classes), size, self.cache)
                        for t in teachers]
        step = (None if student is None or None in teacher_macs
                else TRAIN_STEP_FORWARDS * student + sum(teacher_macs))
        cost = RunCost(key=recipe_path, path="recipe", images=recipe["epochs"] * TRAIN_IMAGES, step_gmacs=step,
                       precision=precision_of(recipe), epochs=recipe["epochs"], student=student_cfg["name"],
                       teachers=" + ".join(f"{t['model']} ({t['role']})" for t in teachers))
        cost.rate = self.cache.get(_rate_key(recipe_path, recipe, self.device, None, None))
        cost.architecture = architecture_of(student_cfg["name"], self.convnet_prefixes)
        if step is not None:
            cost.anchor = nearest_anchor(step, cost.architecture, self.anchors)
        if self.settings.memory:
            cost.memory = training_memory(recipe, math.ceil(recipe["batch_size"] / self.settings.gpus), self.cache)
        self.runs[recipe_path] = cost
        return cost

    def _weights_run(self, weights: dict, img_size: int) -> RunCost:
        key = f"weights:{weights['id']}"
        if key not in self.runs:
            macs = count_macs_cached(weights["model"], {}, img_size, self.cache)
            self.runs[key] = RunCost(key=key, path="weights", images=EVAL_IMAGES, step_gmacs=macs, precision="tf32",
                                     student=weights["model"])
        return self.runs[key]

    def add_table(self, spec) -> None:
        for row_id, column_id in pending_accuracy_cells(spec):
            cell = f"{spec.id}/{row_id}/{column_id}"
            recipe = spec.recipe_of(row_id, column_id)
            weights = released_weights(spec, row_id, column_id)
            training = self._recipe_run(recipe) if recipe and (RECIPES / recipe).exists() else None
            run = self._weights_run(weights, spec.rows[row_id].img_size) if weights else training
            note = ""
            if run is None:
                note = (f"recipe {recipe} not written yet" if recipe else
                        "no recipe and no released weights: needs trained weights (`reproduce eval`)")
            elif weights and training:
                saved = training.gpu_hours(self.settings), run.gpu_hours(self.settings)
                if None not in saved and saved[1] > 0:
                    note = f"from released weights: {saved[0] / saved[1]:.0f}x cheaper than training ({saved[0]:.0f} GPU-h)"
            if run is not None:
                run.cells.append(cell)
            self.rows.append({"table": spec.id, "paper": spec.paper, "row": row_id, "column": column_id,
                              "cell": cell, "run": run, "note": note})

    # -- output -------------------------------------------------------------------------------------
    def frame(self) -> pd.DataFrame:
        s = self.settings
        out = []
        for r in self.rows:
            run: RunCost | None = r["run"]
            gpu_h = run.gpu_hours(s) if run else None
            dev_h = run.device_hours() if run else None
            low, high, basis = run.hours_range(s) if run else (None, None, "")
            memory = run.memory if run else None
            out.append({
                "table": r["table"], "row": r["row"], "column": r["column"],
                "path": run.path if run else "none", "run": run.key if run else "",
                "shared_with": "; ".join(c for c in run.cells if c != r["cell"]) if run else "",
                "epochs": run.epochs if run and run.epochs else "", "images": run.images if run else "",
                "student": run.student if run else "", "teachers": run.teachers if run else "",
                "step_gmacs": _fmt(run.step_gmacs if run else None, 3), "precision": run.precision if run else "",
                "gpu": s.gpu, "peak_tflops": _fmt(peak_flops(s.gpu, run.precision) / 1e12 if run else None, 1),
                "utilization": s.utilization, "gpu_hours_estimate": _fmt(gpu_h, 1),
                "gpu_hours_calibrated": _fmt(run.calibrated_gpu_hours(s) if run else None, 1),
                "anchor": run.anchor.id if run and run.anchor and run.path == "recipe" else "",
                "gpu_hours_low": _fmt(low, 1), "gpu_hours_high": _fmt(high, 1), "gpu_hours_basis": basis,
                "wall_hours_estimate": _fmt(gpu_h / s.gpus if gpu_h is not None else None, 1), "gpus": s.gpus,
                "device": self.device.tag,
                "device_img_per_s": _fmt(run.rate["img_per_s"] if run and run.rate else None, 2),
                "device_hours_estimate": _fmt(dev_h, 1),
                "batch_per_gpu": memory["batch_per_gpu"] if memory else "",
                "memory_gib": _fmt(memory["gib"] if memory else None, 1),
                "memory_gib_checkpointed": _fmt(memory["gib_checkpointed"] if memory else None, 1),
                "memory_fits": memory_verdict(memory),
                "grad_checkpointing": ("on" if memory["recipe_checkpointing"] else "off") if memory else "",
                "note": "; ".join(n for n in (r["note"] or ("" if not run or run.step_gmacs is not None
                                                             else self._macs_note(run)), self._memory_note(run)) if n),
            })
        return pd.DataFrame(out)

    @staticmethod
    def _memory_note(run: RunCost | None) -> str:
        if run is None or run.path != "recipe":
            return ""
        if run.memory is None:
            return MEMORY_FAILURES.get(run.student, "") if run.student in MEMORY_FAILURES else ""
        m = run.memory
        needs = [g for g in GPU_MEMORY_GB if g not in m["fits"] and g in m["fits_checkpointed"]]
        if not needs:
            return ""
        state = "on in the recipe" if m["recipe_checkpointing"] else "off in the recipe: set model.grad_checkpointing"
        return f"needs gradient checkpointing on {'/'.join(map(str, needs))} GB ({state})"

    @staticmethod
    def _macs_note(run: RunCost) -> str:
        models = [run.student] + [t.split(" (")[0] for t in run.teachers.split(" + ") if t]
        return "; ".join(dict.fromkeys(MACS_FAILURES[m] for m in models if m in MACS_FAILURES)) or "MACs not counted"

    def totals(self, by: str) -> pd.DataFrame:
        """Per table or per paper: cells, distinct runs, GPU-hours (each run counted once)."""
        s = self.settings
        groups: dict[str, dict] = {}
        for r in self.rows:
            g = groups.setdefault(r[by], {by: r[by], "pending_cells": 0, "cells_without_path": 0, "runs": {}})
            g["pending_cells"] += 1
            if r["run"] is None:
                g["cells_without_path"] += 1
            else:
                g["runs"][r["run"].key] = r["run"]
        lines = []
        for g in groups.values():
            runs = list(g.pop("runs").values())
            hours = [run.gpu_hours(s) for run in runs]
            device = [run.device_hours() for run in runs]
            counted = [h for h in hours if h is not None]
            ranges = [run.hours_range(s) for run in runs if run.step_gmacs is not None]
            low, high = sum(r[0] for r in ranges), sum(r[1] for r in ranges)
            calibrated = sum(run.calibrated_gpu_hours(s) or run.gpu_hours(s) for run in runs if run.step_gmacs is not None)
            lines.append({**g, "runs": len(runs), "runs_counted": len(counted),
                          "gpu_hours_estimate": _fmt(sum(counted), 0),
                          "wall_days_estimate": _fmt(sum(counted) / s.gpus / 24, 1),
                          "gpu_hours_calibrated": _fmt(calibrated, 0),
                          "gpu_hours_low": _fmt(low, 0), "gpu_hours_high": _fmt(high, 0),
                          "wall_days_low": _fmt(low / s.gpus / 24, 1), "wall_days_high": _fmt(high / s.gpus / 24, 1),
                          "runs_calibrated": sum(run.calibrated_gpu_hours(s) is not None for run in runs),
                          "runs_measured": sum(r[2] == "measured" for r in ranges),
                          "runs_need_checkpointing": sum(bool(run.memory) and len(run.memory["fits"]) < len(
                              run.memory["fits_checkpointed"]) for run in runs),
                          "device_hours_estimate": _fmt(sum(d for d in device if d is not None), 0)
                          if any(d is not None for d in device) else "",
                          "runs_with_device_rate": sum(d is not None for d in device)})
        return pd.DataFrame(lines)

    def anchor_table(self) -> pd.DataFrame:
        """Per anchor: its published GPU-hours beside the plan's FLOP estimate of its own recipe (on its own
        GPU kind and precision, at --utilization), their ratio, and the fraction of peak it reached."""
        s = self.settings
        lines = []
        for a in self.anchors:
            flop = a.flop_gpu_hours(s.utilization)
            lines.append({"anchor": a.id, "use": a.use, "model": a.model, "gpus": f"{a.gpus} {a.gpu}",
                          "hours": a.hours, "published_gpu_hours": _fmt(a.gpu_hours, 1),
                          "step_gmacs": _fmt(a.step_gmacs, 2), "flop_gpu_hours": _fmt(flop, 1),
                          "flop_over_published": _fmt(flop / a.gpu_hours if flop else None, 3),
                          "achieved_utilization": _fmt(a.achieved_utilization(), 3)})
        return pd.DataFrame(lines)

    def calibration(self) -> list[str]:
        """What the measured rates say of `--utilization` on the current device's GPU."""
        gpu = gpu_of_device(measure.device_name(self.settings.device)) if self.settings.device.startswith("cuda") else None
        lines = []
        for run in self.runs.values():
            if run.rate and run.step_gmacs and gpu:
                util = run.rate["img_per_s"] * run.step_gmacs * 1e9 * FLOP_PER_MAC / peak_flops(gpu, run.precision)
                lines.append(f"{run.key}: {run.rate['img_per_s']:.0f} img/s at batch {run.rate['batch_size']} = "
                             f"{util:.0%} of the {GPUS[gpu]['label']}'s {run.precision} peak")
        return lines

    def measure_rates(self, steps: int, seconds: float, batch_size: int | None = None, img_size: int | None = None,
                      echo=print) -> None:
        """Time a few training steps of each run's recipe, largest estimate first, until `seconds` pass."""
        start = time.perf_counter()
        order = sorted((r for r in self.runs.values() if r.path == "recipe"),
                       key=lambda r: -(r.gpu_hours(self.settings) or r.images))
        for run in order:
            if time.perf_counter() - start > seconds:
                echo(f"plan: rate budget of {seconds:.0f} s spent; the rest keep their cached rates or none")
                break
            recipe = load_recipe(run.key)
            key = _rate_key(run.key, recipe, self.device, batch_size, img_size)
            rate = self.cache.get(key)
            if rate is None:
                try:
                    rate = measure_train_rate(recipe, self.settings.device, steps, batch_size=batch_size,
                                              img_size=img_size)
                except (measure.MeasureError, measure.ModelNotImplemented, RuntimeError) as e:
                    echo(f"plan: {run.key}: no rate ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                self.cache.put(key, rate)
            run.rate = rate
            echo(f"plan: {run.key}: {rate['img_per_s']:.1f} img/s (batch {rate['batch_size']})")


MEMORY_LINES = 5   # runs named on screen; every run is in plan.csv


def _span(low, high) -> str:
    """'406-770' (one number when both agree): the plan's range as printed."""
    return str(low) if low == high else f"{low}-{high}"


def _fmt(value, digits):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(float(value), digits) if digits else int(round(value))


def render_markdown(planner: Planner, tables: list[str]) -> str:
    s = planner.settings
    per_table, per_paper = planner.totals("table"), planner.totals("paper")
    lines = [f"# What the pending accuracy cells cost ({', '.join(tables) if len(tables) < 6 else f'{len(tables)} tables'})",
             "", "**Estimates**, not measurements: GPU-hours = images x (3 x student MACs + teachers' MACs) x 2 FLOP "
             f"/ ({GPUS[s.gpu]['label']} peak at the recipe's precision x utilization {s.utilization}); wall-clock "
             f"on {s.gpus} GPU(s). Each run is counted once, however many cells it fills (docs/training.md, "
             "'What a table costs'). Released weights: 50,000 images x forward MACs.", "",
             "**Range** low-high: the FLOP estimate and the one calibrated to a published training time "
             "(recipes/plan_anchors.yaml: the anchor of the run's architecture nearest in step MACs, its achieved "
             f"fraction of peak on its GPU applied to the {GPUS[s.gpu]['label']}); a rate measured on a GPU "
             "(--measure-rates) replaces both. Memory per GPU at the recipe's batch / "
             f"{s.gpus}: per size ({'/'.join(map(str, GPU_MEMORY_GB))} GB) ok, ckpt (only with gradient "
             "checkpointing) or no.", ""]
    if planner.calibration():
        lines += ["Measured on this device (calibration of the utilization):", "",
                  *[f"- {c}" for c in planner.calibration()], ""]
    for title, frame in (("Per paper", per_paper), ("Per table", per_table)):
        lines += [f"## {title}", "", frame.to_markdown(index=False) if len(frame) else "(no pending cells)", ""]
    anchors = planner.anchor_table()
    if len(anchors):
        lines += ["## Anchors: the FLOP estimate of each published run against its published time", "",
                  anchors.to_markdown(index=False), ""]
    detail = planner.frame()
    if len(detail):
        shown = detail[["table", "row", "column", "path", "run", "shared_with", "step_gmacs", "gpu_hours_estimate",
                        "gpu_hours_calibrated", "anchor", "device_hours_estimate", "memory_fits", "note"]]
        lines += ["## Per cell", "", shown.to_markdown(index=False), ""]
    return "\n".join(lines)


def plan_paths(tables: list[str], all_tables: bool, device: str, results_dir: Path | None) -> tuple[Path, Path]:
    folder = Path(results_dir or RESULTS_DIR) / resolve(device).tag
    stem = "plan" if all_tables else "plan-" + "+".join(tables)
    return folder / f"{stem}.csv", folder / f"{stem}.md"


def make_plan(table_ids: list[str], settings: Settings, cache: MeasurementCache | None = None) -> Planner:
    planner = Planner(settings, cache)
    for table_id in table_ids:
        try:
            planner.add_table(load_table(table_id))
        except RegistryError as e:
            raise PlanError(str(e)) from None
    return planner


def write_plan(planner: Planner, tables: list[str], all_tables: bool, results_dir: Path | None) -> tuple[Path, Path]:
    csv_path, md_path = plan_paths(tables, all_tables, planner.settings.device, results_dir)
    files.atomic_write_text(csv_path, planner.frame().to_csv(index=False))
    files.atomic_write_text(md_path, render_markdown(planner, tables))
    return csv_path, md_path


# ---------------------------------------------------------------------------------------------
# Command line: `reproduce plan [TABLE ...|--all]`

import click  # noqa: E402


@click.command("plan", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("table_ids", nargs=-1)
@click.option("--all", "all_tables", is_flag=True, help="every registered table")
@click.option("--gpu", default=DEFAULT_GPU, show_default=True, type=click.Choice(list(GPUS)),
              help="the GPU the GPU-hours are estimated on")
@click.option("--utilization", default=DEFAULT_UTILIZATION, show_default=True, type=float,
              help="fraction of the GPU's peak a training step reaches")
@click.option("--gpus", default=DEFAULT_GPUS, show_default=True, type=int, help="GPUs per run (wall-clock = GPU-h / gpus)")
@click.option("--device", default="cpu", show_default=True, help="where --measure-rates times training steps")
@click.option("--measure-rates", is_flag=True, help="time a few training steps of each recipe on --device (cached)")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1), help="timed steps per recipe")
@click.option("--rate-seconds", default=600.0, show_default=True, help="stop measuring rates after this many seconds")
@click.option("--batch-size", type=click.IntRange(min=1), help="rates at this batch instead of the recipe's (toy runs)")
@click.option("--img-size", type=click.IntRange(min=16), help="rates at this size instead of the recipe's (toy runs)")
@click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)")
@click.option("--anchors", type=click.Path(path_type=Path, dir_okay=False),
              help="published training times to calibrate against (default: recipes/plan_anchors.yaml)")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="estimate peak training memory per GPU and which GPU sizes need gradient checkpointing")
def plan_command(table_ids, all_tables, gpu, utilization, gpus, device, measure_rates, steps, rate_seconds,
                 batch_size, img_size, results_dir, anchors, memory):
    """What each pending accuracy cell costs to fill: path, estimate, totals per table and paper."""
    from rich.console import Console
    from rich.table import Table

    from reproduce.errors import SuiteError
    from reproduce.errors import device as _device
    from reproduce.errors import table_id as _table_id
    from reproduce.registry import table_ids as all_ids

    if not table_ids and not all_tables:
        raise SuiteError("name a table id (e.g. riformer-6) or pass --all")
    ids = all_ids() if all_tables else [_table_id(t) for t in table_ids]
    try:
        settings = Settings(gpu=gpu, utilization=utilization, gpus=gpus, device=_device(device), anchors=anchors,
                            memory=memory)
        planner = make_plan(ids, settings)
        if measure_rates:
            planner.measure_rates(steps, rate_seconds, batch_size, img_size, echo=lambda m: click.echo(m, err=True))
    except PlanError as e:
        raise SuiteError(str(e)) from None
    csv_path, md_path = write_plan(planner, ids, all_tables, results_dir)
    per_table = planner.totals("table")
    rates = bool(len(per_table)) and per_table["runs_with_device_rate"].sum() > 0
    headers = ["table", "pending", "no path", "runs (costed)", f"GPU-h {gpu}", f"days on {gpus}", "ckpt"]
    grid = Table(*headers, *(["device-h (est.)"] if rates else []),
                 caption=f"estimates, low-high: images x (3 x student + teachers) MACs x 2 / ({GPUS[gpu]['label']} "
                         f"peak x {utilization}), and calibrated to published training times "
                         "(recipes/plan_anchors.yaml); a rate measured on a GPU replaces both. Each run counted "
                         "once; costed when its MACs could be counted. ckpt: runs that need gradient "
                         f"checkpointing on some of {'/'.join(map(str, GPU_MEMORY_GB))} GB. Per cell: {csv_path}")
    grid.columns[0].no_wrap = True   # a table id is never cut (repaformer-1 ...)
    grid.columns[0].min_width = max([5, *(len(t) for t in per_table["table"])]) if len(per_table) else 5
    for line in per_table.itertuples():
        costed = line.runs_counted > 0
        grid.add_row(line.table, str(line.pending_cells), str(line.cells_without_path),
                     f"{line.runs} ({line.runs_counted})", _span(line.gpu_hours_low, line.gpu_hours_high) if costed else "–",
                     _span(line.wall_days_low, line.wall_days_high) if costed else "–",
                     str(line.runs_need_checkpointing),
                     *([str(line.device_hours_estimate) or "–"] if rates else []))
    out = Console()
    out.print(grid)
    for line in planner.totals("paper").itertuples():
        out.print(f"{line.paper}: {line.pending_cells} pending cells, {line.runs} distinct runs, "
                  f"~{_span(line.gpu_hours_low, line.gpu_hours_high)} GPU-h on {gpu} "
                  f"(~{_span(line.wall_days_low, line.wall_days_high)} days on {gpus})", highlight=False)
    needing = sorted((run for run in planner.runs.values() if run.memory and Planner._memory_note(run)),
                     key=lambda run: -run.memory["gib"])
    if needing:
        out.print(f"memory: {len(needing)} runs need gradient checkpointing on some of "
                  f"{'/'.join(map(str, GPU_MEMORY_GB))} GB at batch / {gpus} per GPU (plan.csv: memory_fits); "
                  "the largest:", highlight=False)
    for run in needing[:MEMORY_LINES]:
        out.print(f"memory: {run.key}: {run.memory['gib']:.0f} GiB per GPU without, "
                  f"{run.memory['gib_checkpointed']:.0f} with checkpointing at batch "
                  f"{run.memory['batch_per_gpu']}: {Planner._memory_note(run)}", highlight=False)
    for line in planner.calibration():
        out.print(f"calibration: {line}", highlight=False)
    Console(stderr=True).print(f"plan: wrote {csv_path} and {md_path.name}", highlight=False)
