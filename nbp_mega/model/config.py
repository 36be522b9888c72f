"""Model configuration and the size table.

Sizes follow the paper's table (GPT-2 style layers, "LLaMA" sizes); `model.size` picks a row
and `model.layers/hidden/heads` (when non-zero) override it for ablations.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbp_mega.config_fields import ConfigError, option

# name: (layers, hidden, heads). Non-embedding params = layers * (12 d^2 + 13 d) for gpt.
SIZES = {
    "tiny": (4, 128, 4),  # CPU tests and the demo
    "small": (12, 768, 12),  # ~85M non-embedding: the ~100M throughput benchmark
    "700m": (24, 1536, 16),  # NBP-XL
    "1.2b": (24, 2048, 32),  # NBP-XXL
    "3b": (32, 3072, 32),  # NBP-3B
    "7b": (32, 4096, 32),  # LLaMA-7B's shape: 6.4B non-embedding with gpt layers
    "14b": (40, 5120, 40),  # LLaMA-13B / Qwen-14B's shape: 12.6B non-embedding (gpt)
}


@dataclass
class ModelConfig:
    family: str = option("gpt", "gpt: paper-faithful (LayerNorm, GELU, biases); "
                         "llama: RMSNorm, SwiGLU, no biases", choices=["gpt", "llama"])
    size: str = option("tiny", "row of the size table", choices=list(SIZES))
    layers: int = option(0, "transformer layers (0 = from model.size)", min=0)
    hidden: int = option(0, "model width d (0 = from model.size)", min=0)
    heads: int = option(0, "attention heads (0 = from model.size)", min=0)
    ffn_hidden: int = option(0, "MLP width (0 = 4d for gpt, 8d/3 rounded to 64 for llama)",
                             min=0)
    grid: list[int] = option([5, 16, 16], "latent token grid (T, H, W) of one clip")
    block_shape: list[int] = option([1, 1, 16], "block (T, H, W) in latent units; "
                                    "[1,1,1] = next-token prediction", min=1)
    vocab_size: int = option(64000, "video codebook size (token ids 0..vocab_size-1)", min=2)
    num_classes: int = option(0, "class-conditional: number of classes (0 = unconditional)",
                              min=0)
    class_tokens: int = option(1, "prefix tokens that carry the class id", min=1)
    text_len: int = option(0, "text-conditional: a prefix of this many text ids (bos + ids, "
                           "truncated, padded with eos; the paper's UCF models: 8); 0 = none",
                           min=0)
    text_vocab: int = option(0, "text tokenizer's vocabulary size (rows of the embedding for "
                             "text ids); needed with model.text_len > 0", min=0)
    text_bos_id: int = option(1, "text tokenizer's bos id (LLaMA's and ours: 1)", min=0)
    text_eos_id: int = option(2, "text tokenizer's eos id, also the text padding (2)", min=0)
    hybrid_start: bool = option(False, "the paper's UCF hybrid start: a BOV token, block 0 "
                                "generated token by token, then blocks (16 + 79 = 95 steps "
                                "for 5x16x16 rows); needs model.start_block=true")
    cond_dropout: float = option(0.0, "classifier-free guidance: training replaces a clip's "
                                 "class prefix by a learned no-condition token with this "
                                 "probability (0 = no such token)", min=0.0, max=1.0)
    id_layout: str = option("nbp_mega", "token id order of the embedding: nbp_mega (video codes "
                            "first, then the start, class, no-condition, text and middle ids) "
                            "or nbp (the published checkpoints': BOV, middles, class or text "
                            "ids, then video codes; tools/convert_from_nbp.py); see "
                            "model/sequence.py",
                            choices=["nbp_mega", "nbp"])
    start_block: bool = option(True, "a learned start block predicts block 0 (models the "
                               "whole clip); false = paper's K600 layout, block 0 is context")
    position: str = option("learned_1d", "learned_1d: table over sequence index (published "
                           "models); learned_3d: tables over (t,h,w); rope_3d: rotary on (t,h,w)",
                           choices=["learned_1d", "learned_3d", "rope_3d"])
    max_positions: int = option(5120, "rows of the learned 1-D position table", min=1)
    rope_theta: float = option(10000.0, "rotary base frequency", min=1.0)
    dropout: float = option(0.1, "dropout on embeddings, attention output and MLP output",
                            min=0.0, max=1.0)
    norm_eps: float = option(1e-5, "LayerNorm / RMSNorm epsilon", min=0.0)
    init_std: float = option(0.02, "std of the normal init of weights (biases start at 0)",
                             min=0.0)
    vocab_pad_multiple: int = option(128, "pad embedding/head rows to a multiple of this "
                                     "(must be divisible by parallel.tensor)", min=1)
    activation_checkpointing: bool = option(False, "recompute each layer in backward")
    loss_chunk: int = option(512, "the head and loss run over this many positions at a time "
                             "(the batch's targets flattened), recomputed in backward, so "
                             "the fp32 logits of a whole micro-batch never exist (0 = all "
                             "at once)", min=0)

    # Settings of how a run computes, not of the weights: a resume or train.init_from may
    # change them (dropout and init_std only the latter: they change the training itself).
    MEMORY_FIELDS = ("activation_checkpointing", "loss_chunk")
    NEW_RUN_FIELDS = (*MEMORY_FIELDS, "dropout", "init_std")

    def resolved(self) -> ModelConfig:
        """A copy with layers/hidden/heads/ffn_hidden filled in from the size table."""
        from dataclasses import replace

        layers, hidden, heads = SIZES[self.size]
        cfg = replace(self, layers=self.layers or layers, hidden=self.hidden or hidden,
                      heads=self.heads or heads)
        if not cfg.ffn_hidden:
            ffn = 4 * cfg.hidden if cfg.family == "gpt" else 64 * round(8 * cfg.hidden / 3 / 64)
            cfg = replace(cfg, ffn_hidden=ffn)
        return cfg

    def validate(self) -> None:
        for key in ("grid", "block_shape"):
            value = getattr(self, key)
            if len(value) != 3 or min(value) < 1:
                raise ConfigError(f"model.{key}={value}: expected 3 positive ints (T, H, W)")
        if self.cond_dropout and not (self.num_classes or self.text_len):
            raise ConfigError(f"model.cond_dropout={self.cond_dropout} needs a condition to "
                              "drop: set model.num_classes > 0 or model.text_len > 0 (or "
                              "cond_dropout=0)")
        if self.num_classes and self.text_len:
            raise ConfigError(f"model.num_classes={self.num_classes} and model.text_len="
                              f"{self.text_len}: a model is class- or text-conditional, not "
                              "both (the paper's UCF models give the class name as text)")
        if self.text_len and not self.text_vocab:
            raise ConfigError(f"model.text_len={self.text_len} needs model.text_vocab, the text "
                              "tokenizer's vocabulary size")
        if self.text_len and max(self.text_bos_id, self.text_eos_id) >= self.text_vocab:
            raise ConfigError(f"model.text_bos_id={self.text_bos_id} / text_eos_id="
                              f"{self.text_eos_id}: expected ids below model.text_vocab="
                              f"{self.text_vocab}")
        if self.id_layout == "nbp" and self.cond_dropout:
            raise ConfigError(f"model.id_layout=nbp with model.cond_dropout={self.cond_dropout}: "
                              "the published id layout has no no-condition token (their "
                              "guidance prepends a stored embedding instead); set "
                              "cond_dropout=0 or id_layout=nbp_mega")
        if self.hybrid_start and not self.start_block:
            raise ConfigError("model.hybrid_start=true models the whole clip from a BOV token: "
                              "it needs model.start_block=true")
        cfg = self.resolved()
        if cfg.hidden % cfg.heads:
            raise ConfigError(f"model.hidden={cfg.hidden} is not divisible by model.heads="
                              f"{cfg.heads}")
        if cfg.position == "rope_3d" and (cfg.hidden // cfg.heads) % 2:
            raise ConfigError(f"model.position=rope_3d needs an even head dim, got "
                              f"{cfg.hidden // cfg.heads} = model.hidden / model.heads")
