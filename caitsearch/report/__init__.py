"""Reports of search runs: the latency-accuracy plot, per-block schedules, candidate tables and the
environment, as self-contained HTML, Markdown with PNGs, and CSV/Parquet/JSON; and run comparisons."""
from .load import Run, load_run, pareto_mask, trials_from_storage
from .render import FORMATS, candidates_table, compare_table, parse_formats, write_compare, write_report

__all__ = ["FORMATS", "Run", "candidates_table", "compare_table", "load_run", "pareto_mask", "parse_formats",
           "trials_from_storage", "write_compare", "write_report"]
