"""Helpers shared by several test modules (a plain module: `from helpers import ...`).

* `one_thread`: an autouse fixture once imported into a test module; runs each test on one thread.
* Training: `write_recipe` (a recipe file over a base), `generated` (a module-scoped generated dataset).
* `kill_at_step`: a training run killed at a given step (resume tests).
* RePaFormer folds: `randomize_`, `max_relative_error`, `ffn_outputs`, `assert_fold_is_exact`.
* Reference CSVs and table specs: `ROOT`, `HEADER`, `UNITS`, `FLAGS`, `read_reference`, `read_spec`,
  `first_seen`.
"""
import copy
import csv
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import riformer  # noqa: F401  (before timm: torchvision shim)
from riformer import repa
from riformer.deploy import deploy


def write_recipe(folder: Path, fields: dict, base: Path, name="recipe.yaml") -> Path:
    """A recipe file in `folder` that sets `fields` over `base`."""
    path = folder / name
    path.write_text(yaml.safe_dump({"base": str(base), **fields}))
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A small generated ImageFolder dataset (4 classes, 8 + 4 images each, 40 px)."""
    from reproduce.engine.data import make_generated_dataset

    return str(make_generated_dataset(tmp_path_factory.mktemp("data"), classes=4, images_per_class=8, image_size=40))


def kill_at_step(engine, monkeypatch, step: int):
    """Make the engine's `step`-th training step raise KeyboardInterrupt (a killed run); returns the real
    training_step, to put back before resuming."""
    real, calls = engine.training_step, {"n": 0}

    def dies(run, images, targets):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("killed")
        return real(run, images, targets)

    monkeypatch.setattr(engine, "training_step", dies)
    return real


@pytest.fixture(autouse=True)
def one_thread():
    """Run the test on one thread (the test machines share their cores), or on $TEST_THREADS where
    the machine is the test's alone (`make test-slow` in CI: its own step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


# --- RePaFormer folds -----------------------------------------------------------------------------

@torch.no_grad()
def randomize_(model, seed=0):
    """Random FFN weights, biases, BatchNorm affines *and running statistics*, layer scales, heads."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, low=-1.0, high=1.0):
        return torch.rand(shape, generator=g) * (high - low) + low

    for module in model.modules():
        if isinstance(module, repa.ChannelIdleFFN) and not module.deployed:
            for fc in (module.fc1, module.fc2):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / fc.in_features ** 0.5)
                fc.bias.copy_(rand(fc.bias.shape, -0.2, 0.2))
            for bn in (module.norm, module.norm_hidden):
                bn.weight.copy_(rand(bn.weight.shape, 0.5, 1.5))
                bn.bias.copy_(rand(bn.bias.shape, -0.2, 0.2))
                bn.running_mean.copy_(rand(bn.running_mean.shape, -0.5, 0.5))
                bn.running_var.copy_(rand(bn.running_var.shape, 0.5, 2.0))
            if module.layer_scale is not None:  # PoolFormer's 1e-5 init would hide the FFN entirely
                module.layer_scale.copy_(rand(module.layer_scale.shape, 0.5, 1.5))
        elif isinstance(module, nn.Linear) and not module.weight.any():  # zero-initialized heads
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) / module.in_features ** 0.5)
    return model


def max_relative_error(reference, other):
    return ((reference - other).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def ffn_outputs(model, x):
    """Output of every ChannelIdleFFN (in call order) and the model's own output."""
    outputs = OrderedDict()
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out.clone()))
             for name, m in model.named_modules() if isinstance(m, repa.ChannelIdleFFN)]
    try:
        outputs["<model output>"] = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def assert_fold_is_exact(model, x, tolerance, in_place=False):
    """deploy(model) computes the same function; on failure, name the first FFN that diverges."""
    before = ffn_outputs(model, x)
    folded = deploy(model if in_place else copy.deepcopy(model))
    after = ffn_outputs(folded, x)
    assert list(before) == list(after)
    for name, reference in before.items():
        error = max_relative_error(reference, after[name])
        assert error <= tolerance, f"{name} is the first module that diverges: max relative error {error:.2e}"
    return folded


# --- reference CSVs and table specs ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["table", "row", "label", "group", "column", "reported", "unit",
          "epochs_600", "finetuned_384", "cnn_teacher", "in22k", "note"]
UNITS = {"", "M", "G", "img/s", "%", "x"}
FLAGS = ("epochs_600", "finetuned_384", "cnn_teacher", "in22k")


def read_reference(table_id):
    """(header, cells) of results/reference/<table_id>.csv, a cell being a dict keyed by the header."""
    with open(ROOT / "results" / "reference" / f"{table_id}.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, [dict(zip(header, line)) for line in reader]


def read_spec(table_id):
    """recipes/tables/<table_id>.yaml, parsed."""
    with open(ROOT / "recipes" / "tables" / f"{table_id}.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def first_seen(values):
    """The distinct values in the order they first appear."""
    return list(dict.fromkeys(values))


# --- a table of its own (registry, reference, protocols, cache and runs in tmp_path) -------------

def scratch_table(tmp_path, monkeypatch, spec, reference_table, protocol_cpu=None):
    """Register `spec` (a dict) as the only table, with the printed cells of `reference_table`'s
    reference that its rows and columns name; `protocol_cpu` replaces the protocol's cpu section.
    Returns the results folder to pass as --results-dir."""
    import pandas as pd

    from reproduce import buildable, registry, runner

    recipes, reference = tmp_path / "recipes", tmp_path / "reference"
    (recipes / "tables").mkdir(parents=True)
    shutil.copytree(registry.RECIPES / "protocols", recipes / "protocols")
    if protocol_cpu is not None:
        path = recipes / "protocols" / f"{spec['protocol']}.yaml"
        protocol = yaml.safe_load(path.read_text())
        protocol["cpu"] = protocol_cpu
        path.write_text(yaml.safe_dump(protocol))
    for folder in ("riformer", "repaformer", "sit"):  # row recipes resolve against the real ones
        if (registry.RECIPES / folder).exists():
            (recipes / folder).symlink_to(registry.RECIPES / folder)
    (recipes / "tables" / f"{spec['id']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    ref = pd.read_csv(registry.REFERENCE_DIR / f"{reference_table}.csv", dtype=str, keep_default_na=False)
    ref = ref[ref["row"].isin(spec["rows"]) & ref["column"].isin(spec["columns"])].assign(table=spec["id"])
    reference.mkdir()
    ref.to_csv(reference / f"{spec['id']}.csv", index=False)
    monkeypatch.setattr(registry, "RECIPES", recipes)
    monkeypatch.setattr(registry, "TABLES_DIR", recipes / "tables")
    monkeypatch.setattr(registry, "REFERENCE_DIR", reference)
    monkeypatch.setattr(runner, "CACHE_DIR", tmp_path / "cache" / "measurements")
    monkeypatch.setattr(buildable, "CACHE_DIR", tmp_path / "cache" / "coverage")
    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    registry.load_table.cache_clear()
    return tmp_path / "results"


def rewrite_spec(spec):
    """Write an edited scratch spec back (after `scratch_table`)."""
    from reproduce import registry

    (registry.TABLES_DIR / f"{spec['id']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    registry.load_table.cache_clear()


# --- accuracy results ------------------------------------------------------------------------------

def write_accepted_result(runs_dir, table_id, row_id, top1, column=None):
    """A result.json the runner accepts for that cell: released weights evaluated on ImageNet-1k val
    (a stand-in weights file beside it, and per-image evidence of that top-1; reproduce/provenance.py's
    rules)."""
    import json

    from reproduce import provenance, registry

    spec = registry.load_table(table_id)
    row = spec.rows[row_id]
    folder = Path(runs_dir) / table_id / (spec.run_name(row_id, column) if column else row_id)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pth"
    weights.write_bytes(b"stand-in weights")
    result = {"schema": provenance.SCHEMA, "table": table_id, "row": row_id, "column": column, "top1": top1,
              "top5": 90.0, "model": row.model, "form": row.form, "img_size": row.img_size, "scale": "full",
              "run_dir": f"{table_id}/{folder.name}",
              "weights": {"path": str(weights), "sha256": provenance.file_sha256(weights)},
              "data": {"root": "/imagenet", "split": "validation", **provenance.IMAGENET_VAL}}
    attach_evidence(result, folder)
    (folder / "result.json").write_text(json.dumps(result))
    return folder / "result.json"


# --- the planted slowdowns of scripts/guard_power.py (test-only; no CLI reaches them) ----------------

def guard_plants():
    """scripts/guard_power.py as a module: its plants (slower_model, pooling, sleep_in_deploy)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "guard_power.py"
    module_spec = importlib.util.spec_from_file_location("guard_power", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def imagenet_like_predictions(top1, top5, images=50000, classes=1000):
    """Per-image predictions [(image id, target, top-5)] over an ImageNet-1k-val-shaped split
    (`images` ids n<class>/ILSVRC2012_val_<i>.JPEG, `classes` folders) whose top-1 and top-5 are
    `top1`/`top5` % (rounded to whole images)."""
    hits1, hits5 = round(top1 * images / 100), round(top5 * images / 100)
    predictions = []
    for i in range(images):
        target = i % classes
        others = [(target + k) % classes for k in range(1, 6)]
        top = [target, *others[:4]] if i < hits1 else [others[0], target, *others[1:4]] if i < hits5 else others
        predictions.append((f"n{target:08d}/ILSVRC2012_val_{i + 1:08d}.JPEG", target, top))
    return predictions


def evaluated(top1, top5):
    """What engine.evaluate returns with predictions=True over an ImageNet-1k-val-shaped split whose
    top-1/top-5 are `top1`/`top5` %: the metrics, per-image predictions and class names."""
    from reproduce import evidence

    predictions = imagenet_like_predictions(top1, top5)
    return {**evidence.metrics(predictions), "predictions": predictions,
            "class_names": evidence.class_order(evidence.class_of(p[0]) for p in predictions)}


def attach_evidence(result: dict, folder, predictions=None, name="evidence.csv.gz", record="evidence"):
    """Write the evidence of `predictions` (default: ImageNet-1k-val-shaped ones of the result's
    top1/top5) into `folder` as the evaluation would, and record it in `result` (its top1/top5 set to
    the evidence's exact values); returns the predictions."""
    from reproduce import evidence

    if predictions is None:
        data = result["data"]
        predictions = imagenet_like_predictions(result["top1"], result["top5"], data["images"], data["classes"])
    header = {"run_dir": result["run_dir"], "checkpoint_sha256": result["weights"]["sha256"],
              "model": result.get("model"), "form": result.get("form"), "img_size": result.get("img_size"),
              "split": result["data"]["split"]}
    result[record] = evidence.write(Path(folder) / name, predictions, header)
    result["data"]["files_sha256"] = evidence.files_sha256(p[0] for p in predictions)
    result["data"]["classes_sha256"] = evidence.list_sha256(evidence.class_order(evidence.class_of(p[0])
                                                                               for p in predictions))
    found = evidence.metrics(predictions)
    if record == "evidence":
        result["top1"], result["top5"] = found["top1"], found["top5"]
    return predictions
