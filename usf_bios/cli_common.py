"""What the `usf-bios` commands of this host share: the consoles, the storage layout, a one-line failure."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from usf_bios.settings import get_settings
from usf_bios.storage import StorageLayout

console = Console()
err_console = Console(stderr=True)


def layout() -> StorageLayout:
    return StorageLayout.from_settings(get_settings())


def fail(message: str, code: int = 2) -> typer.Exit:
    """A one-line error on stderr, and the exit to raise (status ``code``)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
