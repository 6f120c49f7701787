"""`reproduce`: the command line of the suite.

    reproduce list                         every table and what the suite covers of it
    reproduce table riformer-6             measure a table, write results/<device>/riformer-6.{csv,md}
    reproduce diff riformer-6              check results against the reference (exit 1 on a new mismatch)
    reproduce all-tables                   every table at this machine's scale
    reproduce bench riformer_s12 ...       ad-hoc throughput with the same harness
    reproduce plan --all                   what the pending accuracy cells cost to fill (estimates)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

import riformer  # noqa: F401  (torchvision shim and model registration before anything else)
from reproduce import measure
from reproduce.registry import RegistryError, load_table, resolve_table_id, table_ids

console = Console(stderr=True)
out = Console()

COLUMN_CHOICES = {"params", "macs", "throughput", "accuracy", "settings"}


class SuiteError(click.ClickException):
    """A one-line error that names the thing to fix; exit code 2."""

    exit_code = 2

    def show(self, file=None):
        console.print(f"[bold red]error:[/] {self.message}", highlight=False)


def _table_id(value: str) -> str:
    try:
        return resolve_table_id(value)
    except RegistryError as e:
        raise SuiteError(str(e)) from None


def _spec(table_id: str):
    try:
        return load_table(_table_id(table_id))
    except RegistryError as e:
        raise SuiteError(str(e)) from None


def _kinds(columns: str | None) -> set[str] | None:
    if not columns:
        return None
    asked = {c.strip() for c in columns.split(",") if c.strip()}
    unknown = asked - COLUMN_CHOICES
    if unknown:
        raise SuiteError(f"unknown column(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(sorted(COLUMN_CHOICES))}")
    return {"setting" if c == "settings" else c for c in asked}


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SuiteError(f"results folder {folder} is not writable ({e.strerror}); "
                         "fix its permissions or pass --results-dir") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reproduce")
def main():
    """Reproduce RIFormer, RePaFormer and SiT table by table, and say where each number stands."""


@main.command("list")
def list_tables():
    """Every table, its source and how much of it the suite can fill."""
    from reproduce.checks import table_coverage

    grid = Table("table", "paper", "static", "throughput", "accuracy", "settings", "results", "title",
                 caption="a/b: printed cells the suite can fill here / all printed cells of that kind; "
                         "results: statuses of the last run (✓ match ≈ within tolerance ✗ mismatch … pending c cited)")
    grid.columns[-1].no_wrap, grid.columns[-1].overflow, grid.columns[-1].max_width = True, "ellipsis", 36
    for table_id in table_ids():
        try:
            spec = load_table(table_id)
        except RegistryError as e:
            grid.add_row(table_id, "", "", "", "", "", "", f"[red]{e}[/]")
            continue
        cov = table_coverage(spec)
        grid.add_row(table_id, f"{spec.paper} T{spec.number}", cov["static"], cov["throughput"],
                     cov["accuracy"], cov["setting"], cov["results"], spec.title)
    out.print(grid)


def _rows(spec, rows: str | None) -> set[str] | None:
    if not rows:
        return None
    asked = {r.strip() for r in rows.split(",") if r.strip()}
    unknown = sorted(asked - set(spec.rows))
    if unknown:
        raise SuiteError(f"{spec.id} has no row(s) {', '.join(unknown)}; its rows: {', '.join(spec.rows)}")
    return asked


def _run_one(table_id, columns, device, results_dir, no_cache, quiet, rows=None, timing=None):
    from reproduce.runner import MeasurementCache, results_paths, run_table

    spec = _spec(table_id)
    kinds = _kinds(columns)
    csv_path, _ = results_paths(spec.id, device, results_dir)
    _writable(csv_path.parent)
    try:
        frame, csv_path, md_path = run_table(spec, device, kinds, results_dir,
                                             MeasurementCache(enabled=not no_cache), show_progress=not quiet,
                                             rows=_rows(spec, rows), protocol_overrides=timing)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/] nothing written for {spec.id}; finished measurements are "
                      "cached, so running the command again resumes")
        sys.exit(130)
    counts = frame["status"].value_counts().to_dict()
    console.print(f"{spec.id}: wrote {csv_path} and {md_path.name} — " +
                  ", ".join(f"{v} {k}" for k, v in counts.items()), highlight=False)
    return md_path


@main.command()
@click.argument("table_id")
@click.option("--columns", help="comma-separated: params,macs,throughput,accuracy,settings (default: all)")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]")
@click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)")
@click.option("--no-cache", is_flag=True, help="measure again instead of reusing cached measurements")
@click.option("--quiet", is_flag=True, help="no progress bars, no table printout")
@click.option("--rows", help="comma-separated row ids: measure only these (the other rows' results are kept)")
@click.option("--runs", type=click.IntRange(min=1), help="timed passes (or seconds) per repeat instead of the protocol's")
@click.option("--repeats", type=click.IntRange(min=1), help="timings per model instead of the protocol's")
@click.option("--warmup", type=click.IntRange(min=0), help="warm-up passes (or seconds) instead of the protocol's")
@click.option("--weights", "weights_dir", type=click.Path(path_type=Path), default=None,
              help="folder of released weights (recipes/weights.yaml): evaluate the rows whose file is there first")
@click.option("--data", default=None, help="ImageNet-1k root (validation/ folder), with --weights")
def table(table_id, columns, device, results_dir, no_cache, quiet, rows, runs, repeats, warmup, weights_dir, data):
    """Measure TABLE_ID (e.g. riformer-6) and print it beside the paper."""
    device = _device(device)
    if weights_dir:
        _evaluate_released(table_id, weights_dir, data)
    md_path = _run_one(table_id, columns, device, results_dir, no_cache, quiet, rows,
                       dict(runs=runs, repeats=repeats, warmup=warmup))
    if not quiet:
        out.print(Markdown(md_path.read_text()))


@main.command("all-tables")
@click.option("--columns", help="comma-separated column kinds (default: all)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--results-dir", type=click.Path(path_type=Path))
@click.option("--no-cache", is_flag=True)
def all_tables(columns, device, results_dir, no_cache):
    """Every registered table at this machine's scale (a second run reuses cached measurements)."""
    device = _device(device)
    for table_id in table_ids():
        _run_one(table_id, columns, device, results_dir, no_cache, quiet=False)


def _evaluate_released(table_id, weights_dir, data):
    from reproduce import weights
    from reproduce.engine import EngineError

    if not data:
        raise SuiteError("--weights needs --data /path/to/imagenet (the validation set to evaluate on)")
    if not Path(weights_dir).is_dir():
        raise SuiteError(f"weights folder {weights_dir} does not exist")
    spec = _spec(table_id)
    try:
        done = weights.evaluate_table(spec, weights_dir, data, echo=lambda line: console.print(line, highlight=False))
    except (weights.WeightsError, EngineError) as err:
        raise SuiteError(str(err)) from None
    console.print(f"{spec.id}: evaluated {len(done)} row(s) from released weights in {weights_dir}", highlight=False)


@main.command("weights")
@click.argument("table_ids", nargs=-1)
@click.option("--weights", "weights_dir", type=click.Path(path_type=Path), default=Path("weights"), show_default=True,
              help="the folder that holds (or will hold) the released files")
@click.option("--download", is_flag=True, help="fetch the missing files (needs a network)")
def weights_command(table_ids, weights_dir, download):
    """What released weights each table needs (recipes/weights.yaml) and what the folder holds."""
    from reproduce import weights

    ids = [_table_id(t) for t in table_ids] or weights.tables()
    grid = Table("table", "row", "release", "file", "in folder")
    missing = []
    for table_id in ids:
        spec = _spec(table_id)
        for row in spec.rows:
            release = weights.release_of(table_id, row)
            if release is None:
                why = weights.why_none(table_id, row)
                if why:
                    grid.add_row(table_id, row, "none", why[:60] + ("…" if len(why) > 60 else ""), "")
                continue
            try:
                state = "✓" if weights.find(release, weights_dir) else "missing"
            except weights.WeightsError as err:
                state = f"[red]{err}[/]"
            if state == "missing":
                missing.append(release)
            grid.add_row(table_id, row, f"{release.project}", release.local_name, state)
    out.print(grid)
    if download:
        for release in {r.name: r for r in missing}.values():
            try:
                weights.download(release, weights_dir)
                console.print(f"downloaded {release.local_name}", highlight=False)
            except weights.WeightsError as err:
                raise SuiteError(str(err)) from None


def _device(device: str) -> str:
    try:
        return measure.resolve_device(device)
    except measure.MeasureError as e:
        raise SuiteError(str(e)) from None


@main.command()
@click.argument("table_ids", nargs=-1)
@click.option("--all", "all_results", is_flag=True, help="every table with committed results, every device")
@click.option("--results-dir", type=click.Path(path_type=Path))
@click.option("--remeasure", is_flag=True, help="also measure params and MACs again and compare")
def diff(table_ids, all_results, results_dir, remeasure):
    """Check results against the reference; exit 1 on a new mismatch, drift or a missing result."""
    from reproduce.checks import check_results, results_files

    if not table_ids and not all_results:
        raise SuiteError("name a table id (e.g. riformer-6) or pass --all")
    ids = [_table_id(t) for t in table_ids] or None
    files = results_files(ids, results_dir)
    if not files:
        raise SuiteError(f"no results for {', '.join(ids or ['any table'])}; run `reproduce table "
                         f"{(ids or ['<id>'])[0]}` first")
    failed = False
    for path in files:
        problems, warnings = check_results(path, remeasure=remeasure)
        for w in warnings:
            console.print(f"[yellow]warning[/] {path.parent.name}/{path.name}: {w}", highlight=False)
        for p in problems:
            console.print(f"[red]FAIL[/] {path.parent.name}/{path.name}: {p}", highlight=False)
        if not problems:
            console.print(f"[green]ok[/] {path.parent.name}/{path.name}", highlight=False)
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--img-size", default=224, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--form", type=click.Choice(measure.FORMS), default="train", show_default=True,
              help="deploy+fold also folds RIFormer's layer scales (beyond the paper)")
@click.option("--batch-size", default=None, type=int, help="default: the protocol's (CPU-scaled) batch")
@click.option("--runs", default=None, type=int)
@click.option("--repeats", default=None, type=int)
@click.option("--protocol", default="riformer", show_default=True, help="recipes/protocols/<name>.yaml")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--channels-last", is_flag=True)
@click.option("--compile", "use_compile", is_flag=True)
def bench(models, img_size, device, form, batch_size, runs, repeats, protocol, dtype, channels_last, use_compile):
    """Throughput of MODELS (timm names) with the suite's harness."""
    from dataclasses import replace

    from reproduce.registry import load_protocol

    device = _device(device)
    try:
        proto = measure.Protocol.for_device(load_protocol(protocol), device, img_size)
    except RegistryError as e:
        raise SuiteError(str(e)) from None
    overrides = {k: v for k, v in dict(batch_size=batch_size, runs=runs, repeats=repeats, dtype=dtype).items() if v}
    proto = replace(proto, **overrides, channels_last=channels_last or proto.channels_last,
                    compile=use_compile or proto.compile)
    if proto.batch_size < 1:
        raise SuiteError("--batch-size must be at least 1")
    grid = Table("model", "form", "img/s (median)", "range", "batch", "params (M)")
    for name in models:
        try:
            model = measure.build_model(name, form=form)
        except (measure.ModelNotImplemented, measure.MeasureError) as e:
            raise SuiteError(str(e)) from None
        params = measure.count_params(model)
        try:
            result = measure.measure_throughput(model, img_size, proto, device)
        except measure.MeasureError as e:
            raise SuiteError(f"{name}: {e}") from None
        grid.add_row(name, form, f"{result['img_per_s']:.1f}", f"{result['min']:.1f}–{result['max']:.1f}",
                     str(result["batch_size"]), f"{params:.2f}")
    out.print(grid)
    env = measure.environment(device)
    console.print(f"{env['device']} · torch {env['torch']} · timm {env['timm']} · {proto.describe()}"
                  + ("" if proto.threads else f", {env['threads']} threads"), highlight=False)


# Commands that live with their subsystem.
from reproduce.engine.cli import dry_run_command, eval_command, train_command  # noqa: E402
from reproduce.figures import figure_command  # noqa: E402
from reproduce.plan import plan_command  # noqa: E402

main.add_command(train_command, "train")
main.add_command(eval_command, "eval")
main.add_command(dry_run_command, "dry-run")
main.add_command(figure_command, "figure")
main.add_command(plan_command, "plan")

if __name__ == "__main__":
    main()
