"""`gnsrepro prepare`: tokenise a corpus into data_dir/<name>/{train.bin,val.bin,meta.json}.

Data flow: a source yields documents (str) in a fixed order -> each document is assigned to train or val by
a hash of its content -> worker processes tokenise chunks of documents with GPT-2 BPE, appending EOT after
each (nanoGPT's convention) -> the parent writes uint16 tokens to both files as results arrive, in order, so
memory stays bounded however large the corpus is.

Validation split: a document goes to val iff the first 8 bytes of blake2b(its UTF-8 bytes), read as a
fraction of 2**64, are below `val_fraction`. Depending only on the content, the split is the same whatever
the corpus order, a byte budget or added files, and duplicated documents never straddle train and val. If no
document hashes into val, the last document goes there, so val is never empty (only this fallback can put a
copy of a training document in val).

Vocabulary limit (data.vocab_limit=V, the tiny scale's): after tokenising, the V - 1 most frequent GPT-2 ids of
the train split (ties by the lower id; EOT always among them) become ids 0..V-2 in order of frequency and every
other id becomes V - 1, the rare token; val is mapped with the train split's table. Such a set lives in its own
directory, data_dir/<name>-v<V> (`dataset_dir`), and its meta.json lists the kept GPT-2 ids ("vocab"), which
`decode` reads. A model then needs only V output rows instead of GPT-2's 50257: on a CPU the output head and its
cross-entropy are most of a tiny model's step (docs/benchmarks.md, "The tiny scale's vocabulary").

Atomicity: files are written to a staging directory and renamed into place, meta.json last; meta.json is
the marker of a complete data set, and `verify` checks the files against the sizes and hashes it records.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gnsrepro.config import DataConfig
from gnsrepro.data.tokenizer import EOT, TOKENIZER_NAME, get_tokenizer

DATA_NAMES = ("pycode", "openwebtext", "textdir")
DTYPE = np.uint16
FULL_HASH_LIMIT = 2 * 1024**3  # verify() hashes files below this size by default; above it, sizes only
_CHUNK_BYTES = 1 << 20  # text per task sent to a worker: large enough to amortise IPC, small enough to stream
_CHUNKS_IN_FLIGHT_PER_PROC = 4  # bounds memory: the pool never holds more than this many chunks per worker
_PARQUET_BATCH_ROWS = 1024
_STAGING_PREFIX = ".prepare-"
GPT2_VOCAB = EOT + 1  # GPT-2 BPE's token ids are below this; data.vocab_limit takes 2 to this
_REMAP_BLOCK_TOKENS = 1 << 24  # tokens read at once when counting and mapping them for data.vocab_limit (32 MB)
_LIMITED_DIR = re.compile(r"^(?P<name>.+)-v(?P<limit>[0-9]+)$")  # dataset_dir's name of a vocabulary-limited set


class DataError(RuntimeError):
    """A data set that is missing, malformed or misconfigured; the message says how to fix it."""


def dataset_dir(cfg: DataConfig) -> Path:
    """The directory of cfg's prepared data set: data_dir/<name>, or data_dir/<name>-v<V> for data.vocab_limit=V,
    so that a vocabulary-limited set never replaces the full-vocabulary one (or one limited otherwise)."""
    return Path(cfg.data_dir) / (cfg.name if cfg.vocab_limit is None else f"{cfg.name}-v{cfg.vocab_limit}")


# ---------------------------------------------------------------------------------------------- sources


def _walk_sorted(root: Path, skip: set[Path] = frozenset()) -> Iterator[Path]:
    """Files under root in a fixed order: each directory's files by name, then its subdirectories by name.

    Hidden files and directories (.git, .venv, ...) and the directories in skip are skipped; symlinked
    directories are not followed.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and Path(dirpath) / d not in skip)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _read_utf8(path: Path) -> str | None:
    """The file's text, or None when it cannot be read or is not UTF-8 text (binary files contain NULs)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if "\x00" in text else text


# how pycode_documents picks its files (recorded in meta.json: a set made by another rule is rebuilt)
PYCODE_RULE = ("the Python version's standard library without the interpreter's own site-packages, then the "
               "environment's site-packages (sysconfig purelib, platlib) without editable-install finders, each "
               "walked in sorted order")


def pycode_documents(max_bytes: int) -> Iterator[str]:
    """The Python source files of the running interpreter: its standard library, then the environment's packages.

    Yields the longest prefix of that file list (sysconfig's 'stdlib', 'purelib', 'platlib', each walked in
    sorted order, duplicates by resolved path removed, unreadable or non-UTF-8 files skipped) whose UTF-8
    size fits in max_bytes. Present on every machine, so it needs no download. The base interpreter's own
    site-packages (and dist-packages), which sit inside 'stdlib' and hold whatever that machine installed
    there, are left out: the corpus is then set by the Python version and the environment's packages (for
    `make` the pinned requirements.lock), the same on every machine that builds the same environment.
    """
    if max_bytes <= 0:
        raise DataError(f"data.max_bytes must be positive, got {max_bytes}")
    paths = sysconfig.get_paths()
    roots = [Path(paths[key]) for key in ("stdlib", "purelib", "platlib")]
    return _pycode_iter([root for root in roots if root.is_dir()], max_bytes,
                        skip={Path(paths["stdlib"]) / name for name in ("site-packages", "dist-packages")})


def _pycode_iter(roots: list[Path], max_bytes: int, skip: set[Path] = frozenset()) -> Iterator[str]:
    seen: set[Path] = set()
    total = 0
    for root in roots:
        for path in _walk_sorted(root, skip):
            # pip's editable-install finders (__editable___<project>_finder.py) hold the checkout's absolute path
            if path.suffix != ".py" or path.name.startswith("__editable__"):
                continue
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            text = _read_utf8(path)
            if text is None:
                continue
            size = len(text.encode("utf-8"))
            if total + size > max_bytes:
                return
            total += size
            yield text


def textdir_documents(path: str | os.PathLike) -> Iterator[str]:
    """Every UTF-8 text file under a directory, one document per file, in sorted walk order.

    Any extension is accepted (a user's corpus may be .txt, .md, .py, .jsonl, or no extension at all); files
    that do not decode as UTF-8 or contain NUL bytes are taken to be binary and skipped, as are hidden ones.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={path} is not a directory; textdir needs data.path=DIR of text files")
    return (text for text in map(_read_utf8, _walk_sorted(root)) if text is not None)


def openwebtext_documents(path: str | os.PathLike | None, hf_dataset: str) -> Iterator[str]:
    """OpenWebText documents (the `text` column), from a local copy or through Hugging Face `datasets`.

    A local copy is a parquet file or a directory searched recursively for *.parquet (sorted paths), in the
    layout of Hugging Face's parquet conversion (e.g. plain_text/train/0000.parquet). Without a path, the same
    conversion is loaded with `datasets` (revision refs/convert/parquet: the original loading script no
    longer runs under datasets 4).
    """
    if path is None:
        return _huggingface_iter(hf_dataset)
    import pyarrow.parquet as pq

    local = Path(path).expanduser()
    if local.is_file():
        files = [local]
    elif local.is_dir():
        files = sorted(p for p in local.rglob("*.parquet") if p.is_file())
    else:
        raise DataError(f"data.path={path} does not exist; pass a directory of parquet files with a 'text' column")
    if not files:
        raise DataError(f"no *.parquet files under data.path={path}")
    parquets = [pq.ParquetFile(file) for file in files]
    for file, parquet in zip(files, parquets):
        if "text" not in parquet.schema_arrow.names:
            raise DataError(f"{file} has no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
    return _parquet_iter(parquets)


def _parquet_iter(parquets: list) -> Iterator[str]:
    """Reads row batches, so a multi-GB file never sits in memory whole."""
    for parquet in parquets:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _huggingface_iter(hf_dataset: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data=openwebtext without data.path needs Hugging Face datasets: `pip install datasets` "
            "(or `pip install gnsrepro[owt]`), or pass data.path=DIR of OpenWebText parquet files"
        ) from None
    dataset = datasets.load_dataset(hf_dataset, revision="refs/convert/parquet", split="train")
    return (text for batch in dataset.iter(batch_size=_PARQUET_BATCH_ROWS) for text in batch["text"])


def _check_name(cfg: DataConfig) -> None:
    if cfg.name not in DATA_NAMES:
        raise DataError(f"data={cfg.name} is unknown; data accepts {' | '.join(DATA_NAMES)}")


def _source(cfg: DataConfig) -> tuple[dict, Iterator[str]]:
    """(description for meta.json, documents) of the configured corpus."""
    _check_name(cfg)
    path = None if cfg.path is None else str(Path(cfg.path).expanduser().resolve())
    if cfg.name == "pycode":
        return ({"name": "pycode", "path": None, "max_bytes": cfg.max_bytes, "rule": PYCODE_RULE},
                pycode_documents(cfg.max_bytes))
    if cfg.name == "textdir":
        if path is None:
            raise DataError("data=textdir needs data.path=DIR (a directory of text files)")
        return {"name": "textdir", "path": path}, textdir_documents(path)
    description = {"name": "openwebtext", "path": path, "hf_dataset": None if path else cfg.hf_dataset}
    return description, openwebtext_documents(path, cfg.hf_dataset)


# ------------------------------------------------------------------------------------------ tokenising


def _is_val(data: bytes, val_fraction: float) -> bool:
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def _chunks(documents: Iterable[str], val_fraction: float, counts: dict) -> Iterator[list[tuple[str, bool]]]:
    """Chunks of (document, is_val) of about _CHUNK_BYTES each; empty documents are dropped.

    The split of a document is decided when the next one arrives (or the stream ends), so that the last
    document can still go to val when no other did. `counts` accumulates documents and bytes per split.
    """
    chunk: list[tuple[str, bool]] = []
    chunk_bytes = 0
    pending: tuple[str, int, bool] | None = None  # (document, its UTF-8 size, is_val) awaiting emission

    def emit(text: str, size: int, is_val: bool):
        nonlocal chunk, chunk_bytes
        split = "val" if is_val else "train"
        counts[split]["documents"] += 1
        counts[split]["bytes"] += size
        chunk.append((text, is_val))
        chunk_bytes += size
        if chunk_bytes >= _CHUNK_BYTES:
            full, chunk, chunk_bytes = chunk, [], 0
            return full
        return None

    for text in documents:
        if not text:
            continue
        data = text.encode("utf-8")
        if pending is not None and (full := emit(*pending)) is not None:
            yield full
        pending = (text, len(data), _is_val(data, val_fraction))
    if pending is not None:
        text, size, is_val = pending
        if (full := emit(text, size, is_val or counts["val"]["documents"] == 0)) is not None:
            yield full
    if chunk:
        yield chunk


def _tokenize_chunk(chunk: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, val tokens, UTF-8 bytes) of a chunk; each document is followed by EOT."""
    encoder = get_tokenizer()
    ids: dict[bool, list[int]] = {False: [], True: []}
    for text, is_val in chunk:
        ids[is_val].extend(encoder.encode_ordinary(text))
        ids[is_val].append(EOT)
    arrays = []
    for is_val in (False, True):
        tokens = np.asarray(ids[is_val], dtype=np.int64)
        assert tokens.size == 0 or tokens.max() < 2**16, "a token id does not fit in uint16"
        arrays.append(tokens.astype(DTYPE))
    return arrays[0], arrays[1], sum(len(text.encode("utf-8")) for text, _ in chunk)


def _worker_pool(processes: int):
    """A pool of tokenising workers, or a null context for processes == 1 (tokenise in this process).

    Created before the progress bar starts its monitor thread, since forking a multi-threaded process is unsafe.
    """
    if processes == 1:
        return contextlib.nullcontext(None)
    get_tokenizer()  # fail here rather than in every worker; forked workers inherit the memoised encoding
    return multiprocessing.Pool(processes, initializer=get_tokenizer)


def _tokenized(chunks: Iterator[list[tuple[str, bool]]], pool, processes: int):
    """Results of _tokenize_chunk in chunk order, with a bounded number of chunks in flight in the pool.

    (Pool.imap would read the whole chunk iterator ahead, i.e. the whole corpus into memory.)
    """
    if pool is None:
        yield from map(_tokenize_chunk, chunks)
        return
    in_flight: collections.deque = collections.deque()
    for chunk in chunks:
        in_flight.append(pool.apply_async(_tokenize_chunk, (chunk,)))
        if len(in_flight) >= processes * _CHUNKS_IN_FLIGHT_PER_PROC:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


class _SplitWriter:
    """Appends uint16 tokens to a file, hashing and counting them on the way."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.tokens += tokens.size

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


# ------------------------------------------------------------------------------------ vocabulary limit


def vocab_table(counts: np.ndarray, vocab_limit: int) -> np.ndarray:
    """The GPT-2 ids that data.vocab_limit=V keeps, in their new order: new id i is GPT-2 id vocab_table(...)[i].

    counts[t] is how often GPT-2 id t occurs in the train split (ids past the end of counts count 0). The
    V - 1 ids that occur most often, the more frequent first and ties by the lower id; EOT is always one of
    them: when it is not frequent enough it replaces the last one (it is then the least frequent kept, and its
    id, the largest, puts it after any tie, so the order stays that of frequency). Every other id becomes
    V - 1, the rare token (`vocab_lookup`). A corpus of fewer than V - 1 distinct ids also keeps ids it never
    uses (count 0, in id order), so the set's ids always run to V - 1.
    """
    if not 2 <= vocab_limit <= GPT2_VOCAB:
        raise DataError(f"data.vocab_limit={vocab_limit} must be in [2, {GPT2_VOCAB}] (or null: GPT-2's whole "
                        "vocabulary)")
    full = np.zeros(GPT2_VOCAB, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)[:GPT2_VOCAB]
    full[:counts.size] = counts
    order = np.argsort(-full, kind="stable")  # by falling count; a stable sort keeps ties in id order
    kept = order[:vocab_limit - 1]
    if EOT not in kept:
        kept = np.append(order[:vocab_limit - 2], EOT)
    return kept.astype(np.int64)


def vocab_lookup(vocab: Sequence[int], vocab_limit: int) -> np.ndarray:
    """(2**16,) array of DTYPE: the new id of each GPT-2 id (indexable by a uint16 token file's values).

    vocab[i] -> i (`vocab_table`'s order), every id not in vocab -> vocab_limit - 1, the rare token.
    """
    lookup = np.full(2**16, vocab_limit - 1, dtype=DTYPE)
    lookup[np.asarray(vocab, dtype=np.int64)] = np.arange(len(vocab), dtype=DTYPE)
    return lookup


def decode(ids: Iterable[int], meta: dict, rare: str = "<|rare|>") -> str:
    """The text of token ids read from a prepared data set whose meta.json is meta.

    A full-vocabulary set holds GPT-2 ids; a vocabulary-limited one (meta["vocab"]: the kept GPT-2 ids in their
    new order) holds new ids, each mapped back to its GPT-2 id, and its rare token (id vocab_size - 1, the
    merged ids, which cannot be told apart) is written as `rare`. EOT decodes as "<|endoftext|>".
    """
    encoder = get_tokenizer()
    ids = [int(i) for i in ids]
    vocab = meta.get("vocab")
    if vocab is None:
        return encoder.decode(ids)
    pieces, run = [], []
    for i in ids:
        if i < len(vocab):
            run.append(vocab[i])
            continue
        if i != meta["vocab_size"] - 1:
            raise DataError(f"token id {i} is not below this data set's vocab_size {meta['vocab_size']}")
        pieces += [encoder.decode_bytes(run), rare.encode("utf-8")]
        run = []
    pieces.append(encoder.decode_bytes(run))
    return b"".join(pieces).decode("utf-8", errors="replace")


def _token_blocks(path: Path) -> Iterator[np.ndarray]:
    """The tokens of a token file in blocks of _REMAP_BLOCK_TOKENS, so memory stays bounded however large it is."""
    with open(path, "rb") as f:
        while (block := np.fromfile(f, dtype=DTYPE, count=_REMAP_BLOCK_TOKENS)).size:
            yield block


def _limit_vocabulary(staging: Path, writers: dict, vocab_limit: int) -> tuple[list[int], dict[str, int]]:
    """Rewrite the staged train.bin and val.bin with ids below vocab_limit, by the train split's table.

    Counts the train split's ids, builds vocab_table from them, and maps both splits through vocab_lookup into
    new files that replace the staged ones; writers[split] becomes the new file's writer (tokens, sha256).
    Returns the kept GPT-2 ids in their new order (meta.json's "vocab") and each split's count of rare tokens.
    """
    counts = np.zeros(2**16, dtype=np.int64)
    for block in _token_blocks(staging / "train.bin"):
        counts += np.bincount(block, minlength=2**16)
    vocab = vocab_table(counts, vocab_limit)
    lookup = vocab_lookup(vocab, vocab_limit)
    rare = {"train": 0, "val": 0}
    for split in ("train", "val"):
        source, limited = staging / f"{split}.bin", staging / f"{split}.limited.bin"
        writer = _SplitWriter(limited)
        try:
            for block in _token_blocks(source):
                mapped = lookup[block]
                rare[split] += int(np.count_nonzero(mapped == vocab_limit - 1))
                writer.write(mapped)
        finally:
            writer.close()
        os.replace(limited, source)
        writers[split] = writer
    return vocab.tolist(), rare


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(directory: Path) -> None:
    """Delete staging directories left behind by prepare runs that were killed (their pid is gone)."""
    for staging in directory.glob(f"{_STAGING_PREFIX}*"):
        pid = staging.name[len(_STAGING_PREFIX):]
        if staging.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _num_processes(num_proc: int) -> int:
    if num_proc < 0:
        raise DataError(f"data.num_proc must be >= 0 (0 = one per CPU core), got {num_proc}")
    return num_proc or os.cpu_count() or 1


def _check_settings(cfg: DataConfig) -> int:
    """Raise DataError for a setting prepare cannot take (read nothing, write nothing); the processes to use."""
    _check_name(cfg)
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.name == "pycode" and cfg.max_bytes <= 0:
        raise DataError(f"data.max_bytes must be positive, got {cfg.max_bytes}")
    if cfg.name == "textdir" and not cfg.path:
        raise DataError("data=textdir needs data.path=DIR (a directory of text files)")
    if cfg.vocab_limit is not None and not 2 <= cfg.vocab_limit <= GPT2_VOCAB:
        raise DataError(f"data.vocab_limit={cfg.vocab_limit} must be in [2, {GPT2_VOCAB}] (or null: GPT-2's whole "
                        "vocabulary)")
    return _num_processes(cfg.num_proc)


def check_source(cfg: DataConfig) -> None:
    """Raise DataError for what prepare(cfg) would refuse before tokenising: a setting it cannot take, a
    textdir data.path that is not a directory, a local OpenWebText data.path that does not exist. Reads no
    corpus (whether it holds enough documents shows only when it is read)."""
    _check_settings(cfg)
    if cfg.name == "textdir":
        textdir_documents(cfg.path)  # checks the directory; its files are read only when iterated
    if cfg.name == "openwebtext" and cfg.path and not Path(cfg.path).expanduser().exists():
        raise DataError(f"data.path={cfg.path} does not exist; pass a directory of parquet files with a 'text' column")


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p directory; the directories it created, innermost first (to remove again on failure)."""
    created = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        created.append(path)
    directory.mkdir(parents=True, exist_ok=True)
    return created


def prepare(cfg: DataConfig) -> Path:
    """Tokenise cfg's corpus into dataset_dir(cfg)/{train.bin,val.bin,meta.json}; returns that directory.

    An existing data set of the same name is replaced; a prepare that is killed midway leaves the previous
    one (or none) in place, never a mixture. Settings, source and tokenizer are checked before anything is
    written, and a prepare that fails removes the directories it created.
    """
    processes = _check_settings(cfg)
    description, documents = _source(cfg)
    get_tokenizer()  # TokenizerUnavailable here, before any directory exists
    directory = dataset_dir(cfg)
    created = _make_dirs(directory)
    try:
        return _prepare_into(cfg, directory, description, documents, processes)
    except BaseException:
        for path in created:  # innermost first; a directory that is not empty stays
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _prepare_into(cfg: DataConfig, directory: Path, description: dict, documents: Iterator[str],
                  processes: int) -> Path:
    _remove_stale_staging(directory)
    staging = directory / f"{_STAGING_PREFIX}{os.getpid()}"
    staging.mkdir(exist_ok=True)
    try:
        counts = {split: {"documents": 0, "bytes": 0} for split in ("train", "val")}
        writers = {split: _SplitWriter(staging / f"{split}.bin") for split in ("train", "val")}
        started = time.perf_counter()
        chunks = _chunks(documents, cfg.val_fraction, counts)
        with (
            _worker_pool(processes) as pool,  # first: the bar starts a thread, and forking after that is unsafe
            tqdm(desc=f"prepare {cfg.name}", unit="B", unit_scale=True, file=sys.stderr, delay=0.5) as bar,
        ):
            for train_tokens, val_tokens, nbytes in _tokenized(chunks, pool, processes):
                writers["train"].write(train_tokens)
                writers["val"].write(val_tokens)
                bar.update(nbytes)
        for writer in writers.values():
            writer.close()
        if counts["train"]["documents"] == 0:
            where = f" under {description['path']}" if description.get("path") else ""
            raise DataError(
                f"data={cfg.name}: found {counts['val']['documents']} non-empty document(s){where}; "
                "need at least 2 (one for train, one for val)"
            )
        vocab, rare = (None, {}) if cfg.vocab_limit is None else _limit_vocabulary(staging, writers, cfg.vocab_limit)
        meta = {
            "name": cfg.name,
            "source": {
                **description,
                "documents": sum(c["documents"] for c in counts.values()),
                "bytes": sum(c["bytes"] for c in counts.values()),
            },
            "val_fraction": cfg.val_fraction,
            "split_rule": "val iff blake2b(document UTF-8, digest_size=8) / 2**64 < val_fraction; "
            "the last document when none is",
            "splits": {
                split: {
                    "file": f"{split}.bin",
                    "tokens": writers[split].tokens,
                    "documents": counts[split]["documents"],
                    "bytes": counts[split]["bytes"],
                    "sha256": writers[split].sha256.hexdigest(),
                    **({"rare_tokens": rare[split]} if split in rare else {}),
                }
                for split in ("train", "val")
            },
            "dtype": np.dtype(DTYPE).name,
            "tokenizer": {"name": TOKENIZER_NAME, "eot": EOT},
            "vocab_limit": cfg.vocab_limit,
            "vocab_size": GPT2_VOCAB if vocab is None else cfg.vocab_limit,
            **({} if vocab is None else {
                "vocab_rule": "id i is GPT-2 id vocab[i]: the vocab_limit - 1 most frequent ids of the train split, "
                              "ties by id, EOT always kept; id vocab_limit - 1 is every other id (rare)",
                "vocab": vocab,
            }),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1),
            "gnsrepro_version": _version(),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (directory / "meta.json").unlink(missing_ok=True)  # from here on the old data set is invalid
        for split in ("train", "val"):
            os.replace(staging / f"{split}.bin", directory / f"{split}.bin")
        os.replace(staging / "meta.json", directory / "meta.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _version() -> str:
    from gnsrepro import __version__

    return __version__


def run_prepare(cfg: DataConfig, force: bool = False) -> Path:
    """The CLI's `gnsrepro prepare`: keep an up-to-date data set, else prepare it; print one line either way.

    Up to date: data_dir/name holds a set whose meta.json records the settings cfg asks for
    (source_settings, the tokenizer) and whose files verify. The source is not read again, so a corpus
    that changed under the same settings (an edited text directory, other installed packages for pycode)
    needs force=True, which rebuilds in any case.
    """
    _check_settings(cfg)
    directory = dataset_dir(cfg)
    if not force and (directory / "meta.json").exists():
        meta, problem = _read_meta(directory), None
        differing = _differing_settings(cfg, meta) if meta is not None else []
        if meta is None:
            problem = f"{directory / 'meta.json'} is unreadable"
        elif differing:
            problem = f"it was prepared with other settings ({', '.join(differing)})"
        else:
            problem = _files_problem(directory, meta, full_hash=None)
        if problem is None:
            splits = meta["splits"]
            print(f"{directory} is up to date: prepared {meta.get('created', '?')} from {_origin(meta)} with these "
                  f"settings, its files verify (train {splits['train']['tokens']:,} tokens, val "
                  f"{splits['val']['tokens']:,}); force=true rebuilds it")
            return directory
        print(f"{directory}: {problem}; preparing it again", file=sys.stderr)
    directory = prepare(cfg)
    meta = json.loads((directory / "meta.json").read_text())
    source, splits = meta["source"], meta["splits"]
    limited = "" if meta.get("vocab") is None else (
        f"; vocabulary of {meta['vocab_size']:,}: the {len(meta['vocab']):,} most frequent GPT-2 tokens, one rare "
        f"({splits['train']['rare_tokens'] / splits['train']['tokens']:.1%} of train tokens, "
        f"{splits['val']['rare_tokens'] / max(splits['val']['tokens'], 1):.1%} of val)")
    print(
        f"prepared {directory}: {source['documents']:,} documents, {source['bytes']:,} bytes -> "
        f"train {splits['train']['tokens']:,} tokens ({splits['train']['documents']:,} docs), "
        f"val {splits['val']['tokens']:,} tokens ({splits['val']['documents']:,} docs) in {meta['seconds']} s{limited}"
    )
    return directory


def _origin(meta: dict) -> str:
    source = meta.get("source", {})
    if source.get("path"):
        return source["path"]
    if source.get("hf_dataset"):
        return f"Hugging Face {source['hf_dataset']}"
    return "this interpreter's Python files" if meta.get("name") == "pycode" else "?"


# ---------------------------------------------------------------------------------------------- checks


def _data_defaults(name: str) -> dict:
    """DataConfig's defaults as conf/data/<name>.yaml sets them: what `gnsrepro prepare data=<name>` uses."""
    import dataclasses

    from omegaconf import OmegaConf

    from gnsrepro.cli import conf_dir

    defaults = dataclasses.asdict(DataConfig())
    yaml = Path(conf_dir()) / "data" / f"{name}.yaml"
    if yaml.is_file():
        defaults.update(OmegaConf.to_container(OmegaConf.load(yaml)))
    return defaults


def prepare_command(cfg: DataConfig) -> str:
    """The `gnsrepro prepare` command line that prepares cfg's data set with cfg's settings.

    Names data.path (DIR when textdir has none) and every setting that decides the token files or where
    they go (data.data_dir, data.max_bytes, data.val_fraction, data.hf_dataset, data.vocab_limit) whose value
    is not the one `gnsrepro prepare data=<name>` takes by default.
    """
    defaults = _data_defaults(cfg.name)
    parts = ["gnsrepro", "prepare", f"data={cfg.name}"]
    if cfg.path:
        parts.append(f"data.path={cfg.path}")
    elif cfg.name == "textdir":
        parts.append("data.path=DIR")
    keys = ["data_dir", "val_fraction"]
    keys += ["max_bytes"] if cfg.name == "pycode" else []
    keys += ["hf_dataset"] if cfg.name == "openwebtext" and not cfg.path else []
    keys += ["vocab_limit"]
    parts += [f"data.{key}={getattr(cfg, key)}" for key in keys if getattr(cfg, key) != defaults.get(key)]
    return " ".join(shlex.quote(part) if part != "data.path=DIR" else part for part in parts)


def _config_of(meta: dict, directory: Path) -> DataConfig:
    """The DataConfig that prepared a data set, as its meta.json records it (for the command that redoes it).

    Without a meta.json, the name and vocab_limit are read off the directory's name (`dataset_dir`).
    """
    name, vocab_limit = directory.name, None
    limited = _LIMITED_DIR.match(directory.name)
    if limited and limited["name"] in DATA_NAMES:
        name, vocab_limit = limited["name"], int(limited["limit"])
    name, vocab_limit = meta.get("name", name), meta.get("vocab_limit", vocab_limit)
    source = meta.get("source", {})
    defaults = _data_defaults(name)
    return DataConfig(name=name, path=source.get("path"), data_dir=str(directory.parent),
                      max_bytes=source.get("max_bytes") or defaults["max_bytes"],
                      val_fraction=meta.get("val_fraction", defaults["val_fraction"]),
                      hf_dataset=source.get("hf_dataset") or defaults["hf_dataset"], vocab_limit=vocab_limit)


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("splits"), dict) else None


def _files_problem(directory: Path, meta: dict, full_hash: bool | None) -> str | None:
    """What is wrong with a data set's token files against its meta.json, or None when they verify."""
    try:
        for info in meta["splits"].values():
            file = directory / info["file"]
            if not file.is_file():
                return f"{file} is missing"
            size, expected = file.stat().st_size, info["tokens"] * np.dtype(DTYPE).itemsize
            if size != expected:
                return f"{file} has {size:,} bytes, meta.json expects {expected:,} (truncated?)"
            if full_hash or (full_hash is None and size < FULL_HASH_LIMIT):
                digest = hashlib.sha256()
                with open(file, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                if digest.hexdigest() != info["sha256"]:
                    return f"{file} does not match the sha256 in meta.json (altered?)"
    except (KeyError, TypeError) as e:
        return f"{directory / 'meta.json'} is malformed (no {e})"
    return None


def verify(directory: str | os.PathLike, full_hash: bool | None = None) -> dict:
    """meta.json of a prepared data set, after checking that its token files are complete and unaltered.

    Checks each file's size against the token count in meta.json, and (full_hash=True, or by default for files
    under 2 GB) its sha256; hashing OpenWebText's ~18 GB on every run would cost a minute for little gain.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    if meta is None:
        redo = prepare_command(_config_of({}, directory))
        raise DataError(f"{directory / 'meta.json'} is missing or unreadable; re-run `{redo}`")
    problem = _files_problem(directory, meta, full_hash)
    if problem is not None:
        raise DataError(f"{problem}; re-run `{prepare_command(_config_of(meta, directory))}`")
    return meta


def source_settings(cfg: DataConfig) -> dict:
    """The settings of cfg that decide its data set's token files, by command-line key.

    data.val_fraction always; data.max_bytes for pycode; data.path (resolved) when given, else for
    openwebtext data.hf_dataset (a download); data.vocab_limit when set. The tokenizer is fixed by this
    version (GPT-2 BPE).
    """
    settings: dict = {"data.val_fraction": cfg.val_fraction}
    if cfg.vocab_limit is not None:
        settings["data.vocab_limit"] = cfg.vocab_limit
    if cfg.name == "pycode":
        settings["data.max_bytes"] = cfg.max_bytes
    if cfg.path:
        settings["data.path"] = str(Path(cfg.path).expanduser().resolve())
    elif cfg.name == "openwebtext":
        settings["data.hf_dataset"] = cfg.hf_dataset
    return settings


def _differing_settings(cfg: DataConfig, meta: dict) -> list[str]:
    """'key=asked (prepared: value)' for each setting in which cfg's request and a prepared set differ.

    data=openwebtext without data.path asks for OpenWebText from anywhere: a set prepared from a local
    copy matches it (only a set downloaded from another Hugging Face dataset does not).
    """
    source = meta.get("source", {})
    prepared = {"data.val_fraction": meta.get("val_fraction"), "data.max_bytes": source.get("max_bytes"),
                "data.path": source.get("path"), "data.hf_dataset": source.get("hf_dataset"),
                "data.vocab_limit": meta.get("vocab_limit")}  # None in a set from before data.vocab_limit: GPT-2's
    asked = {**source_settings(cfg), "data.vocab_limit": cfg.vocab_limit}  # compared also when unset
    if cfg.name == "openwebtext" and not cfg.path and source.get("path"):
        asked.pop("data.hf_dataset")
    differing = [f"data={cfg.name} (prepared: {meta.get('name')})"] if meta.get("name") != cfg.name else []
    if cfg.name == "pycode" and meta.get("name") == "pycode" and source.get("rule") != PYCODE_RULE:
        differing.append("the pycode file rule of this version (prepared: an earlier one, which also read the "
                         "interpreter's own site-packages)")
    differing += [f"{key}={_override(value)} (prepared: {_override(prepared[key])})" for key, value in asked.items()
                  if prepared.get(key) != value]
    tokenizer = {"name": TOKENIZER_NAME, "eot": EOT}
    if meta.get("tokenizer") != tokenizer or meta.get("dtype") != np.dtype(DTYPE).name:
        differing.append(f"tokenizer {TOKENIZER_NAME} eot {EOT} as {np.dtype(DTYPE).name} (prepared: "
                         f"{meta.get('tokenizer')} as {meta.get('dtype')})")
    return differing


def _override(value) -> str:
    """A setting's value as a command line writes it (None as Hydra's null)."""
    return "null" if value is None else str(value)


def check_prepared_settings(cfg: DataConfig) -> dict | None:
    """Refuse a prepared data set made with other settings than cfg asks for; its meta.json when it matches.

    Raises DataError naming each differing setting (asked, and prepared) and the `gnsrepro prepare`
    command that rebuilds the set as asked. Returns None when dataset_dir(cfg) holds no readable meta.json
    (nothing prepared, or a broken set that verify reports). Reads meta.json only; the files are verify's.
    """
    directory = dataset_dir(cfg)
    meta = _read_meta(directory)
    if meta is None:
        return None
    differing = _differing_settings(cfg, meta)
    if differing:
        raise DataError(
            f"{directory} holds a data set prepared with other settings than asked: {', '.join(differing)}; "
            f"rebuild it with `{prepare_command(cfg)}` (prepare replaces it atomically; a run reading it keeps "
            "its open files), or give this run its own data.data_dir=DIR"
        )
    return meta


def data_identity(meta: dict) -> dict:
    """What identifies the token files of a prepared data set, from its meta.json (plain, JSON-able values).

    {"name", "source": the source's settings (path, max_bytes, hf_dataset; not its counts), "val_fraction",
    "tokenizer", "dtype", "splits": {split: {"file", "tokens", "sha256"}}}, and "vocab_limit" for a
    vocabulary-limited set (left out otherwise, so a full set keeps the identity it had before data.vocab_limit
    existed, and its checkpoints resume). Equal identities mean the same
    tokens in the same files (the sha256 of each); when the files were made (created, seconds, version) is
    left out, so a set rebuilt identically keeps its identity. A checkpoint stores it; a resumed run
    compares it with the data set it finds.
    """
    source = meta.get("source", {})
    limited = {} if meta.get("vocab_limit") is None else {"vocab_limit": meta["vocab_limit"]}
    return {
        "name": meta.get("name"),
        "source": {key: value for key, value in source.items() if key not in ("documents", "bytes")},
        "val_fraction": meta.get("val_fraction"),
        "tokenizer": meta.get("tokenizer"),
        "dtype": meta.get("dtype"),
        "splits": {split: {"file": info["file"], "tokens": info["tokens"], "sha256": info["sha256"]}
                   for split, info in sorted(meta["splits"].items())},
        **limited,
    }


def ensure_prepared(cfg: DataConfig, prepare_missing: bool) -> Path:
    """The verified directory of cfg's data set, preparing it first when it is missing and prepare_missing.

    A data set prepared with other settings than cfg's is refused (DataError, check_prepared_settings),
    not rebuilt: another run may be reading it.
    """
    _check_name(cfg)
    directory = dataset_dir(cfg)
    if not (directory / "meta.json").is_file():
        command = prepare_command(cfg)
        if not prepare_missing:
            raise DataError(f"no prepared data in {directory}; run `{command}` first")
        if cfg.name == "textdir" and not cfg.path:
            raise DataError(f"no prepared data in {directory} and data=textdir needs data.path=DIR to prepare it")
        print(f"{directory} is not prepared; running `{command}`", file=sys.stderr)
        prepare(cfg)
    else:
        check_prepared_settings(cfg)
    verify(directory)
    return directory
