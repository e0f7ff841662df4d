"""The `caitsearch` command line: one module per pipeline stage, all registered on one app."""
from . import core  # noqa: F401  (registers inspect, bench, export)
from . import report  # noqa: F401  (registers report, compare)
from . import profile  # noqa: F401  (registers profile, profile validate)
from . import search  # noqa: F401  (registers search)
from . import train  # noqa: F401  (registers train)
from .app import app, main

__all__ = ["app", "main"]
