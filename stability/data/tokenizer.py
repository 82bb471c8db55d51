"""Tokenizers: SentencePiece BPE with byte fallback (ours, and its training recipe), or a
Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), behind one interface.

`open_tokenizer(path)` picks by the file: a `.json` file is a `HFTokenizer`, anything else a
SentencePiece `Tokenizer`; a folder means its `tokenizer.json`, else its `tokenizer.model`.

Byte fallback means a character outside the learned vocabulary is written as its UTF-8 bytes
(`<0xE3>` ...), so no text, Japanese included, ever becomes the unknown token. Normalization is
off (identity) and no dummy prefix is added, so `decode(encode(text)) == text` for any string.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

UNK_ID, BOS_ID, EOD_ID, PAD_ID = 0, 1, 2, 3
"""Fixed special ids of every tokenizer trained by `train_tokenizer`."""

DEFAULT_VOCAB_SIZE = 8192

# Settings shared by every training run; `train_tokenizer` adds input, prefix and vocab size.
# One thread and no sampling make the result a pure function of the input sentences.
TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "character_coverage": 0.9995,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "max_sentence_length": 16384,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "num_threads": 1,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOD_ID,
    "pad_id": PAD_ID,
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "pad_piece": "<pad>",
    "minloglevel": 2,
}


class Tokenizer:
    """A SentencePiece model with the interface megatron-core's `GPTDataset` expects.

    Args:
        model_path: Path of a SentencePiece `.model` file.

    Raises:
        FileNotFoundError: When `model_path` does not exist.
        ValueError: When the model is not a byte-fallback model with an end-of-document piece.
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
        self.model_path = path
        self._load(path.read_bytes())

    def _load(self, model_bytes: bytes) -> None:
        self._model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer {str(self.model_path)!r} has no end-of-document piece")
        if self._sp.piece_to_id("<0xE3>") == self._sp.unk_id():
            raise ValueError(
                f"tokenizer {str(self.model_path)!r} has no byte-fallback pieces; "
                "train it with byte_fallback=True"
            )

    # Pickling keeps the model bytes, so DataLoader workers can be spawned as well as forked.
    def __getstate__(self) -> dict[str, object]:
        return {"model_path": self.model_path, "model_bytes": self._model_bytes}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.model_path = state["model_path"]
        self._load(state["model_bytes"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and byte pieces included."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id, appended after every document in the indexed dataset."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        """Alias of `eod` (megatron-core checks both)."""
        return self.eod

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id (not inserted by this pipeline)."""
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """Padding id; never produced by `encode`, so megatron can mask it out safely."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        """Unknown id; never produced by `encode` thanks to byte fallback."""
        return self._sp.unk_id()

    @property
    def unique_identifiers(self) -> OrderedDict[str, object]:
        """What identifies this tokenizer in megatron-core's dataset cache keys."""
        return OrderedDict([("class", "stability.data.Tokenizer"), ("sha256", self.sha256)])

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text` (no BOS/EOD added)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Returns the token ids of each text; SentencePiece spreads the work over all cores."""
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; byte pieces are reassembled into characters."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """Returns the vocabulary piece of one id, e.g. '▁the' or '<0x0A>'."""
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def train_tokenizer(sentences: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Trains a byte-fallback BPE SentencePiece model; byte-identical for the same sentences.

    Args:
        sentences: Training lines (paragraphs); they must not contain newlines.
        vocab_size: Number of ids in the result, special and 256 byte pieces included.

    Returns:
        The serialized model: write it to a `.model` file and load it with `Tokenizer`.
    """
    if vocab_size < 512:
        raise ValueError(f"vocab_size={vocab_size} is too small: at least 512 (256 byte pieces)")
    # Writing to memory keeps the output path out of the model's stored trainer spec.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        **TRAINER_SETTINGS,
    )
    return model.getvalue()


EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
"""End-of-document tokens looked for when no tokenizer_config.json names ``eos_token``."""


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` with the interface of `Tokenizer` (for megatron-core's
    `GPTDataset` and for `preprocess`).

    The special tokens come from the ``tokenizer_config.json`` beside it (``eos_token``,
    ``bos_token``, ``pad_token``, ``unk_token``, as transformers saves them), else the end of
    document is the first of `EOS_CANDIDATES` in the vocabulary. ``split_special_tokens: true``
    there makes special tokens written in the text encode as text (as SentencePiece does);
    otherwise they become their ids, as in transformers. `encode` adds no special token.

    Args:
        path: Path of a ``tokenizer.json`` file.

    Raises:
        FileNotFoundError: When `path` does not exist.
        ValueError: When the file does not load or no end-of-document token is found.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist")
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.model_path = path
        self._load(path.read_bytes(), config)

    def _load(self, data: bytes, config: dict[str, Any]) -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as error:  # pragma: no cover - an install without the hf extra
            raise ValueError("reading a tokenizer.json needs the tokenizers package "
                             "(pip install 'stability[hf]')") from error
        self._data, self._config = data, config
        try:
            self._tok = Backend.from_str(data.decode("utf-8"))
        except Exception as error:  # tokenizers raises its own Exception type
            raise ValueError(f"tokenizer {str(self.model_path)!r} does not load: "
                             f"{error}") from error
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._special = {name: self._token_id(config.get(f"{name}_token"))
                         for name in ("eos", "bos", "pad", "unk")}
        if self._special["eos"] is None:
            found = [t for t in EOS_CANDIDATES if self._tok.token_to_id(t) is not None]
            self._special["eos"] = self._tok.token_to_id(found[0]) if found else None
        if self._special["eos"] is None:
            raise ValueError(f"tokenizer {str(self.model_path)!r} has no end-of-document "
                             f"token: no eos_token in tokenizer_config.json and none of "
                             f"{', '.join(EOS_CANDIDATES)}")
        specials = json.dumps(self._special, sort_keys=True).encode()
        split = b"split" if self._tok.encode_special_tokens else b""
        self.sha256 = hashlib.sha256(data + specials + split).hexdigest()

    @property
    def json(self) -> str:
        """The tokenizer.json text."""
        return self._data.decode("utf-8")

    @property
    def split_special_tokens(self) -> bool:
        """Special tokens written in the text encode as text (tokenizer_config.json's
        ``split_special_tokens``)."""
        return bool(self._tok.encode_special_tokens)

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, dict):  # {"content": "</s>", ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def __getstate__(self) -> dict[str, object]:
        return {"model_path": self.model_path, "data": self._data, "config": self._config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_path = state["model_path"]
        self._load(state["data"], state["config"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """End-of-document id (the eos token), appended after every document."""
        return self._special["eos"]

    @property
    def eos(self) -> int:
        """Alias of `eod`."""
        return self.eod

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence id, or None (not inserted by this pipeline)."""
        return self._special["bos"]

    @property
    def pad(self) -> int:
        """Padding id; -1 when the tokenizer has none (megatron then masks nothing)."""
        return self._special["pad"] if self._special["pad"] is not None else -1

    @property
    def unk(self) -> int | None:
        """Unknown id, or None."""
        return self._special["unk"]

    @property
    def unique_identifiers(self) -> OrderedDict[str, object]:
        """What identifies this tokenizer in megatron-core's dataset cache keys."""
        return OrderedDict([("class", "stability.data.HFTokenizer"), ("sha256", self.sha256)])

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text` (no special token added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Returns the token ids of each text (spread over the cores by tokenizers)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids` (special tokens kept)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        """Returns the vocabulary token of one id."""
        return self._tok.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file ``path`` names: a shipped tokenizer's name (``sample``,
    ``sample-2k``), a file, or in a folder its ``tokenizer.json``, else its
    ``tokenizer.model``."""
    from stability.data.sample import SAMPLE_TOKENIZERS

    if str(path) in SAMPLE_TOKENIZERS:
        return SAMPLE_TOKENIZERS[str(path)]
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
    return path


def open_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer of ``path`` (see `tokenizer_file`): `HFTokenizer` for a ``.json`` file,
    a SentencePiece `Tokenizer` otherwise."""
    file = tokenizer_file(path)
    return HFTokenizer(file) if file.suffix == ".json" else Tokenizer(file)
