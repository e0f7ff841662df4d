"""The Typer app every command module registers on, and the one-line error contract.

Bad input raises `CaitsearchError` (or a click usage error); `main` prints it as one line on
stderr and exits with code 2. Nothing the user can cause ends in a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
import typer

from ..console import err as console
from ..errors import CaitsearchError

app = typer.Typer(
    name="caitsearch",
    help=(
        "Hardware-aware compression of timm Vision Transformers with CAIT: ATME token merging and "
        "CDCP channel pruning, searched under a measured latency budget.\n\n"
        "Pipeline: inspect / bench a config -> profile the target -> search under a budget -> "
        "report -> export."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def emit_json(data: Any) -> None:
    """Machine-readable output for `--json`: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=1, default=float) + "\n")


def main() -> None:
    from ..measure import steady_allocator

    steady_allocator()  # before any tensor: timings then do not depend on the process's history
    try:
        app(standalone_mode=False)
    except CaitsearchError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("interrupted; finished work is kept and the same command resumes it.")
        sys.exit(130)
    except Exception as e:  # a bug: say so in one line, the traceback on request
        if os.environ.get("CAITSEARCH_DEBUG"):
            raise
        console.print(f"[red]internal error:[/red] {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                      "(set CAITSEARCH_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
