"""The Typer app every command module registers on, and the one error boundary of the command line.

`main` turns every way a command can end into an exit code and at most one line on stderr:
- bad input (`CaitsearchError`, or a usage error from Typer's bundled click): exit 2, one line;
- Ctrl-C: exit 130, one line (saying so where the same command resumes the work);
- a disk that is full or a file the user may not write: exit 2, one line naming the file;
- anything else is a bug: exit 1, one line naming a log file that holds the traceback
  (`CAITSEARCH_DEBUG=1` re-raises it instead).
Every message is printed literally: a user's path such as `runs/[bold]x` is never read as markup.
"""
from __future__ import annotations

import datetime
import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer._click import exceptions as typer_click

from ..console import log_error
from ..errors import CaitsearchError, reason
from ..io import to_json

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

# typer 0.29 bundles its own click; the standalone one is kept for code that raises its exceptions
USAGE_ERRORS = (typer_click.UsageError, click.UsageError)
CLICK_ERRORS = (typer_click.ClickException, click.ClickException)
EXITS = (typer.Exit, click.exceptions.Exit)
ABORTS = (typer.Abort, click.exceptions.Abort, KeyboardInterrupt)
# OSErrors that are the machine's or the user's doing (full disk, permissions), not a bug
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
INTERRUPTED = "interrupted."
RESUMES = "interrupted; run the same command again to resume."

_interrupted_message = INTERRUPTED


def resumable() -> None:
    """Called by a command whose finished work survives Ctrl-C (profile, search, train), so the
    interrupt line tells the user that the same command resumes it."""
    global _interrupted_message
    _interrupted_message = RESUMES


def emit_json(data: Any) -> None:
    """Machine-readable output for `--json`: one standard JSON document on stdout (NaN as null)."""
    sys.stdout.write(to_json(data))


def main(args: Optional[list[str]] = None) -> None:
    from ..measure import steady_allocator

    steady_allocator()  # before any tensor: timings then do not depend on the process's history
    sys.exit(run(args))


def run(args: Optional[list[str]] = None) -> int:
    """Run the command line once and return its exit code, having printed at most one line of error."""
    try:
        result = app(args=args, prog_name="caitsearch", standalone_mode=False)
    except CaitsearchError as e:
        log_error(str(e))
        return 2
    except typer_click.NoArgsIsHelpError:  # the help is printed already
        log_error("no command given; pick one of the commands above.")
        return 2
    except USAGE_ERRORS as e:
        log_error(f"{e.format_message()}{_given(e)} ({_help_hint(e)})")
        return 2
    except CLICK_ERRORS as e:
        log_error(e.format_message())
        return 2
    except EXITS as e:
        return int(e.exit_code or 0)
    except ABORTS:
        log_error(_interrupted_message, prefix="")
        return 130
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            return _internal_error(e)
        log_error(f"cannot use {e.filename}: {e.strerror}." if e.filename else f"{e.strerror}.")
        return 2
    except Exception as e:  # a bug: one line, the traceback in a file for the report
        return _internal_error(e)
    if result == 130:  # typer turns Ctrl-C inside a command into Exit(130), returned without standalone mode
        log_error(_interrupted_message, prefix="")
        return 130
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


def _given(e: Exception) -> str:
    """`, not '0'`: the value a type check refused (typer's messages leave it out)."""
    errors = getattr(e.__cause__, "errors", None)  # a pydantic ValidationError behind typer's BadParameter
    try:
        values = [item["input"] for item in errors()] if callable(errors) else []
    except (TypeError, KeyError):
        values = []
    shown = [repr(v) for v in values if isinstance(v, (str, int, float))]
    return f", not {' '.join(shown)}" if shown and len(shown) == len(values) else ""


def _help_hint(e: Exception) -> str:
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "caitsearch"
    return f"see '{command} --help'"


def _internal_error(e: BaseException) -> int:
    if os.environ.get("CAITSEARCH_DEBUG"):
        raise e
    path = write_crash_log(e)
    where = f"the traceback is in {path}" if path else "set CAITSEARCH_DEBUG=1 for the traceback"
    first = reason(e) if str(e).strip() else ""
    log_error(f"{type(e).__name__}: {first} (a bug in caitsearch; {where}; please report it).", prefix="internal error")
    return 1


def crash_dirs() -> list[Path]:
    """Where tracebacks go: $XDG_CACHE_HOME/caitsearch (~/.cache/caitsearch), else the temp dir."""
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return [base / "caitsearch", Path(tempfile.gettempdir())]


def write_crash_log(e: BaseException) -> Optional[Path]:
    """The traceback, the command and the versions in a new file; None if nowhere is writable."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("caitsearch")
    except PackageNotFoundError:
        __version__ = "(not installed)"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"caitsearch {__version__}, Python {sys.version.split()[0]}\ncommand: {sys.argv}\n\n"
            + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    for directory in crash_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"caitsearch-error-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return None
