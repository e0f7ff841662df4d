"""Which latency profile a command uses: the one given, else this machine's own CPU profile of the
model, built (or resumed, or topped up) on first use."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..console import log
from ..errors import CaitsearchError
from ..measure import default_threads
from ..models import ModelSpec
from .build import MANIFEST, build_profile, default_profile_path, own_folder, read_manifest
from .fingerprint import fingerprint
from .predictor import LatencyProfile


def find_profile(spec: ModelSpec, profile: Optional[Path] = None, threads: Optional[int] = None,
                 allow_foreign: bool = False, progress: bool = True, quick: bool = False) -> LatencyProfile:
    """The latency profile: the given one, else this machine's CPU profile of the model, built if
    missing. A default profile measured elsewhere (the committed ones, on another machine kind) is
    not used: this machine gets its own folder beside it, named by its fingerprint, profiled once.
    `quick` applies only to a profile built here from nothing."""
    if profile is not None:
        if not Path(profile).exists():
            raise CaitsearchError(f"profile {profile} does not exist; build one with `caitsearch profile`.")
        return _loaded(Path(profile), spec, allow_foreign)
    here = fingerprint("torch-cpu", default_threads(threads))
    default = default_profile_path(spec.name, spec.img_size, "torch-cpu", 32, "fp32")
    path = own_folder(default, here)
    if path != default:
        if allow_foreign and not (path / MANIFEST).is_file():
            return _loaded(default, spec, allow_foreign)  # the other machine's profile, as asked, over profiling this one
        if (default / MANIFEST).is_file():  # else the tagged folder is simply where this machine's profile lives
            log(f"{default} was measured on another machine; using this machine's own profile {path.name}")
    if (path / MANIFEST).is_file():  # ours: the same build resumes it or tops up rows a newer plan added
        manifest = read_manifest(path)
        threads, quick = manifest.get("threads"), bool(manifest.get("quick"))
        if not manifest.get("complete"):
            log(f"resuming the unfinished latency profile {path}")
    else:
        log(f"no latency profile for {spec.name} at {path}; profiling this machine first")
    build_profile(spec.name, img_size=spec.img_size, backend="torch-cpu", batch_size=32, dtype="fp32",
                  threads=threads, out=path, progress=progress, quick=quick)  # a no-op when nothing is missing
    return _loaded(path, spec, allow_foreign)


def _loaded(path: Path, spec: ModelSpec, allow_foreign: bool) -> LatencyProfile:
    prof = LatencyProfile.load(path, allow_foreign=allow_foreign)
    prof.check_model(spec)
    return prof
