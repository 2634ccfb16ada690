"""Corpora, tokenizers and packing: entropy of the Markov source, deterministic split, pad handling, prepare CLI,
the forms data.paths takes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tdlm.config import ConfigError, DataSection, load_config
from tdlm.data import (Collator, MarkovSource, _fingerprint, _read_files, data_files, hash_split, load_prepared,
                       markov_tokenizer, prepare_dataset)

ROOT = Path(__file__).resolve().parent.parent


def test_markov_entropy_rate_closed_form_and_empirical():
    src = MarkovSource(order=1, num_symbols=3, concentration=1.0, seed=0)
    P, pi = src.transition, src.stationary
    assert np.allclose(pi @ P, pi, atol=1e-12)
    h = -(pi[:, None] * P * np.log(P)).sum()
    assert abs(src.entropy_rate - h) < 1e-12
    # empirical cross-entropy of a long sample under the true chain equals the entropy rate
    x = src.sample(200000, seed=1)
    emp = -np.mean(np.log(P[x[:-1], x[1:]]))
    assert abs(emp - h) < 0.01
    # order 2: a window's entropy per token lies between the rate and the first-symbol entropy
    src2 = MarkovSource(order=2, num_symbols=4, seed=2)
    assert src2.entropy_rate < src2.block_entropy_per_token(16) < math.log(4)


def test_hash_split_is_deterministic_and_disjoint():
    texts = [f"text {i}" for i in range(2000)]
    a, b = hash_split(texts, 0.1)
    assert (a, b) == hash_split(list(texts), 0.1)
    assert not set(a) & set(b) and len(a) + len(b) == 2000 and 150 < len(b) < 250


def test_markov_tokenizer_one_token_per_symbol():
    src = MarkovSource(order=1, num_symbols=5)
    tok = markov_tokenizer(src)
    ids = tok("a b e c", add_special_tokens=False)["input_ids"]
    assert ids == [4, 5, 8, 6] and tok.mask_token_id == 1 and tok.pad_token_id == 0


def test_prepare_packs_and_pads_only_the_tail(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"sample document {i} " * (i % 5 + 1)}) for i in range(400)))
    cfg = DataSection(source="files", paths=[str(f)], vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "c"))
    data = load_prepared(prepare_dataset(cfg))
    rows = data.train[:]["input_ids"]
    pad = data.tokenizer.pad_token_id
    padded = (rows == pad).any(1)
    assert rows.shape[1] == 16 and int(padded.sum()) <= 1  # only a final partial block carries padding
    assert (rows == data.tokenizer.bos_token_id).sum() > 300  # documents are delimited
    # the unigram baseline of the health rules, measured at preparation: the top token's share of non-pad tokens
    counts = torch.bincount(rows[rows != pad].flatten()).double()
    assert data.info["unigram_accuracy"] == pytest.approx(float(counts.max() / counts.sum()), rel=1e-12)
    assert data.baselines() == {"unigram_accuracy": data.info["unigram_accuracy"], "optimal_loss": None}
    batch = Collator(pad)([data.train[i] for i in range(4)])
    assert "attention_mask" not in batch  # packed batches need no mask
    short = {"input_ids": torch.tensor([5, 6, pad, pad]), "idx": torch.tensor(0)}
    batch = Collator(pad)([short, short])
    assert batch["attention_mask"].tolist() == [[True, True, False, False]] * 2


def test_prepare_cli_writes_a_loadable_dataset(tmp_path):
    out = tmp_path / "prep"
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare.py"), "--source", "markov",
                           "--seq-len", "32", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["true_perplexity"] > 1 and info["num_train_blocks"] > 100
    data = load_prepared(out)
    assert data.train[0]["input_ids"].shape == (32,)


def test_data_paths_take_a_string_a_directory_and_refuse_an_empty_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("second file, first document\n\nsecond file, second document")
    (corpus / "a.jsonl").write_text(json.dumps({"text": "first file, only document"}) + "\n")
    (corpus / "notes.md").write_text("not data")  # other suffixes in the directory are skipped
    cfg = load_config(None, ["data.source=files", f"data.paths={corpus / 'b.txt'}"])  # a string: one path
    assert cfg.data.paths == [str(corpus / "b.txt")]
    assert _read_files(cfg.data) == ["second file, first document", "second file, second document"]
    cfg = load_config(None, ["data.source=files", f"data.paths={corpus}"])
    assert data_files(cfg.data) == [corpus / "a.jsonl", corpus / "b.txt"]  # sorted, .md skipped
    assert _read_files(cfg.data) == ["first file, only document", "second file, first document",
                                     "second file, second document"]
    # a file added to the directory is a new data cache entry
    before = _fingerprint(cfg.data)
    (corpus / "c.txt").write_text("a third file")
    assert _fingerprint(cfg.data) != before
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no data here")
    with pytest.raises(ConfigError) as e:
        _read_files(DataSection(source="files", paths=[str(empty)]))
    assert str(e.value) == f"data.paths: no .txt/.jsonl/.json/.parquet files in {empty}"
    with pytest.raises(ConfigError, match=f"^data.paths: file not found: {tmp_path / 'nope.txt'}$"):
        _read_files(DataSection(source="files", paths=[str(tmp_path / "nope.txt")]))
    with pytest.raises(ConfigError, match=r"^data.paths: .*notes.md is not a .txt/.jsonl/.json/.parquet file$"):
        _read_files(DataSection(source="files", paths=[str(corpus / "notes.md")]))
