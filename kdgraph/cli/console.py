"""The CLI's terminal output and error handling: rich consoles, and the command group that turns every
:class:`~kdgraph.errors.KDGraphError` (and an OS error no kdgraph code caught) into exit code 2 and one
paragraph on stderr, without a traceback."""
from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..errors import KDGraphError

__all__ = ["console", "plain_console", "KDGraphGroup"]


def console(stderr: bool = False):
    """A console for tables: coloured on a terminal; plain and 120 columns wide when piped or with ``NO_COLOR``."""
    from rich.console import Console

    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else 120,
                   no_color=not tty or bool(os.environ.get("NO_COLOR")))


def plain_console():
    """rich's own defaults, no highlighting (what ``train``, ``eval`` and ``bench`` print with)."""
    from rich.console import Console

    return Console(highlight=False)


class KDGraphGroup(click.Group):
    """Turns KDGraphError into exit 2 with a clean message (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        from rich.markup import escape

        try:
            return super().invoke(ctx)
        except KDGraphError as e:
            # escaped: a message's own brackets ("pip install 'kdgraph[timm]'") are text, not rich markup
            console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", markup=True, soft_wrap=True)
            sys.exit(2)
        except OSError as e:  # disk full, permissions, ... where no kdgraph code caught it first
            where = f" ({e.filename})" if e.filename else ""

            console(stderr=True).print(f"[bold red]error:[/] {escape(str(e.strerror or e))}{escape(where)}: the "
                                       f"operating system refused a file operation; check the path, permissions "
                                       f"and free space.", markup=True, soft_wrap=True)
            sys.exit(2)
