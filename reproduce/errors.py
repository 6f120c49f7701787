"""The suite's one-line errors, shared by every command module (below the CLI, above nothing).

`SuiteError` is what a command raises for bad input: one line naming the thing to fix, exit code 2,
never a traceback. `table_id` and `device` turn the lower layers' own errors into it.
"""
from __future__ import annotations

import click
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the width


class SuiteError(click.ClickException):
    """A one-line error that names the thing to fix; exit code 2."""

    exit_code = 2

    def show(self, file=None):
        console.print(f"[bold red]error:[/] {self.message}", highlight=False)


def table_id(value: str) -> str:
    """A table id as the registry spells it, or a SuiteError naming the unknown id."""
    from reproduce.registry import RegistryError, resolve_table_id
    try:
        return resolve_table_id(value)
    except RegistryError as e:
        raise SuiteError(str(e)) from None


def device(value: str):
    """The device a command runs on, resolved once here (a reproduce.device.Device, passed down), or a
    SuiteError."""
    from reproduce import measure
    from reproduce.device import resolve
    try:
        return resolve(value)
    except measure.MeasureError as e:
        raise SuiteError(str(e)) from None
