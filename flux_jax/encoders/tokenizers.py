"""Flux's two tokenizers: loading from local directories, tokenizing as Flux does, and tiny offline builds.

Loading never touches the network (`local_files_only=True`): point it at the `tokenizer/` and
`tokenizer_2/` folders of a FLUX.1 download, or at the tiny tokenizers `build_tiny_tokenizers`
writes for tests and demos.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers is imported inside the functions: it takes seconds to import, and importing
# `flux_jax.encoders` for the VAE or the text models should not pay for it.


class _NoTorchAdvice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found. Models won't be available ..." warning: the
    tokenizers are all flux-jax takes from transformers, and they need no PyTorch. Nothing else is filtered."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found.")


# The filter goes on transformers' library logger (the one that warning is logged on) before transformers is first
# imported; installed once per process.
_transformers_logger = logging.getLogger("transformers")
if not any(isinstance(f, _NoTorchAdvice) for f in _transformers_logger.filters):
    _transformers_logger.addFilter(_NoTorchAdvice())

T5_MAX_LENGTH = 512  # FLUX.1-dev and diffusers' default; BFL uses 256 for schnell
CLIP_MAX_LENGTH = 77

# Enough distinct words for a demo; every other word falls back to characters.
DEFAULT_CORPUS: tuple[str, ...] = (
    "a photo of a cat",
    "a photo of a dog",
    "a painting of a red house by the sea",
    "portrait of a woman with blue eyes",
    "a small green robot on a wooden table",
)
# T5 reserves these three ids; T5TokenizerFast relies on the order.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_SPACE = "\u2581"  # SentencePiece's word-start marker
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_WORD_END = "</w>"


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Token ids and attention mask, both [B, max_length] int32."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def load_t5_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The T5 tokenizer in a local directory (FLUX.1 `tokenizer_2/`)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(path), local_files_only=True)


def load_clip_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The CLIP tokenizer in a local directory (FLUX.1 `tokenizer/`)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int) -> Tokens:
    # Exactly the call diffusers' FluxPipeline makes: pad every prompt to max_length, truncate longer ones.
    enc = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    return Tokens(enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32))


def tokenize_t5(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int = T5_MAX_LENGTH) -> Tokens:
    """Flux T5 tokenization: `</s>` appended, `<pad>` (id 0) to max_length, truncation on."""
    return _tokenize(tokenizer, prompts, max_length)


def tokenize_clip(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int = CLIP_MAX_LENGTH
) -> Tokens:
    """Flux CLIP tokenization: start/end-of-text around the prompt, padded (with end-of-text) to 77."""
    return _tokenize(tokenizer, prompts, max_length)


# --------------------------------------------------------------------------------------------------
# Tiny offline tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table; CLIP's vocabulary starts with these, in this order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    # Dict order matters (it is the vocabulary order): printable bytes first, then the rest, each
    # of those mapped past U+0100 so no symbol is whitespace or a control character.
    table = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in table]
    for n, b in enumerate(rest):
        table[b] = chr(256 + n)
    return table


def _t5_words(corpus: Sequence[str]) -> list[str]:
    return [w for text in corpus for w in text.split()]


def _clip_words(corpus: Sequence[str]) -> list[str]:
    # Approximates CLIP's pre-tokenizer split (letter runs, single digits, punctuation runs) after
    # its lowercasing, so that merges are built for the pieces the tokenizer will actually see.
    return [w for text in corpus for w in re.findall(r"[^\W\d_]+|\d|[^\w\s]+", text.lower())]


def build_tiny_t5_tokenizer(out_dir: str | Path, corpus: Sequence[str] = DEFAULT_CORPUS) -> Path:
    """A T5-style Unigram tokenizer: specials <pad>=0, </s>=1, <unk>=2, the corpus words, single characters.

    Word pieces score by log frequency and characters far below, so corpus words stay whole and
    anything else is spelled out; characters never seen map to <unk>.
    """
    counts = collections.Counter(_t5_words(corpus))
    total = sum(counts.values())
    chars = sorted({c for w in counts for c in w})
    vocab = [(s, 0.0) for s in _T5_SPECIALS] + [(_T5_SPACE, -2.0)]
    vocab += [(_T5_SPACE + w, math.log(n / total)) for w, n in sorted(counts.items())]
    vocab += [(c, -20.0) for c in chars]
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    out = Path(out_dir)
    tok.save_pretrained(str(out))
    return out


def build_tiny_clip_tokenizer(out_dir: str | Path, corpus: Sequence[str] = DEFAULT_CORPUS) -> Path:
    """A CLIP-style byte-level BPE: the 512 byte symbols (plain and word-final), merges that build each
    corpus word, then <|startoftext|> and <|endoftext|> last, as in CLIP (end-of-text has the largest
    id, which the legacy pooling rule relies on)."""
    byte_chars = _bytes_to_unicode()
    base = list(byte_chars.values())
    tokens = base + [c + _CLIP_WORD_END for c in base]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(_clip_words(corpus)):  # first-seen order
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += _CLIP_WORD_END
        # Merge left to right: every prefix becomes a token, so the word ends as one token.
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1], *symbols[2:]]
    tokens = list(dict.fromkeys(tokens)) + [_CLIP_BOS, _CLIP_EOS]
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    out = Path(out_dir)
    tok.save_pretrained(str(out))
    return out


def build_tiny_tokenizers(out_dir: str | Path, corpus: Sequence[str] = DEFAULT_CORPUS) -> tuple[Path, Path]:
    """Write tiny tokenizers to `out_dir/tokenizer` (CLIP) and `out_dir/tokenizer_2` (T5), FLUX.1's folder
    names, and return (clip_dir, t5_dir). No network access."""
    root = Path(out_dir)
    return (
        build_tiny_clip_tokenizer(root / "tokenizer", corpus),
        build_tiny_t5_tokenizer(root / "tokenizer_2", corpus),
    )
