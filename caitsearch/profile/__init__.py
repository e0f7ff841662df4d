"""Hardware latency profiles of compressed ViTs and the predictor the search uses.

    path = build_profile("deit_small_patch16_224", backend="torch-cpu", batch_size=32)
    prof = LatencyProfile.load(path)
    prof.predict(config)  # ms per batch of the materialised compressed model
    Runtime.of_profile(prof.manifest).time_models({"dense": model, ...}, spec)  # timed as it was profiled
"""
from .backends import BACKENDS, check_backend
from .build import build_profile, default_profile_path
from .find import find_profile
from .predictor import LatencyProfile
from .runtime import Runtime
from .validate import validate_profile

__all__ = ["BACKENDS", "LatencyProfile", "Runtime", "build_profile", "check_backend", "default_profile_path", "find_profile",
           "validate_profile"]
