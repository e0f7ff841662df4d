"""caitsearch: hardware-aware CAIT compression (ATME + CDCP) of timm Vision Transformers."""
from .compress import CaitViT, compress, materialize
from .config import BlockConfig, CompressionConfig
from .errors import CaitsearchError, ConfigError
from .models import ModelSpec, create_model

__version__ = "0.1.0"
__all__ = [
    "BlockConfig", "CaitViT", "CaitsearchError", "CompressionConfig", "ConfigError", "ModelSpec",
    "compress", "create_model", "materialize",
]
