"""Configuration of an exported NBP video generator (Hugging Face `PretrainedConfig`).

Written by nbp_mega's tools/convert_to_hf.py next to modeling_nbp.py; needs only torch and
transformers. Besides the architecture it holds the sequence layout the model was trained
with, as plain lists (nbp_mega.model.sequence.SequenceLayout, evaluated at export):

  input_source      [S] index of each input position into [prefix | fixed_ids | video]
  fixed_ids         the slots after the prefix (start block tokens, or BOV + middles)
  attention_ranges  [[first query, end, block_len, prefix_len], ...]: keys visible to query
                    p in a range: j < prefix_len if p < prefix_len, else j < the end of p's
                    block (blocks of block_len from prefix_len on)
  slot_index        [S] index among the non-video positions, -1 for video tokens
  input_coords      [S, 3] latent (t, h, w) of each input video token, -1 at slots
  block_order       [T*H*W] raster index of the video token at each block-order position
Token ids (embedding rows): video code c is id video_offset + c; start_token, class ids from
class_offset, null_token (classifier-free guidance) if any, text ids from text_offset (nbp_mega's
own models: video_offset 0, the others after the codes; an import of the published NBP
checkpoints: their order, e.g. UCF BOV 0, middles 1..15, text from 16, video from 32016). The
head's logits are over the video codes 0..vocab_size-1 only.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class NBPVideoConfig(PretrainedConfig):
    model_type = "nbp_video"

    def __init__(self, family: str = "gpt", layers: int = 2, hidden: int = 32, heads: int = 4,
                 ffn_hidden: int = 128, norm_eps: float = 1e-5, vocab_size: int = 64000,
                 embed_vocab: int = 64001, position: str = "learned_1d",
                 max_positions: int = 5120, rope_theta: float = 10000.0,
                 grid: list | None = None, block_shape: list | None = None,
                 prefix_len: int = 0, block_len: int = 16, target_offset: int = 0,
                 num_targets: int = 0, hybrid_start: bool = False, num_classes: int = 0,
                 text_len: int = 0, text_vocab: int = 0, start_token: int = 64000,
                 class_offset: int = 64001, null_token: int | None = None,
                 text_offset: int = 64001, video_offset: int = 0,
                 input_source: list | None = None,
                 fixed_ids: list | None = None, attention_ranges: list | None = None,
                 slot_index: list | None = None, input_coords: list | None = None,
                 block_order: list | None = None, **kwargs):
        self.family, self.layers, self.hidden, self.heads = family, layers, hidden, heads
        self.ffn_hidden, self.norm_eps = ffn_hidden, norm_eps
        self.vocab_size, self.embed_vocab = vocab_size, embed_vocab
        self.position, self.max_positions, self.rope_theta = position, max_positions, rope_theta
        self.grid, self.block_shape = list(grid or [5, 16, 16]), list(block_shape or [1, 1, 16])
        self.prefix_len, self.block_len = prefix_len, block_len
        self.target_offset, self.num_targets = target_offset, num_targets
        self.hybrid_start, self.num_classes = hybrid_start, num_classes
        self.text_len, self.text_vocab = text_len, text_vocab
        self.start_token, self.class_offset = start_token, class_offset
        self.null_token, self.text_offset = null_token, text_offset
        self.video_offset = video_offset
        self.input_source, self.fixed_ids = list(input_source or []), list(fixed_ids or [])
        self.attention_ranges = [list(r) for r in attention_ranges or []]
        self.slot_index, self.input_coords = list(slot_index or []), list(input_coords or [])
        self.block_order = list(block_order or [])
        # transformers' generic names
        kwargs.setdefault("num_hidden_layers", layers)
        kwargs.setdefault("hidden_size", hidden)
        kwargs.setdefault("num_attention_heads", heads)
        super().__init__(**kwargs)

    @property
    def seq_len(self) -> int:
        return len(self.input_source)
