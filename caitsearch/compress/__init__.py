"""Compression: ATME token merging, CDCP channel pruning, and the compressed ViT that runs both."""
from .vit import CaitViT, compress, materialize, prune_channels

__all__ = ["CaitViT", "compress", "materialize", "prune_channels"]
