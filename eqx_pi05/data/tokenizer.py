"""PaliGemma SentencePiece tokenization of the prompt (openpi `models/tokenizer.py: PaligemmaTokenizer`).

The model file comes from a path the user gives; nothing is downloaded. `train_sentencepiece` builds a
tiny stand-in with PaliGemma's special ids (pad 0, eos 1, bos 2, unk 3) for the offline demo and tests.
"""

from __future__ import annotations

import io
import pathlib
import warnings
from collections.abc import Iterable

import numpy as np
import sentencepiece
from jaxtyping import Bool, Float, Int32

STATE_BINS = 256


def clean_prompt(text: str) -> str:
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: Float[np.ndarray, " s"]) -> np.ndarray:
    """Normalized state -> ints in 0..255 (values below -1 give -1), as openpi's pi05 prompt does."""
    return np.digitize(state, bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1


class Tokenizer:
    """SentencePiece processor + openpi's prompt format, padded to `max_len` with a mask."""

    def __init__(self, path: str | pathlib.Path, max_len: int, proto: bytes | None = None):
        """`proto`: the model's bytes (a checkpoint's stored copy); then `path` only names its origin."""
        path = pathlib.Path(path)
        if proto is None and not path.is_file():
            raise FileNotFoundError(f"tokenizer: no SentencePiece model at {path}")
        self.path, self.max_len = path, max_len
        self._proto = path.read_bytes() if proto is None else proto
        self._sp = _load(self._proto, path)

    @property
    def proto(self) -> bytes:
        """The SentencePiece model file's bytes: the tokenizer's identity."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos)

    def tokenize(
        self, prompt: str, state: Float[np.ndarray, " s"] | None = None
    ) -> tuple[Int32[np.ndarray, " l"], Bool[np.ndarray, " l"]]:
        """Token ids right-padded with 0 and their mask.

        Without `state` (pi05_libero): BOS + text + "\\n". With `state` (normalized, unpadded):
        BOS + "Task: {text}, State: {bins};\\nAction: " with the state in 256 bins over [-1, 1].
        """
        text = clean_prompt(prompt)
        if state is None:
            tokens = self.encode(text, add_bos=True) + self.encode("\n")
        else:
            bins = " ".join(map(str, discretize_state(state)))
            tokens = self.encode(f"Task: {text}, State: {bins};\nAction: ", add_bos=True)
        if len(tokens) > self.max_len:
            warnings.warn(
                f"prompt is {len(tokens)} tokens, more than max_token_len={self.max_len}: truncated "
                f"(prompt starts {text[:60]!r})",
                stacklevel=2,
            )
            tokens = tokens[: self.max_len]
        ids = np.zeros(self.max_len, np.int32)
        ids[: len(tokens)] = tokens
        return ids, np.arange(self.max_len) < len(tokens)

    def __getstate__(self):  # worker processes get the model bytes, not the C++ object
        return {"path": self.path, "max_len": self.max_len, "proto": self._proto}

    def __setstate__(self, state):
        self.path, self.max_len, self._proto = state["path"], state["max_len"], state["proto"]
        self._sp = _load(self._proto, self.path)


def _load(proto: bytes, path: pathlib.Path) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as err:
        raise ValueError(f"tokenizer: {path} is not a SentencePiece model: {err}") from None


def train_sentencepiece(texts: Iterable[str], path: str | pathlib.Path, vocab_size: int = 512) -> pathlib.Path:
    """Train a tiny SentencePiece model laid out like PaliGemma's, for offline demos and tests.

    Special ids match PaliGemma (pad 0, eos 1, bos 2, unk 3); "\\n" is one piece and no dummy
    prefix is added, as in the Gemma tokenizer; byte fallback means any prompt encodes without unk.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus gives fewer pieces than asked: take what there is
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        model_type="bpe",  # whole words on a corpus this small; unigram keeps mostly characters
        minloglevel=2,
    )
    path = pathlib.Path(path)
    path.write_bytes(model.getvalue())
    return path
