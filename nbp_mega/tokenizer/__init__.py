"""Video tokenizers (the published NBP MAGVIT-v2-style causal 3D CNN with FSQ, and smaller
presets of the same code) and, for conditioning, text."""

from nbp_mega.tokenizer.fsq import FSQ
from nbp_mega.tokenizer.magvit2 import PRESETS, Magvit2, Magvit2Config
from nbp_mega.tokenizer.video import (
    TokenizerError,
    VideoTokenizer,
    load_video_tokenizer,
    save_video_tokenizer,
)

__all__ = ["FSQ", "PRESETS", "Magvit2", "Magvit2Config", "TokenizerError", "VideoTokenizer",
           "load_video_tokenizer", "save_video_tokenizer"]
