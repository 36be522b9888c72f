"""The NBP video-token transformer."""

from nbp_mega.model.config import SIZES, ModelConfig
from nbp_mega.model.sequence import SequenceLayout
from nbp_mega.model.transformer import NBPTransformer

__all__ = ["SIZES", "ModelConfig", "NBPTransformer", "SequenceLayout"]
