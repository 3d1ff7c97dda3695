"""data.vocab_limit: a data set of the V - 1 most frequent GPT-2 tokens of the train split and one rare token."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import make_cfg, run_cli, tiny

from gnsrepro.config import DataConfig
from gnsrepro.data import prepare as prep
from gnsrepro.data.dataset import open_split
from gnsrepro.data.prepare import DataError, dataset_dir, decode, ensure_prepared, prepare, verify
from gnsrepro.data.tokenizer import EOT, get_tokenizer
from gnsrepro.errors import ConfigError
from gnsrepro.train import train

# A corpus whose train split's frequencies are known. Every word is one GPT-2 token: " the" 262, " dog" 3290,
# " cat" 3797, " fish" 5916, " bird" 6512. Files are read in name order and, with val_fraction=0, only the
# last document goes to val (the split rule's fallback), so a.txt and b.txt are train and c.txt is val.
WORDS = {" the": 262, " dog": 3290, " cat": 3797, " fish": 5916, " bird": 6512}
TRAIN_DOCS = {"a.txt": " the" * 5 + " cat" * 3, "b.txt": " dog" * 3 + " the" + " fish" * 2}
VAL_DOC = " bird" * 10 + " the"  # bird is the most frequent token of val, and absent from train
# train counts: the 6, cat 3, dog 3, fish 2, EOT 2 (one after each document); ties go to the lower id


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in {**TRAIN_DOCS, "c.txt": VAL_DOC}.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def _cfg(corpus: Path, data_dir: Path, vocab_limit: int | None) -> DataConfig:
    return DataConfig(name="textdir", path=str(corpus), data_dir=str(data_dir), val_fraction=0.0, num_proc=1,
                      vocab_limit=vocab_limit)


def _tokens(directory: Path, split: str) -> list[int]:
    return open_split(directory, split).tolist()


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_the_words_are_single_tokens():
    encoder = get_tokenizer()
    assert {word: encoder.encode_ordinary(word) for word in WORDS} == {word: [i] for word, i in WORDS.items()}


# ---- the mapping ------------------------------------------------------------------------------------
def test_mapping_of_a_corpus_with_known_frequencies(corpus, tmp_path):
    directory = prepare(_cfg(corpus, tmp_path / "data", 6))
    meta = json.loads((directory / "meta.json").read_text())
    # the 5 most frequent: the (6), dog and cat (3 each, dog's id is lower), fish and EOT (2 each, fish's is lower)
    assert meta["vocab"] == [262, 3290, 3797, 5916, EOT]
    assert meta["vocab_limit"] == 6 and meta["vocab_size"] == 6
    the, dog, cat, fish, eot, rare = range(6)
    assert _tokens(directory, "train") == [the] * 5 + [cat] * 3 + [eot] + [dog] * 3 + [the] + [fish] * 2 + [eot]
    # val is mapped with train's table: bird, val's most frequent token, never occurs in train, so it is rare
    assert _tokens(directory, "val") == [rare] * 10 + [the] + [eot]
    assert meta["splits"]["train"]["rare_tokens"] == 0 and meta["splits"]["val"]["rare_tokens"] == 10
    assert verify(directory)["splits"] == meta["splits"]  # sizes and sha256 are those of the mapped files


def test_eot_is_kept_and_the_rest_merges_into_the_rare_token(corpus, tmp_path):
    # V = 5 keeps 4: by frequency the, dog, cat, fish; EOT is always kept, so it takes fish's place
    directory = prepare(_cfg(corpus, tmp_path / "data", 5))
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["vocab"] == [262, 3290, 3797, EOT]
    the, dog, cat, eot, rare = range(5)
    assert _tokens(directory, "train") == [the] * 5 + [cat] * 3 + [eot] + [dog] * 3 + [the] + [rare] * 2 + [eot]
    assert _tokens(directory, "val") == [rare] * 10 + [the] + [eot]
    # V = 2, the smallest: EOT and one rare token
    directory = prepare(_cfg(corpus, tmp_path / "data", 2))
    assert json.loads((directory / "meta.json").read_text())["vocab"] == [EOT]
    assert _tokens(directory, "train") == [1] * 8 + [0] + [1] * 6 + [0]


def test_vocab_table_ties_by_id_and_unused_ids():
    counts = np.zeros(EOT + 1, dtype=np.int64)
    counts[[7, 3, 100, 9, 5, EOT]] = [4, 10, 20, 4, 10, 1]
    assert prep.vocab_table(counts, 5).tolist() == [100, 3, 5, EOT]  # 7 and 9 (4 each) lose to EOT
    assert prep.vocab_table(counts, 7).tolist() == [100, 3, 5, 7, 9, EOT]
    assert prep.vocab_table(counts, 9).tolist() == [100, 3, 5, 7, 9, EOT, 0, 1]  # then unused ids, by id
    lookup = prep.vocab_lookup([100, 3, 5, EOT], 5)
    assert lookup[[100, 3, 5, EOT, 7, 9, 0]].tolist() == [0, 1, 2, 3, 4, 4, 4]
    assert lookup.dtype == np.uint16 and lookup.shape == (2**16,)


def test_decode_round_trip(corpus, tmp_path):
    encoder = get_tokenizer()
    directory = prepare(_cfg(corpus, tmp_path / "data", 6))
    meta = verify(directory)
    end = "<|endoftext|>"
    assert decode(_tokens(directory, "train"), meta) == TRAIN_DOCS["a.txt"] + end + TRAIN_DOCS["b.txt"] + end
    assert decode(_tokens(directory, "val"), meta, rare="?") == "?" * 10 + " the" + end
    # the kept tokens of real text come back as they were; a full-vocabulary set decodes as GPT-2
    text = " the cat the dog"
    ids = [meta["vocab"].index(t) for t in encoder.encode_ordinary(text)]
    assert decode(ids, meta) == text
    full = verify(prepare(_cfg(corpus, tmp_path / "data", None)))
    assert decode(_tokens(tmp_path / "data" / "textdir", "val"), full) == VAL_DOC + end
    with pytest.raises(DataError, match="token id 9 is not below this data set's vocab_size 6"):
        decode([9], meta)


# ---- where it lives, and failures -----------------------------------------------------------------------
def test_limited_set_has_its_own_directory_and_leaves_the_full_one_untouched(corpus, tmp_path):
    data = tmp_path / "data"
    full_cfg, limited_cfg = _cfg(corpus, data, None), _cfg(corpus, data, 6)
    assert dataset_dir(full_cfg) == data / "textdir" and dataset_dir(limited_cfg) == data / "textdir-v6"
    full = prepare(full_cfg)
    before = _digests(full)
    assert prepare(limited_cfg) == data / "textdir-v6"
    assert _digests(full) == before and sorted(p.name for p in data.iterdir()) == ["textdir", "textdir-v6"]
    assert ensure_prepared(full_cfg, prepare_missing=False) == full
    assert ensure_prepared(limited_cfg, prepare_missing=False) == data / "textdir-v6"
    full_meta = verify(full)
    assert full_meta["vocab_limit"] is None and full_meta["vocab_size"] == EOT + 1 and "vocab" not in full_meta
    # a full set's identity is what it was before data.vocab_limit existed; a limited one's names its limit
    assert "vocab_limit" not in prep.data_identity(full_meta)
    assert prep.data_identity(verify(data / "textdir-v6"))["vocab_limit"] == 6


def test_failed_limit_leaves_nothing(corpus, tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("killed while mapping")

    monkeypatch.setattr(prep, "_limit_vocabulary", crash)
    with pytest.raises(RuntimeError, match="killed while mapping"):
        prepare(_cfg(corpus, tmp_path / "data", 6))
    assert not (tmp_path / "data").exists()  # neither data/textdir-v6 nor its staging directory, nor data/


def test_prepare_command_and_verify_name_the_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prep.prepare_command(DataConfig(name="pycode", vocab_limit=2048)) == (
        "gnsrepro prepare data=pycode data.vocab_limit=2048")
    (tmp_path / "data" / "pycode-v512").mkdir(parents=True)  # a set without its meta.json
    with pytest.raises(DataError, match=re.escape("re-run `gnsrepro prepare data=pycode data.vocab_limit=512`")):
        verify(Path("data") / "pycode-v512")


# ---- settings -------------------------------------------------------------------------------------
def _write_meta(directory: Path, **fields) -> None:
    """A pycode meta.json (no token files): the settings check reads nothing else."""
    meta = {"name": "pycode", "source": {"name": "pycode", "path": None, "max_bytes": 64_000_000,
                                         "rule": prep.PYCODE_RULE},
            "val_fraction": 0.005, "splits": {}, "dtype": "uint16", "tokenizer": {"name": "gpt2", "eot": EOT},
            **fields}
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps(meta))


def test_a_set_with_another_vocab_limit_is_refused_as_other_settings_are(tmp_path):
    _write_meta(tmp_path / "pycode-v512", vocab_limit=1024, vocab_size=1024)  # e.g. a directory renamed by hand
    asked = DataConfig(name="pycode", data_dir=str(tmp_path), vocab_limit=512)
    with pytest.raises(DataError) as refused:
        ensure_prepared(asked, prepare_missing=True)
    message = str(refused.value)
    assert "data.vocab_limit=512 (prepared: 1024)" in message and "\n" not in message
    assert f"`gnsrepro prepare data=pycode data.data_dir={tmp_path} data.vocab_limit=512`" in message
    with pytest.raises(DataError, match=re.escape("data.vocab_limit=512 (prepared: 1024)")):
        prep.check_prepared_settings(asked)
    # a limited set where the full one is asked for, and a set from before data.vocab_limit (no key) accepted
    _write_meta(tmp_path / "pycode", vocab_limit=512)
    with pytest.raises(DataError, match=re.escape("data.vocab_limit=null (prepared: 512)")):
        prep.check_prepared_settings(DataConfig(name="pycode", data_dir=str(tmp_path)))
    _write_meta(tmp_path / "old" / "pycode")
    assert prep.check_prepared_settings(DataConfig(name="pycode", data_dir=str(tmp_path / "old")))


def test_a_sweep_job_asking_another_vocab_limit_is_refused(tmp_path):
    from gnsrepro.cli import _check_train_jobs

    _write_meta(tmp_path / "pycode-v512", vocab_limit=1024, vocab_size=1024)
    overrides = [f"data.data_dir={tmp_path}", "data.max_bytes=64000000", "data.vocab_limit=512",
                 "model.vocab_size=512", "max_steps=2", f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=re.escape("data.vocab_limit=512 (prepared: 1024)")):
        _check_train_jobs([(overrides, make_cfg(*overrides))])


@pytest.mark.parametrize("overrides, message", [
    (["data.vocab_limit=512", "model.vocab_size=256"],
     "model.vocab_size=256 must be >= data.vocab_limit=512 (the token ids of its data set)"),
    (["model.vocab_size=2048"], "model.vocab_size=2048 must be >= 50257 (the GPT-2 tokens of the data)"),
    (["data.vocab_limit=1", "model.vocab_size=64"], "data.vocab_limit=1 must be in [2, 50257]"),
    (["data.vocab_limit=50258"], "data.vocab_limit=50258 must be in [2, 50257]"),
])
def test_vocabulary_settings_are_refused_in_one_line_before_any_work(overrides, message, tmp_path):
    cfg = make_cfg("max_steps=5", f"data.data_dir={tmp_path / 'nodata'}", f"out_dir={tmp_path / 'run'}", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        train(cfg)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "run").exists()


def test_prepare_refuses_a_bad_vocab_limit_in_one_line(tmp_path):
    r = run_cli(["prepare", "data=pycode", f"data.data_dir={tmp_path / 'data'}", "data.vocab_limit=1"])
    assert r.returncode == 2
    assert r.stderr.strip() == ("gnsrepro prepare: error: data.vocab_limit=1 must be in [2, 50257] (or null: "
                                "GPT-2's whole vocabulary)")
    assert not (tmp_path / "data").exists()


# ---- training -------------------------------------------------------------------------------------
def test_a_run_on_a_limited_vocabulary_trains(data_dir, tmp_path):
    full = data_dir / "pycode"
    before = _digests(full)
    out = train(make_cfg(*tiny(data_dir, tmp_path / "run", "max_steps=2", "eval_interval=2", "data.vocab_limit=256",
                               "model.vocab_size=256")))
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["step"].tolist() == [1, 2] and metrics["val_loss"].notna().any()
    # a freshly initialised model predicts about uniformly over its 256 outputs: loss near ln 256, not ln 50304
    assert abs(metrics["loss"].iloc[0] - math.log(256)) < 0.5
    limited = verify(data_dir / "pycode-v256")
    assert max(open_split(data_dir / "pycode-v256", "train")) == 255  # the rare token occurs: ids run to V - 1
    assert torch.load(out / "ckpt.pt", weights_only=False)["data"] == prep.data_identity(limited)
    assert _digests(full) == before  # the session's full-vocabulary set is untouched
    # token by token, the limited set is the full one through its table (same corpus, same split)
    vocab = np.asarray(limited["vocab"])
    for split in ("train", "val"):
        gpt2, ids = open_split(full, split), open_split(data_dir / "pycode-v256", split)
        kept = ids != 255
        assert len(ids) == len(gpt2) and kept.mean() > 0.5
        assert np.array_equal(vocab[ids[kept]], gpt2[kept]) and not np.isin(gpt2[~kept], vocab).any()
