"""Compression: ATME token merging, CDCP channel pruning (static and dynamic), ToMe, and the compressed ViT that runs them."""
from .dynamic import DynamicMasks
from .vit import CaitViT, compress, is_compressed_state, load_materialized, materialize, prune_channels

__all__ = ["CaitViT", "DynamicMasks", "compress", "is_compressed_state", "load_materialized", "materialize",
           "prune_channels"]
