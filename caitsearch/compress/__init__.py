"""Compression: ATME token merging, CDCP channel pruning, and the compressed ViT that runs both."""
from .vit import CaitViT, compress, is_compressed_state, load_materialized, materialize, prune_channels

__all__ = ["CaitViT", "compress", "is_compressed_state", "load_materialized", "materialize", "prune_channels"]
