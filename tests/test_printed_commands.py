"""Every `reproduce ...` command the suite prints runs: results notes (CSV and Markdown, plan.md
included), README.md, docs/*.md and every command's --help text.

Each command goes through the CLI's own parsing (click resolves the subcommand, its options and
their types) and then the resolution the command does before any work: `train` resolves TABLE ROW
[--column] to a recipe file with the same `cell_run` the command calls, `eval`/`bench` name a model
timm can build, `table`/`weights`/`diff`/`plan` name tables (and column kinds) the registry knows,
`dry-run` names recipe files that exist, an `--output runs/T/R[--C]` names a cell's run folder.
Training itself is left to `make dry-run` (1-40 s a recipe at full size). A printed command that
fails here is a failing test (docs/training.md says how many there are)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Mentions of a command in prose, not lines to type (a name alone, an elided "…", an option named).
REFERENCES = {"reproduce table --weights"}
# Placeholders as the docs and notes write them -> real values (paths: see _substitute).
PLACEHOLDERS = {"TABLE": "sit-5", "ROW": "scratch", "COLUMN": "cait", "ID": "riformer-6", "T": "riformer-8",
                "<id>": "riformer-6"}
PATHS = {"/path/to/imagenet", "/imagenet", "DIR", "~/weights", "FILE", "ROOT", "ckpt.pth", "rsb_r50.pth"}
INLINE = re.compile(r"`(reproduce [^`]*)`")


def _commands_in_text(text: str) -> list[str]:
    """`reproduce ...` in backticks, and lines of code blocks that start with it (\\-continued)."""
    found = INLINE.findall(text)
    lines = text.splitlines()
    in_code = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        stripped = line.strip().removeprefix("$ ")
        if (in_code or line.startswith("  ")) and stripped.startswith("reproduce "):
            while stripped.endswith("\\") and i + 1 < len(lines):
                i += 1
                stripped = stripped[:-1] + " " + lines[i].strip()
            found.append(stripped)
    out = []
    for command in found:
        command = re.split(r"\s+#", command)[0].strip()
        out += [part.strip() for part in command.split("&&")]
    return [c for c in out if c.startswith("reproduce ")]


def _help_texts() -> list[str]:
    from reproduce.cli import main

    texts = []

    def walk(command, ctx):
        texts.append(command.get_help(ctx))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                walk(sub, click.Context(sub, info_name=name, parent=ctx))

    walk(main, click.Context(main, info_name="reproduce"))
    return texts


def _missing_file_hints() -> list[str]:
    """What `reproduce train` and `reproduce weights TABLE` say to get each recipe's teacher/init file."""
    from reproduce.engine.dryrun import how_to_get, needed_files, recipe_files
    from reproduce.engine.recipe import load_recipe

    paths = {path for recipe in recipe_files() for _, path in needed_files(load_recipe(recipe))}
    return [how_to_get(path) for path in sorted(paths)]


def printed_commands() -> dict[str, str]:
    """{command: where it is printed (first place)}."""
    sources: list[tuple[str, str]] = []
    for path in sorted((ROOT / "results").glob("*/*.csv")):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "note" in frame:
            sources += [(str(path.relative_to(ROOT)), note) for note in frame["note"]]
    for path in sorted((ROOT / "results").glob("*/*.md")) + [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        sources.append((str(path.relative_to(ROOT)), path.read_text()))
    sources += [("--help", text) for text in _help_texts()]
    sources += [("missing-file hints", text) for text in _missing_file_hints()]
    commands: dict[str, str] = {}
    for where, text in sources:
        for command in _commands_in_text(text):
            commands.setdefault(command, where)
    return commands


def is_reference(command: str) -> bool:
    words = command.split()
    return len(words) <= 2 or "…" in command or command in REFERENCES


def _substitute(argv: list[str], tmp: Path) -> list[str]:
    out = []
    for arg in argv:
        if arg in PATHS:
            arg = str(tmp / arg.strip("~/").replace("/", "_"))
        out.append(PLACEHOLDERS.get(arg, arg))
    return out


def validate(command: str, tmp: Path) -> None:
    """Raise (click.ClickException, EngineError, SuiteError, AssertionError) if COMMAND would not run."""
    from reproduce.cli import _kinds, _rows, _spec, main

    argv = _substitute(shlex.split(command)[1:], tmp)
    ctx = main.make_context("reproduce", list(argv))
    path, command_obj, args = [], main, ctx._protected_args + ctx.args
    while isinstance(command_obj, click.Group):
        name, command_obj, args = command_obj.resolve_command(ctx, args)
        path.append(name)
        ctx = command_obj.make_context(name, list(args), parent=ctx)
        args = ctx._protected_args + ctx.args if isinstance(command_obj, click.Group) else args
    params, name = ctx.params, path[0]
    if name == "train":
        from reproduce.engine.cells import cell_run

        recipe, _, _ = cell_run(params["table"], params["row"], params["column"], params["recipe_option"])
        assert recipe.is_file(), f"recipe {recipe} does not exist"
    elif name in ("eval", "bench"):
        import timm

        import riformer  # noqa: F401  (registers the suite's models with timm)

        models = [params["model"]] if name == "eval" else params["models"]
        for model in models:
            assert timm.is_model(model), f"no model {model!r}"
        if name == "eval" and params["output"] is not None:
            from reproduce.engine.cells import cell_of_output

            output = Path(params["output"])
            cell = cell_of_output(ROOT / output if not output.is_absolute() else output)
            if cell["table"]:
                spec = _spec(cell["table"])
                assert cell["row"] in spec.rows, f"{output}: table {spec.id} has no row {cell['row']}"
                names = {spec.run_name(cell["row"], c) for c in spec.columns}
                assert output.name in names, f"{output} is no cell's run folder (those of the row: {sorted(names)})"
                row = spec.rows[cell["row"]]  # what provenance.accept asks of the result.json it writes
                assert params["img_size"] == row.img_size, f"--img-size {params['img_size']}: the row is at {row.img_size}"
                forms = {c.form or row.form for c in spec.columns.values() if spec.run_name(row.id, c.id) == output.name}
                form = "deploy" if params["deploy_form"] else "train"
                assert form in forms, f"evaluates the {form} form, the cell is the {forms.pop()} form"
    elif name == "table":
        spec = _spec(params["table_id"])
        _kinds(params["columns"])
        _rows(spec, params["rows"])
    elif name in ("submit", "jobs"):
        from reproduce.submit import pending_runs

        if params["table_id"]:
            spec = _spec(params["table_id"])
            if name == "submit":  # rows and column as submit reads them; a printed submit has a job to send
                runs, _ = pending_runs(spec, params["rows"], params["column"], params["include_released"])
                assert runs, f"{spec.id}: no pending cell of {params['rows'] or 'the table'} that a job trains"
    elif name in ("weights", "diff", "plan"):
        for table_id in params["table_ids"]:
            _spec(table_id)
    elif name == "dry-run":
        for recipe in params["recipes"]:
            assert (ROOT / recipe).is_file(), f"recipe {recipe} does not exist"


COMMANDS = printed_commands()
RUNNABLE = sorted(c for c in COMMANDS if not is_reference(c))


def test_the_suite_prints_commands_from_every_source():
    wheres = {where.split("/")[0] for where in COMMANDS.values()}
    assert {"results", "README.md", "docs", "missing-file hints"} <= wheres, wheres  # (no --help text prints one today)
    assert any(c.startswith("reproduce train sit-2 sit_ti") for c in RUNNABLE)  # the notes' headline cells
    assert len(RUNNABLE) >= 250, len(RUNNABLE)


@pytest.mark.parametrize("command", RUNNABLE)
def test_every_printed_command_runs(command, tmp_path):
    from reproduce.engine import EngineError
    from reproduce.errors import SuiteError

    try:
        validate(command, tmp_path)
    except (click.ClickException, EngineError, SuiteError, AssertionError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        pytest.fail(f"{command}\n  printed in {COMMANDS[command]}\n  fails: {message}")


def test_a_wrong_printed_command_fails(tmp_path):
    """The planted fault: the sit-2 note without --column for a per-column run, and a bad option."""
    from reproduce.engine import EngineError

    with pytest.raises(EngineError, match="no recipe of its own"):
        validate("reproduce train sit-5 scratch --column top1 --data /imagenet", tmp_path)
    with pytest.raises(EngineError, match="add --column"):
        validate("reproduce train sit-5 scratch --data /imagenet", tmp_path)
    with pytest.raises(click.ClickException):
        validate("reproduce table riformer-6 --colums accuracy", tmp_path)
    with pytest.raises(AssertionError, match="no cell's run folder"):
        validate("reproduce eval resnet50 --checkpoint FILE --data /imagenet --output runs/riformer-6/rsb_resnet50--top5",
                 tmp_path)
    with pytest.raises(AssertionError, match="the row is at 288"):  # an eval note without --img-size
        validate("reproduce eval sit_l --checkpoint FILE --data /imagenet --output runs/sit-2/sit_l", tmp_path)
