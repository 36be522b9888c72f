"""Text for conditioning: a sentencepiece tokenizer, and class names turned into text.

Legend: N texts; S fixed sequence length of `encode_fixed`.

Any sentencepiece `.model` file loads (e.g. the LLaMA tokenizer the NBP paper used: unk 0,
bos 1, eos 2, no pad), or `train_text_tokenizer` makes a small one from captions and class
names (unk 0, bos 1, eos 2, pad 3). The paper turned a UCF-101 class folder name into text by
splitting CamelCase and lower-casing ("ApplyEyeMakeup" -> "apply eye makeup"), then took
exactly 8 ids: special tokens added, truncated, padded with the EOS id (`encode_fixed`).

This module needs only sentencepiece and numpy (nothing else of nbp_mega.tokenizer).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable

import numpy as np

# Word boundaries inside an identifier: aB, ABc (end of an acronym), a1, 1a.
_BOUNDARY = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=\d)|"
                       r"(?<=\d)(?=[A-Za-z])")


class TextTokenizerError(ValueError):
    """A sentencepiece model that cannot be read or trained, or unusable text input."""


def class_name_to_text(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'YoYo' -> 'yo yo', 'playing_guitar' ->
    'playing guitar', 'Walk2Dogs' -> 'walk 2 dogs'; Kinetics names (already words, maybe
    with hyphens: 'three-legged race') are only lower-cased."""
    spaced = _BOUNDARY.sub(" ", name.replace("_", " "))
    return " ".join(spaced.split()).lower()


class TextTokenizer:
    """A sentencepiece model: encode / decode lists of texts, with its special ids."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise TextTokenizerError(f"text tokenizer {path!r} does not exist (expected a "
                                     f"sentencepiece .model file)")
        with open(path, "rb") as f:
            blob = f.read()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
        except (RuntimeError, OSError, TypeError) as e:
            raise TextTokenizerError(f"{path} is not a sentencepiece model ({e})") from None
        self.path = path
        self.name = os.path.basename(path)
        self._checksum = hashlib.sha256(blob).hexdigest()

    def checksum(self) -> str:
        """sha256 of the model file."""
        return self._checksum

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        """-1 when the model has no pad piece (the LLaMA tokenizer)."""
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, texts: list[str], *, add_bos: bool = False,
               add_eos: bool = False) -> list[list[int]]:
        """Token ids of each text (no special tokens unless asked)."""
        texts = _as_list(texts)
        ids = self._sp.encode(texts)
        return [([self.bos_id] if add_bos else []) + list(t) + ([self.eos_id] if add_eos else [])
                for t in ids]

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Texts of id lists (special ids are dropped)."""
        specials = {self.bos_id, self.eos_id, self.pad_id}
        return [self._sp.decode([int(i) for i in row if int(i) not in specials]) for row in ids]

    def encode_fixed(self, texts: list[str], length: int, *, pad_id: int | None = None
                     ) -> np.ndarray:
        """int32 [N, S] in the NBP paper's form (`fixed_text_ids`): bos + ids, truncated to S
        with no eos kept, right-padded with `pad_id` (default: the eos id)."""
        return np.stack([fixed_text_ids(ids, length, bos_id=self.bos_id, eos_id=self.eos_id,
                                        pad_id=pad_id) for ids in self.encode(texts)]) \
            if texts else np.zeros((0, length), dtype=np.int32)


def fixed_text_ids(ids, length: int, *, bos_id: int, eos_id: int,
                   pad_id: int | None = None) -> np.ndarray:
    """int32 [S] ids of one text (no special tokens, as stored in shards' .text.npy) in the
    paper's form, transformers' slow LlamaTokenizer with pad = eos, padding to max_length and
    truncation: [bos] + ids + [eos], truncated to S (so a text of S - 1 or more pieces keeps no
    eos), then right-padded with `pad_id` (default: eos)."""
    if length < 2:
        raise TextTokenizerError(f"text length {length}: expected >= 2 (bos and some text)")
    pad = eos_id if pad_id is None else pad_id
    row = ([bos_id] + [int(i) for i in ids] + [eos_id])[:length]
    out = np.full(length, pad, dtype=np.int32)
    out[: len(row)] = row
    return out


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        raise TextTokenizerError("encode takes a list of texts; wrap a single text as [text]")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TextTokenizerError(f"texts must be strings, got {type(bad[0]).__name__}")
    return texts


def train_text_tokenizer(texts: Iterable[str], path: str, *, vocab_size: int = 256,
                         model_type: str = "unigram") -> TextTokenizer:
    """Train a sentencepiece model on `texts` and write it to `path` (atomically).

    vocab_size is an upper bound: a small corpus (101 class names) gets fewer pieces rather
    than an error. unk 0, bos 1, eos 2, pad 3; deterministic for the same texts in order.
    """
    import sentencepiece as spm

    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise TextTokenizerError("no text to train a tokenizer on (all inputs empty)")
    if vocab_size < 8:
        raise TextTokenizerError(f"vocab_size {vocab_size}: expected >= 8 (4 special pieces "
                                 f"plus some text)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, hard_vocab_limit=False, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise TextTokenizerError(f"sentencepiece training failed: {e}") from None
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return TextTokenizer(path)
