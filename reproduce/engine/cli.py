"""`reproduce train` and `reproduce eval` (click commands; reproduce/cli.py registers them).

Several GPUs: `reproduce train ... --nproc 8` starts torchrun itself. Several nodes: run torchrun
yourself on every node, e.g.
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m reproduce.engine.cli train riformer-6 riformer_s12 --data /imagenet
or let a cluster do it: `reproduce submit` (reproduce/submit.py, docs/cluster.md).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from reproduce.engine import EngineError

from reproduce.engine import cells
from reproduce.engine.cells import ROOT, cell_of_output, cell_run, check_cell, evaluate_into_cell, train_cell


def _relaunch_under_torchrun(nproc: int) -> int:
    """Start this same command under torchrun with nproc processes (without --nproc)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    # sys.argv[1:] starts at the subcommand when called as `reproduce train ...`
    start = args.index("train") if "train" in args else 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "reproduce.engine.cli", *args[start:]]
    return subprocess.call(command)


@click.command("train")
@click.argument("table")
@click.argument("row")
@click.option("--column", type=str, default=None, help="the accuracy column, for rows that train one run per column")
@click.option("--data", type=str, default=None, help="dataset root (ImageFolder: train/ and validation/ folders)")
@click.option("--scale", type=click.Choice(["smoke", "learn", "full"]), default="full", show_default=True,
              help="smoke: tiny images, few steps, generated data unless --data; learn: a tiny width "
                   "trained on sklearn's digits (the learning check)")
@click.option("--nproc", type=int, default=1, show_default=True, help="processes (GPUs) on this node")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="default runs/<table>/<row> (runs/<table>/<row>--<column> with --column)")
@click.option("--resume", is_flag=True, help="continue from <output>/checkpoint.pt")
@click.option("--recipe", "recipe_option", type=str, default=None,
              help="a recipe file to use instead of the one the table names")
@click.option("--dry-run", is_flag=True, help="build everything at full size and run one step on synthetic "
                                              "images, without data or trained weights")
def train_command(table, row, column, data, scale, nproc, output, resume, recipe_option, dry_run):
    """Train the recipe behind one accuracy cell (TABLE ROW [--column C]) and evaluate it."""
    from reproduce.engine import distributed

    try:
        if dry_run:
            path, run_name, column = cell_run(table, row, column, recipe_option)
            sys.exit(_report_dry_runs([path], use_cache=False, label=f"{table}/{run_name}"))
        path, run_name, column, _ = check_cell(table, row, column, scale, data, recipe_option)  # before any work
        if nproc > 1 and not distributed.launched_by_torchrun():
            sys.exit(_relaunch_under_torchrun(nproc))
        output = output or cells.RUNS / table / run_name
        result = train_cell(table, row, column, scale=scale, data=data, output=output, resume=resume,
                            recipe_option=recipe_option, world=int(os.environ.get("WORLD_SIZE", nproc)))
    except EngineError as err:
        raise click.ClickException(str(err)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        click.echo(f"{table}/{run_name}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  ({scale}) "
                   f"-> {output / 'result.json'}")


@click.command("eval")
@click.argument("model")
@click.option("--checkpoint", required=True, type=str, help="weights: ours, or an official release in its layout")
@click.option("--data", required=True, type=str, help="dataset root")
@click.option("--split", default="validation", show_default=True)
@click.option("--img-size", default=224, show_default=True)
@click.option("--crop-pct", type=float, default=None,
              help="resize to img_size / crop_pct, centre crop (default: the release's or timm's cfg)")
@click.option("--resize", type=int, default=None, help="short side before the crop (instead of --crop-pct)")
@click.option("--interpolation", default=None, help="default: the release's or timm's cfg")
@click.option("--crop-mode", type=click.Choice(["center", "squash"]), default=None,
              help="squash: resize both edges (timm's NFNet cfg); default: the release's or timm's cfg")
@click.option("--mean", default=None, help="normalisation mean, e.g. 0.5,0.5,0.5 (default: the release's or timm's cfg)")
@click.option("--std", default=None, help="normalisation std (default: the release's or timm's cfg)")
@click.option("--num-classes", default=1000, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--workers", default=4, show_default=True)
@click.option("--deploy", "deploy_form", is_flag=True,
              help="evaluate the deploy (folded) form: a train-form file is loaded, then folded")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="write result.json here (runs/<table>/<row>[--<column>] fills that table cell)")
def eval_command(model, checkpoint, data, split, img_size, crop_pct, resize, interpolation, crop_mode, mean, std,
                 num_classes, batch_size, workers, deploy_form, output):
    """Top-1/top-5 of MODEL with the given weights. The eval transform is the release's (recipes/weights.yaml,
    matched by file name or model), else timm's pretrained cfg of MODEL; the flags override it."""
    from reproduce import weights

    def floats(text):
        try:
            return [float(v) for v in text.split(",")] if text else None
        except ValueError:
            raise click.BadParameter(f"{text!r} is not comma-separated numbers", param_hint="--mean/--std") from None

    transform, source = weights.resolve_transform(
        model, img_size, checkpoint, resize=resize, crop_pct=None if resize else crop_pct,
        interpolation=interpolation, crop_mode=crop_mode, mean=floats(mean), std=floats(std))
    release = weights.release_of_model(model, img_size, checkpoint)
    try:
        result = evaluate_into_cell(model, checkpoint, data, transform=transform, img_size=img_size,
                                    form="deploy" if deploy_form else "train", output=output,
                                    cell=cell_of_output(output), split=split, num_classes=num_classes,
                                    batch_size=batch_size, workers=workers,
                                    release=release.name if release and Path(checkpoint).name == release.local_name
                                    else None)
    except (EngineError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{model}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  ({result['images']} images, "
               f"{result['layout']} layout, {result['form']} form)")
    click.echo(f"transform: {weights.describe_transform(transform)} ({source})")
    if output:
        click.echo(f"-> {Path(output) / 'result.json'}")


def _report_dry_runs(paths, use_cache: bool, label: str | None = None) -> int:
    """Dry-run each recipe, one line each (a progress line between); 1 if any failed."""
    import time

    from reproduce.engine.dryrun import dry_run

    start, failed = time.time(), 0
    for i, path in enumerate(paths, 1):
        if len(paths) > 1 and sys.stderr.isatty():
            click.echo(f"[{i}/{len(paths)}] {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ...",
                       err=True, nl=False)
            click.echo("\r\033[K", err=True, nl=False)
        outcome = dry_run(path, use_cache=use_cache)
        failed += not outcome.ok
        if label:
            click.echo(f"{label}:")
        click.echo("\n".join(outcome.lines()))
    if len(paths) > 1:
        click.echo(f"{len(paths) - failed}/{len(paths)} recipes pass the dry run in {time.time() - start:.0f} s")
    return 1 if failed else 0


@click.command("dry-run")
@click.argument("recipes", nargs=-1, type=click.Path(path_type=Path))
@click.option("--all", "all_recipes", is_flag=True, help="every recipe under recipes/")
@click.option("--distinct", is_flag=True, help="only the first recipe of each distinct configuration "
              "(student, image size, teachers, losses; what CI runs)")
@click.option("--no-cache", is_flag=True, help="run again even where a stored outcome holds")
def dry_run_command(recipes, all_recipes, distinct, no_cache):
    """Build RECIPES at full size and run one optimizer step each (see reproduce/engine/dryrun.py)."""
    from reproduce.engine import dryrun

    paths = dryrun.recipe_files() if all_recipes else [Path(r) for r in recipes]
    if distinct:
        paths = dryrun.distinct(paths)
    if not paths:
        raise click.UsageError("name recipe files, or pass --all")
    sys.exit(_report_dry_runs(paths, use_cache=not no_cache))


@click.group()
def engine_main():
    """The engine's commands alone (what torchrun runs in each process)."""


engine_main.add_command(train_command)
engine_main.add_command(eval_command)
engine_main.add_command(dry_run_command)

if __name__ == "__main__":
    engine_main()
