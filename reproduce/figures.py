"""Latency breakdowns: RIFormer Fig. 1 and RePaFormer Fig. 3, as CSV plus PNG.

    reproduce figure riformer-1      ViT-Base built up block part by block part (paper 000, Sec. 3.2)
    reproduce figure repaformer-3    patch embedding / token mixer / FFN share per model (paper 003, Sec. 3.2)

Both figures are measured the same way: by *ablation*. A component is replaced, in every block, by
a module that passes its input through (`PassThrough`), and its latency is the difference between
the model with and without it. Every variant is timed by the suite's one harness
(`measure.Timer`), the variants of one model interleaved (a, b, c, a, b, c, ...) so that the
machine's drift hits them alike.

Why ablation and not timing forward hooks (RePaFormer only says the running times "are recorded"):
  * it reuses the harness unchanged, so warm-up, `inference_mode`, synchronisation and the median
    of repeats are the same as for every table; hooks would be a second timer;
  * on a GPU a hook can only time a module by synchronising around it (which serialises the
    asynchronous launches and inflates short modules) or with CUDA events (yet another timer);
    the difference of two whole-model timings needs no synchronisation inside the model and is
    the latency a user would actually save;
  * it is the method RIFormer Fig. 1 describes (variants with and without each component).
Its costs: four timings per model, and a small component's difference can drown in timing noise
(the `other` share may even come out negative on a busy CPU; the CSV keeps it as measured). On
CPU, Fig. 3 (batch 1) is timed on one thread with more, shorter repeats (`REPAFORMER_3`); on a
shared machine its shares move by a few points from run to run.

What the components are (module boundaries as in timm / the official code):
  * token mixer: `attn` (ViT/DeiT; Swin's window attention, whose shift and window partition stay
    in the block), `token_mixer` (PoolFormer/RIFormer), `mlp_tokens` (MLP-Mixer);
  * FFN: `mlp` (ViT/DeiT, Swin, PoolFormer), `mlp_channels` (MLP-Mixer);
  * patch embedding: the model with every block removed, i.e. the stem and the downsampling between
    stages, plus the final norm, pooling and classifier head (one small layer each);
  * other: the rest (norms, residual adds, layer scale, Swin's shift/partition).

The CSVs (results/<device-tag>/figure-*.csv) carry the device metadata (`measure.environment`)
and the protocol actually run on every line. The papers' printed numbers sit in the `reported_*`
columns; they are device-bound (A100 batch 2048; one A6000 at batch 1), so on another device only
the shares are comparable, and only roughly.
"""
from __future__ import annotations

import copy
import textwrap
from dataclasses import replace
from pathlib import Path

import click
import pandas as pd
import torch.nn as nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reproduce import files, measure  # measure imports riformer, which must come before timm
from reproduce.device import resolve
from reproduce.registry import RegistryError, load_protocol
from reproduce.runner import RESULTS_DIR

import timm.models.mlp_mixer as timm_mixer
import timm.models.swin_transformer as timm_swin
import timm.models.vision_transformer as timm_vit
from riformer.metaformer import MetaFormerBlock

# Block types the breakdown knows: where the token mixer and the FFN sit in each.
BLOCK_PARTS = {
    timm_vit.Block: {"token_mixer": "attn", "ffn": "mlp"},
    timm_swin.SwinTransformerBlock: {"token_mixer": "attn", "ffn": "mlp"},
    timm_mixer.MixerBlock: {"token_mixer": "mlp_tokens", "ffn": "mlp_channels"},
    MetaFormerBlock: {"token_mixer": "token_mixer", "ffn": "mlp"},
}

# ---------------------------------------------------------------------------------------------
# What the papers print. Quoted into the CSVs' `reported_*` columns, never computed with.

RIFORMER_1 = {
    "model": "vit_base_patch16_224",
    "protocol": "riformer",
    # 000 Sec. 3.2: "token mixer can bring an additional latency of 1433.6ms, occupying about 46.3%
    # of the backbone" (Fig. 1 caption: 46.3%; the slides, 001, repeat 46.3%).
    "reported_added_ms": "1433.6",
    "reported_added_share_pct": "46.3",
    "paper_setting": "one A100, batch 2048 at 224, mean of 30 runs, median of 3 repeats",
}

# (ViT block part replaced, label as on the figure's bars); each step adds one part back, in the
# order of 000 Sec. 3.2 ("LN, Attention, Channel MLP"), ending at ViT-Base without pooling and head.
VIT_STEPS = (
    ("embedding", "embedding only"),
    ("layernorm", "+ LayerNorm"),
    ("attention", "+ attention"),
    ("channel_mlp", "+ channel MLP"),
)

REPAFORMER_3 = {
    "protocol": "repaformer",
    "batch_size": 1,  # 003 Sec. 3.2: "when processing a single input image"
    # At batch 1 the ops are too small to split: with several threads on a shared CPU every op waits
    # at a barrier for a descheduled thread, and the subtracted timings turn into noise.
    "cpu_threads": 1,
    # The CPU section of the table protocol (1 pass x 3 repeats) is too short for differences of
    # timings: more, short timings keep the medians steady. (batch 1: a few seconds per model.)
    "cpu_timing": {"runs": 3, "repeats": 7, "warmup": 2},
    "paper_setting": "one NVIDIA A6000, a single image",
}

# name -> label as in 003 Fig. 3; DeiT, Swin, PoolFormer and MLP-Mixer across sizes.
REPAFORMER_3_MODELS = {
    "deit_tiny_patch16_224": "DeiT-T",
    "deit_small_patch16_224": "DeiT-S",
    "deit_base_patch16_224": "DeiT-B",
    "swin_tiny_patch4_window7_224": "Swin-T",
    "swin_small_patch4_window7_224": "Swin-S",
    "swin_base_patch4_window7_224": "Swin-B",
    "poolformer_v1_s12": "PoolFormer-S12",
    "poolformer_v1_s24": "PoolFormer-S24",
    "poolformer_v1_s36": "PoolFormer-S36",
    "mixer_b16_224": "MLP-Mixer-B/16",
    "mixer_l16_224": "MLP-Mixer-L/16",
}
# The smallest of each family: a few minutes at batch 1 on 2 CPU cores.
REPAFORMER_3_CPU_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224",
                           "poolformer_v1_s12", "mixer_b16_224")

# 003 Sec. 3.2 prints only these FFN shares (%); the figure's other bars are not in the text.
REPAFORMER_3_REPORTED_FFN_SHARE = {
    "deit_small_patch16_224": "32.8",
    "deit_base_patch16_224": "43.1",
    "mixer_b16_224": "52.7",
    "mixer_l16_224": "66.4",
    "swin_small_patch4_window7_224": "33.6",
    "poolformer_v1_s36": "73.7",
}

COMPONENTS = ("patch_embedding", "token_mixer", "ffn", "other")
COMPONENT_LABELS = {"patch_embedding": "patch embedding", "token_mixer": "token mixer", "ffn": "FFN",
                    "other": "other"}

# ---------------------------------------------------------------------------------------------
# Building the variants


class PassThrough(nn.Module):
    """Returns its input unchanged, whatever else the caller passes (timm's attention takes masks)."""

    def forward(self, x, *args, **kwargs):
        return x


def _blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, block) of every known block, outermost first, nested ones skipped."""
    found, inside = [], set()
    for parent in model.modules():
        if id(parent) in inside:
            continue
        for name, child in parent.named_children():
            if isinstance(child, tuple(BLOCK_PARTS)):
                found.append((parent, name, child))
                inside.update(id(m) for m in child.modules())
    return found


def _parts_of(block: nn.Module) -> dict[str, str]:
    return next(parts for kind, parts in BLOCK_PARTS.items() if isinstance(block, kind))


def ablate(model: nn.Module, *parts: str) -> nn.Module:
    """A copy of `model` whose blocks lack `parts`: 'token_mixer', 'ffn', or 'blocks' (each block
    as a whole). The copy shares nothing with `model`; what is removed is freed."""
    unknown = set(parts) - {"token_mixer", "ffn", "blocks"}
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}")
    variant = copy.deepcopy(model)
    blocks = _blocks(variant)
    if not blocks:
        raise measure.MeasureError(f"{type(model).__name__} has no block the breakdown knows "
                                   f"({', '.join(k.__name__ for k in BLOCK_PARTS)})")
    for parent, name, block in blocks:
        if "blocks" in parts:
            setattr(parent, name, PassThrough())
            continue
        for part in parts:
            setattr(block, _parts_of(block)[part], PassThrough())
    return variant


def vit_breakdown_variants(model_name: str = RIFORMER_1["model"], img_size: int = 224) -> dict[str, nn.Module]:
    """RIFormer Fig. 1's models, step name -> model: ViT-Base without pooling and head (its output
    is `forward_features`), then with fewer and fewer parts in each of its 12 blocks."""
    full = measure.build_model(model_name, {"img_size": img_size, "num_classes": 0, "global_pool": ""})
    embedding = ablate(full, "blocks")
    embedding.norm = PassThrough()  # "only input embedding": the final LayerNorm comes with the LN step
    return {"embedding": embedding, "layernorm": ablate(full, "token_mixer", "ffn"),
            "attention": ablate(full, "ffn"), "channel_mlp": full}


def component_variants(model_name: str, img_size: int = 224) -> dict[str, nn.Module]:
    """RePaFormer Fig. 3's ablations of one model: whole, and without token mixers, FFNs, blocks."""
    full = measure.build_model(model_name, {"img_size": img_size} if img_size != 224 else None)
    return {"full": full, "no_token_mixer": ablate(full, "token_mixer"), "no_ffn": ablate(full, "ffn"),
            "no_blocks": ablate(full, "blocks")}


# ---------------------------------------------------------------------------------------------
# Timing


def figure_protocol(name: str, device: str, img_size: int, **overrides) -> measure.Protocol:
    """The paper's protocol (its `cpu:` section on CPU), then the `overrides` that are not None."""
    try:
        spec = load_protocol(name)
    except RegistryError as e:
        raise measure.MeasureError(str(e)) from None
    protocol = measure.Protocol.for_device(spec, device, img_size)
    return replace(protocol, **{k: v for k, v in overrides.items() if v is not None})


def describe(protocol: measure.Protocol, name: str, device: str) -> str:
    scaled = "" if device.startswith("cuda") else " (CPU-scaled)"
    return f"{name}{scaled}: {protocol.describe()}, variants interleaved"


def time_variants(variants: dict[str, nn.Module], img_size: int, protocol: measure.Protocol, device: str,
                  advance=lambda: None) -> dict[str, dict]:
    """Latency per batch (ms) of each variant: the median over repeats, sampled round-robin."""
    timers = {name: measure.Timer(model, img_size, protocol, device) for name, model in variants.items()}
    results = {}
    for name, summary in measure.time_interleaved(timers, advance).items():
        per_batch_ms = 1000 * summary["batch_size"]
        results[name] = {"latency_ms": per_batch_ms / summary["img_per_s"], "min_ms": per_batch_ms / summary["max"],
                         "max_ms": per_batch_ms / summary["min"], "batch_size": summary["batch_size"],
                         "notes": summary["notes"]}
    return results


def _attention_note(model: nn.Module) -> str:
    fused = {getattr(m, "fused_attn") for m in model.modules() if hasattr(m, "fused_attn")}
    if not fused:
        return ""
    return ("attention through scaled_dot_product_attention" if fused == {True}
            else "attention as explicit matmuls + softmax")


def _meta_columns(device: str, protocol_text: str) -> dict:
    env = resolve(device).env
    software = f"torch {env['torch']}, timm {env['timm']}, python {env['python']}"
    for key in ("cuda", "cudnn", "driver"):
        if env.get(key):
            software += f", {key} {env[key]}"
    return {"device": env["device"], "software": software, "threads": env["threads"], "protocol": protocol_text}


def _round(value: float) -> float:
    return round(value, 3)


def riformer_1(device: str = "cpu", img_size: int = 224, progress: Progress | None = None,
               **protocol_overrides) -> pd.DataFrame:
    """RIFormer Fig. 1: latency per batch of each step, the step's added latency and its share of
    the full backbone; the +attention line is the token mixer's (with the paper's numbers)."""
    protocol = figure_protocol(RIFORMER_1["protocol"], device, img_size, **protocol_overrides)
    variants = vit_breakdown_variants(RIFORMER_1["model"], img_size)
    task = progress.add_task("riformer-1: ViT-Base variants", total=len(variants) * protocol.repeats) \
        if progress else None
    timed = time_variants(variants, img_size, protocol, device,
                          advance=lambda: progress.advance(task) if progress else None)
    full_ms = timed["channel_mlp"]["latency_ms"]
    meta = _meta_columns(device, describe(protocol, RIFORMER_1["protocol"], device))
    attention = _attention_note(variants["channel_mlp"])
    rows, previous_ms = [], 0.0
    for step, label in VIT_STEPS:
        t = timed[step]
        added = t["latency_ms"] - previous_ms
        previous_ms = t["latency_ms"]
        notes = list(t["notes"])
        if step == "layernorm":
            notes.append("adds the blocks' residual adds and the final LayerNorm as well")
        if step == "attention":
            notes += [f"token mixer; reported on {RIFORMER_1['paper_setting']}", attention]
        rows.append({
            "figure": "riformer-1", "model": RIFORMER_1["model"], "step": step, "label": label,
            "img_size": img_size, "batch_size": t["batch_size"],
            "latency_ms": _round(t["latency_ms"]), "latency_min_ms": _round(t["min_ms"]),
            "latency_max_ms": _round(t["max_ms"]), "added_ms": _round(added),
            "added_share_pct": _round(100 * added / full_ms),
            "reported_added_ms": RIFORMER_1["reported_added_ms"] if step == "attention" else "",
            "reported_added_share_pct": RIFORMER_1["reported_added_share_pct"] if step == "attention" else "",
            "note": "; ".join(n for n in notes if n), **meta})
    return pd.DataFrame(rows)


def repaformer_3(models: list[str] | None = None, device: str = "cpu", img_size: int = 224,
                 progress: Progress | None = None, **protocol_overrides) -> pd.DataFrame:
    """RePaFormer Fig. 3: per model, latency (ms per batch) and share of patch embedding, token
    mixer, FFN and the rest, by ablation (see the module docstring)."""
    if models is None:
        models = list(REPAFORMER_3_MODELS if device.startswith("cuda") else REPAFORMER_3_CPU_MODELS)
    defaults = {"batch_size": REPAFORMER_3["batch_size"],
                **({} if device.startswith("cuda") else REPAFORMER_3["cpu_timing"])}
    asked = {k: v for k, v in protocol_overrides.items() if v is not None}
    protocol = figure_protocol(REPAFORMER_3["protocol"], device, img_size, **{**defaults, **asked})
    meta = _meta_columns(device, describe(protocol, REPAFORMER_3["protocol"], device))
    task = progress.add_task("repaformer-3", total=len(models) * 4 * protocol.repeats) if progress else None
    rows = []
    for name in models:
        if progress:
            progress.update(task, description=f"repaformer-3: {name}")
        variants = component_variants(name, img_size)
        timed = time_variants(variants, img_size, protocol, device,
                              advance=lambda: progress.advance(task) if progress else None)
        ms = {k: v["latency_ms"] for k, v in timed.items()}
        parts = {"patch_embedding": ms["no_blocks"], "token_mixer": ms["full"] - ms["no_token_mixer"],
                 "ffn": ms["full"] - ms["no_ffn"]}
        parts["other"] = ms["full"] - sum(parts.values())
        how = {"total": "the whole model", "patch_embedding": "the model with every block removed (stem, "
               "downsampling, final norm, pooling, head)", "token_mixer": "whole minus the model without token "
               "mixers", "ffn": "whole minus the model without FFNs", "other": "whole minus the three parts"}
        attention = _attention_note(variants["full"])
        batch_notes = sorted({n for v in timed.values() for n in v["notes"]})
        del variants, timed
        for component, value in [("total", ms["full"]), *parts.items()]:
            reported = REPAFORMER_3_REPORTED_FFN_SHARE.get(name, "") if component == "ffn" else ""
            notes = [how[component], *batch_notes]
            if reported:
                notes.append(f"reported on {REPAFORMER_3['paper_setting']}")
            if component == "token_mixer" and attention:
                notes.append(attention)
            rows.append({"figure": "repaformer-3", "model": name, "label": REPAFORMER_3_MODELS.get(name, name),
                         "component": component, "img_size": img_size, "batch_size": protocol.batch_size,
                         "latency_ms": _round(value), "share_pct": _round(100 * value / ms["full"]),
                         "reported_share_pct": reported, "note": "; ".join(notes), **meta})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, Agg canvas)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _subtitle(frame: pd.DataFrame, width: int = 110) -> str:
    first = frame.iloc[0]
    return textwrap.fill(f"{first['device']} · threads: {first['threads']} · {first['software']} · "
                         f"{first['protocol']}", width)


def plot_riformer_1(frame: pd.DataFrame):
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    bars = ax.bar(frame["label"], frame["latency_ms"], color=["#9db4d0", "#6f95c2", "#d9534f", "#3d6fa8"])
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in frame["latency_ms"]], padding=2)
    ax.set_ylabel(f"latency per batch of {frame['batch_size'].iloc[0]} (ms)")
    ax.set_xlabel("ViT-Base (12 blocks), block parts added one at a time")
    ax.set_ylim(0, frame["latency_ms"].max() * 1.25)
    attention = frame.set_index("step").loc["attention"]
    ax.text(0.02, 0.97, f"token mixer (attention): +{attention['added_ms']:.1f} ms, "
            f"{attention['added_share_pct']:.1f}% of the backbone (measured)\n"
            f"paper: +{attention['reported_added_ms']} ms, {attention['reported_added_share_pct']}% "
            f"({RIFORMER_1['paper_setting']})", transform=ax.transAxes, va="top", fontsize=9)
    fig.suptitle("RIFormer Fig. 1: latency of ViT-Base's components", fontsize=12)
    ax.set_title(_subtitle(frame), fontsize=7)
    return fig


def plot_repaformer_3(frame: pd.DataFrame):
    models = list(dict.fromkeys(frame["model"]))
    wide = frame.pivot(index="model", columns="component", values="share_pct").loc[models]
    totals = frame[frame["component"] == "total"].set_index("model")["latency_ms"]
    labels = frame.drop_duplicates("model").set_index("model")["label"]
    fig = _new_figure(9, 1.2 + 0.55 * len(models))
    ax = fig.add_subplot()
    y = range(len(models))
    left = [0.0] * len(models)
    colors = {"patch_embedding": "#9db4d0", "token_mixer": "#d9534f", "ffn": "#3d6fa8", "other": "#cccccc"}
    for component in COMPONENTS:
        width = [max(v, 0.0) for v in wide[component]]  # a negative difference is timing noise: drawn as 0
        ax.barh(y, width, left=left, color=colors[component], label=COMPONENT_LABELS[component])
        for i, (w, l) in enumerate(zip(width, left)):
            if w >= 6:
                ax.text(l + w / 2, i, f"{w:.0f}", ha="center", va="center", fontsize=8, color="white")
        left = [l + w for l, w in zip(left, width)]
    reported = [(i, float(REPAFORMER_3_REPORTED_FFN_SHARE[m])) for i, m in enumerate(models)
                if m in REPAFORMER_3_REPORTED_FFN_SHARE]
    if reported:
        ffn_start = [wide.loc[models[i], "patch_embedding"] + wide.loc[models[i], "token_mixer"] for i, _ in reported]
        ax.scatter([max(s, 0) + r for s, (_, r) in zip(ffn_start, reported)], [i for i, _ in reported],
                   marker="|", s=300, color="black", label="paper's FFN share (end of FFN bar)")
    for i, m in enumerate(models):
        ax.text(max(left[i], 100) + 1, i, f"{totals[m]:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(list(y), [labels[m] for m in models])
    ax.invert_yaxis()
    ax.set_xlim(0, 118)
    ax.set_xlabel(f"share of latency (%), batch {frame['batch_size'].iloc[0]}; total per batch at right")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(models)), ncol=5, fontsize=8,
              frameon=False)
    fig.suptitle("RePaFormer Fig. 3: where the latency goes", fontsize=12)
    ax.set_title(_subtitle(frame), fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------
# Writing


def figure_paths(figure_id: str, device: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    folder = Path(results_dir or RESULTS_DIR) / resolve(device).tag
    return folder / f"figure-{figure_id}.csv", folder / f"figure-{figure_id}.png"


def save_png(fig, path: Path) -> None:
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150))


def write_figure(figure_id: str, frame: pd.DataFrame, fig, device: str,
                 results_dir: Path | None = None) -> tuple[Path, Path]:
    csv_path, png_path = figure_paths(figure_id, device, results_dir)
    files.atomic_write_text(csv_path, frame.to_csv(index=False))
    save_png(fig, png_path)
    return csv_path, png_path


# ---------------------------------------------------------------------------------------------
# Command line: `reproduce figure riformer-1|repaformer-3`


def _fail(message: str):
    from reproduce.errors import SuiteError

    raise SuiteError(message)


def _timing_options(command):
    options = [
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]"),
        click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)"),
        click.option("--img-size", default=224, show_default=True),
        click.option("--batch-size", type=int,
                     help="default: the protocol's (CPU-scaled on CPU); 1 for repaformer-3"),
        click.option("--runs", type=int, help="forward passes per timing (default: the protocol's)"),
        click.option("--repeats", type=int, help="timings per variant, median taken (default: the protocol's)"),
        click.option("--warmup", type=int, help="forward passes before timing (default: the protocol's)"),
        click.option("--threads", type=int,
                     help="torch intra-op threads (default: torch's; 1 for repaformer-3 on CPU)"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run(figure_id: str, measure_frame, plot, device: str, results_dir, quiet: bool, threads: int | None,
         cpu_threads: int | None = None, **kwargs):
    """Measure (under `threads`, else `cpu_threads` on CPU), then write the CSV and the PNG."""
    try:
        device = resolve(device)
        if threads is None and not device.startswith("cuda"):
            threads = cpu_threads
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with measure.intra_op_threads(threads), Progress(*columns, disable=quiet, transient=True) as progress:
            frame = measure_frame(device=device, progress=progress, **kwargs)
    except (measure.MeasureError, measure.ModelNotImplemented) as e:
        _fail(f"{figure_id}: {e}")
    csv_path, png_path = write_figure(figure_id, frame, plot(frame), device, results_dir)
    click.echo(f"{figure_id}: wrote {csv_path} and {png_path.name}", err=True)
    return frame


@click.group("figure", context_settings={"help_option_names": ["-h", "--help"]})
def figure_command():
    """The papers' figures as CSV + PNG: latency breakdowns (riformer-1, repaformer-3) and the
    speed-accuracy figures defined as data in recipes/figures/ (repaformer-2, sit-6)."""


@figure_command.command("riformer-1")
@_timing_options
def riformer_1_command(device, results_dir, img_size, batch_size, runs, repeats, warmup, threads, quiet):
    """ViT-Base built up part by part; the token mixer's added latency and share."""
    frame = _run("riformer-1", riformer_1, plot_riformer_1, device, results_dir, quiet, threads, img_size=img_size,
                 batch_size=batch_size, runs=runs, repeats=repeats, warmup=warmup)
    if not quiet:
        shown = frame[["label", "latency_ms", "added_ms", "added_share_pct", "reported_added_ms",
                       "reported_added_share_pct"]]
        click.echo(shown.to_string(index=False))


@figure_command.command("repaformer-3")
@click.option("--models", help="comma-separated timm names (default: the small sizes on CPU, "
                               "every model of the figure on CUDA)")
@click.option("--all-models", is_flag=True, help="every model of the figure, also on CPU (slow)")
@_timing_options
def repaformer_3_command(models, all_models, device, results_dir, img_size, batch_size, runs, repeats, warmup,
                         threads, quiet):
    """Share of patch embedding, token mixer and FFN in each model's latency (batch 1)."""
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    if all_models:
        names = list(REPAFORMER_3_MODELS)
    frame = _run("repaformer-3", repaformer_3, plot_repaformer_3, device, results_dir, quiet, threads,
                 cpu_threads=REPAFORMER_3["cpu_threads"], models=names,
                 img_size=img_size, batch_size=batch_size, runs=runs, repeats=repeats, warmup=warmup)
    if not quiet:
        wide = frame.pivot(index="label", columns="component", values="share_pct")
        wide["total_ms"] = frame[frame.component == "total"].set_index("label")["latency_ms"]
        click.echo(wide[[*COMPONENTS, "total_ms"]].loc[list(dict.fromkeys(frame["label"]))].to_string())


# ---------------------------------------------------------------------------------------------
# Speed-accuracy figures, defined as data: recipes/figures/<id>.yaml names a table, the columns on
# the axes, the rows of each series (and panel). Throughput is the suite's, measured on the device
# by the table's protocol (cached like the table's); accuracy is measured where a result exists
# (runs/<table>/...result.json, as the table reads it) and the paper's printed number otherwise,
# drawn hollow and said so in the legend and the CSV.

FIGURES_DIR = RESULTS_DIR.parent / "recipes" / "figures"
_FIGURE_FIELDS = {"id", "title", "table", "x", "y", "size", "arrows", "lines", "panels"}


def figure_ids() -> list[str]:
    return sorted(p.stem for p in FIGURES_DIR.glob("*.yaml"))


def load_figure(figure_id: str) -> dict:
    """A figure definition, checked against its table: unknown fields, rows or columns are named."""
    import yaml

    from reproduce.registry import load_table

    path = FIGURES_DIR / f"{figure_id}.yaml"
    if not path.exists():
        raise RegistryError(f"unknown figure '{figure_id}'; data-defined figures: {', '.join(figure_ids())}")
    where = f"recipes/figures/{path.name}"
    spec = yaml.safe_load(path.read_text())
    unknown = set(spec) - _FIGURE_FIELDS
    if unknown:
        raise RegistryError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIGURE_FIELDS)}")
    table = load_table(spec["table"])
    for axis in ("x", "y", "size"):
        column = (spec.get(axis) or {}).get("column")
        if axis != "size" and not column or column and column not in table.columns:
            raise RegistryError(f"{where}: {axis}.column {column!r} is not a column of {table.id}")
    for panel in spec["panels"]:
        for series in panel["series"]:
            missing = [r for r in series["rows"] if r not in table.rows]
            if missing:
                raise RegistryError(f"{where}: series '{series['label']}' names rows {missing} that {table.id} lacks")
    return {**spec, "spec": table}


def speed_accuracy(figure: dict, device: str = "cpu", cache=None, progress: Progress | None = None,
                   **protocol_overrides) -> pd.DataFrame:
    """One line per point: measured throughput with its range, accuracy measured or reported."""
    from reproduce.registry import NOT_REPORTED
    from reproduce.runner import MeasurementCache, TableRun

    spec = figure["spec"]
    x_col, y_col = figure["x"]["column"], figure["y"]["column"]
    size_col = (figure.get("size") or {}).get("column")
    rows = {r for panel in figure["panels"] for series in panel["series"] for r in series["rows"]}
    rows |= {spec.rows[r].baseline for r in rows if figure.get("arrows") == "baseline" and spec.rows[r].baseline}
    run = TableRun(spec, device, {"throughput"}, cache or MeasurementCache(), show_progress=progress is not None,
                   rows=rows, protocol_overrides=protocol_overrides)
    run.run()
    printed = {(r.row, r.column): r for r in spec.reference.itertuples()}

    def reported(row, column):
        ref = printed.get((row, column))
        return float(ref.reported) if ref and ref.reported not in NOT_REPORTED else None

    by_text: dict[str, list[int]] = {}   # one description per distinct protocol, with its image sizes
    for size, protocol in sorted(run.protocols_used.items()):
        by_text.setdefault(protocol.describe(), []).append(size)
    scaled = "" if device.startswith("cuda") else " (CPU-scaled)"
    meta = _meta_columns(device, "; ".join(f"{spec.protocol}{scaled} @{'/'.join(map(str, sizes))}: {text}"
                                           for text, sizes in by_text.items()) or "cached")
    lines = []
    for p, panel in enumerate(figure["panels"]):
        for series in panel["series"]:
            for row_id in series["rows"]:
                row, measured_y = spec.rows[row_id], run.values.get((row_id, y_col))
                throughput = run.values.get((row_id, x_col))
                low, high = run.ranges.get((row_id, x_col), (None, None))
                accuracy = measured_y if measured_y is not None else reported(row_id, y_col)
                notes = [run.notes.get((row_id, x_col), "")]
                if throughput is None:
                    notes.insert(0, run.failures.get(run.target(row, spec.columns[x_col]), "throughput not measured"))
                lines.append({
                    "figure": figure["id"], "panel": panel.get("title", ""), "panel_index": p,
                    "series": series["label"], "row": row_id, "label": printed[(row_id, y_col)].label
                    if (row_id, y_col) in printed else row_id, "model": row.model, "form": row.form,
                    "img_size": row.img_size, "baseline": row.baseline or "",
                    "throughput": _round(throughput) if throughput is not None else "",
                    "throughput_min": _round(low) if low is not None else "",
                    "throughput_max": _round(high) if high is not None else "",
                    "throughput_source": "measured" if throughput is not None else "",
                    "reported_throughput": reported(row_id, x_col) or "",
                    "accuracy": accuracy if accuracy is not None else "",
                    "accuracy_source": "measured" if measured_y is not None else "reported" if accuracy is not None else "",
                    "size": reported(row_id, size_col) or "" if size_col else "",
                    "note": "; ".join(n for n in notes if n), **meta})
    return pd.DataFrame(lines)


def plot_speed_accuracy(frame: pd.DataFrame, figure: dict):
    from matplotlib.lines import Line2D

    panels = sorted(set(frame["panel_index"]))
    fig = _new_figure(10.5 if len(panels) == 1 else 7.4 * len(panels), 6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = {}
    for p, ax in zip(panels, axes):
        part = frame[(frame["panel_index"] == p) & (frame["throughput"] != "")]
        for label, points in part.groupby("series", sort=False):
            color = next(s["color"] for panel in figure["panels"] for s in panel["series"] if s["label"] == label)
            colors[label] = color
            points = points[points["accuracy"] != ""].copy()
            points[["throughput", "throughput_min", "throughput_max", "accuracy"]] = \
                points[["throughput", "throughput_min", "throughput_max", "accuracy"]].astype(float)
            points = points.sort_values("throughput")
            if figure.get("lines"):
                ax.plot(points["throughput"], points["accuracy"], color=color, lw=1.2, zorder=1)
            area = [30 + 2.5 * float(s) for s in points["size"]] if figure.get("size") else 45
            measured = points["accuracy_source"] == "measured"
            ax.errorbar(points["throughput"], points["accuracy"],
                        xerr=[points["throughput"] - points["throughput_min"], points["throughput_max"] - points["throughput"]],
                        fmt="none", ecolor=color, elinewidth=0.8, capsize=2, zorder=2)
            for is_measured in (True, False):
                chosen = points[measured == is_measured]
                sizes = area if isinstance(area, int) else [a for a, m in zip(area, measured) if m == is_measured]
                ax.scatter(chosen["throughput"], chosen["accuracy"], s=sizes, zorder=3, linewidths=1.4,
                           facecolors=color if is_measured else "white", edgecolors=color)
            for _, point in points.iterrows():
                ax.annotate(point["label"], (point["throughput"], point["accuracy"]), fontsize=6.5,
                            xytext=(4, 3), textcoords="offset points")
        if figure.get("arrows") == "baseline":
            placed = part[(part["accuracy"] != "")].set_index("row")
            for row, point in placed.iterrows():
                if point["baseline"] in placed.index:
                    base = placed.loc[point["baseline"]]
                    ax.annotate("", xy=(float(point["throughput"]), float(point["accuracy"])),
                                xytext=(float(base["throughput"]), float(base["accuracy"])),
                                arrowprops={"arrowstyle": "->", "color": "#888888", "lw": 0.8})
        ax.set_xscale(figure["x"].get("scale", "linear"))
        ax.set_xlabel(figure["x"]["label"])
        ax.set_ylabel(figure["y"]["label"])
        ax.grid(alpha=0.3, which="both")
        if frame.loc[frame["panel_index"] == p, "panel"].iloc[0]:
            ax.set_title(frame.loc[frame["panel_index"] == p, "panel"].iloc[0], fontsize=10)
    handles = [Line2D([], [], marker="o", ls="", color=c, label=label) for label, c in colors.items()]
    handles += [Line2D([], [], marker="o", ls="", color="black", label="accuracy measured (filled)"),
                Line2D([], [], marker="o", ls="", markerfacecolor="white", color="black",
                       label="accuracy as printed in the paper (hollow)"),
                Line2D([], [], marker="|", ls="", color="black", label="throughput: median, bar = range")]
    if figure.get("size"):
        handles.append(Line2D([], [], ls="", label=f"marker area: {figure['size']['label']}"))
    fig.legend(handles=handles, loc="outside right center", fontsize=7.5, frameon=False)
    fig.suptitle(f"{figure['title']}\nthroughput measured on this device; accuracy measured where a result "
                 "exists, else the paper's", fontsize=10.5)
    fig.supxlabel(_subtitle(frame, 120 * len(panels)), fontsize=6.5)
    return fig


def _speed_accuracy_command(figure_id: str):
    @click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]")
    @click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)")
    @click.option("--no-cache", is_flag=True, help="time again instead of reusing cached throughputs")
    @click.option("--runs", type=int, help="timed passes (or seconds) per repeat (default: the protocol's)")
    @click.option("--repeats", type=int, help="timings per model (default: the protocol's)")
    @click.option("--warmup", type=int, help="warm-up passes (or seconds) (default: the protocol's)")
    @click.option("--quiet", is_flag=True, help="no progress bar, no printout")
    def command(device, results_dir, no_cache, runs, repeats, warmup, quiet):
        from reproduce.runner import MeasurementCache

        try:
            figure = load_figure(figure_id)
            device = resolve(device)
            frame = speed_accuracy(figure, device, MeasurementCache(enabled=not no_cache),
                                   progress=None if quiet else True, runs=runs, repeats=repeats, warmup=warmup)
        except (RegistryError, measure.MeasureError) as e:
            _fail(f"{figure_id}: {e}")
        csv_path, png_path = write_figure(figure_id, frame, plot_speed_accuracy(frame, figure), device, results_dir)
        click.echo(f"{figure_id}: wrote {csv_path} and {png_path.name}", err=True)
        if not quiet:
            click.echo(frame[["series", "label", "throughput", "throughput_min", "throughput_max", "accuracy",
                              "accuracy_source"]].to_string(index=False))

    command.__doc__ = f"Speed vs accuracy as defined in recipes/figures/{figure_id}.yaml (CSV + PNG)."
    return click.command(figure_id)(command)


for _figure_id in figure_ids():
    figure_command.add_command(_speed_accuracy_command(_figure_id))
