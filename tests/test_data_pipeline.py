"""The streaming data pipeline (documents file -> datasets.map tokenize+pack -> Arrow shards): the same rows and
tokenizer as the list-based pipeline it replaced, rows independent of data.num_proc, document ids, and one clear
error for a corrupt shard, a shard or tokenizer from other data."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from tdlm.config import ConfigError, DataSection
from tdlm.data import (_iter_paragraphs, _tokenize_and_pack, load_prepared, markov_tokenizer, MarkovSource,
                       prepare_dataset, resolve_data, stdlib_docstrings, train_bpe_tokenizer)


def reference_texts(paths, column="text"):
    """How the list-based pipeline read files: a whole .txt split on blank lines, a whole json/parquet loaded."""
    import datasets

    texts = []
    for path in paths:
        if path.suffix == ".txt":
            texts += [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
        else:
            ds = datasets.load_dataset("json" if path.suffix == ".jsonl" else "parquet", data_files=str(path),
                                       split="train")
            texts += [t for t in ds[column] if isinstance(t, str) and t.strip()]
    return texts


def reference_split(texts, val_fraction):
    val = [int.from_bytes(hashlib.md5(t.encode()).digest()[:8], "little") / 2**64 < val_fraction for t in texts]
    return [t for t, v in zip(texts, val) if not v], [t for t, v in zip(texts, val) if v]


def reference_rows(texts, tok, seq_len, packing, add_special=True):
    """The list-based packing (``datasets.map`` batches of 2000 documents, one process): each batch's tokens joined
    and cut into seq_len rows, the batch's last row right-padded; unpacked, one document per row."""
    ids = [x for x in tok(texts, add_special_tokens=False)["input_ids"]]
    if add_special:
        ids = [[tok.bos_token_id] + x + [tok.eos_token_id] for x in ids]
    rows = []
    for start in range(0, len(ids), 2000):
        batch = ids[start:start + 2000]
        if packing:
            flat = [t for x in batch for t in x]
            rows += [flat[i:i + seq_len] for i in range(0, len(flat), seq_len)]
        else:
            rows += [x[:seq_len] for x in batch]
    return np.array([r + [tok.pad_token_id] * (seq_len - len(r)) for r in rows])


def write_corpus(where):
    import pyarrow as pa
    import pyarrow.parquet as pq

    where.mkdir()
    paragraphs = "first para\nstill first\n\n\nsecond para  \n\n \n\nthird\r\nline\n\n"
    (where / "a.txt").write_text("".join(f"{paragraphs}doc {i} of the text file\n\n" for i in range(800)) + "tail")
    with open(where / "b.jsonl", "w") as f:
        for i in range(1500):
            f.write(json.dumps({"text": f"  json doc {i} " + "word " * (i % 17), "n": i}) + "\n")
        f.write(json.dumps({"text": "   ", "n": -1}) + "\n")
    pq.write_table(pa.table({"text": [f"parquet row {i} " * (1 + i % 5) for i in range(900)]}), where / "c.parquet")
    return sorted(where.iterdir())


def test_rows_and_tokenizer_equal_the_list_based_pipeline(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    cfg = DataSection(source="files", paths=[str(tmp_path / "corpus")], vocab_size=300, seq_len=32,
                      cache_dir=str(tmp_path / "cache"))
    data = load_prepared(prepare_dataset(cfg, log=lambda *a: None))
    train, val = reference_split(reference_texts(files), cfg.val_fraction)
    assert len(train) > 4000 and data.info["num_train_documents"] == len(train)  # three packing groups
    assert data.tokenizer.get_vocab() == train_bpe_tokenizer(train, cfg.vocab_size).get_vocab()
    for split, texts in (("train", train), ("validation", val)):
        ds = getattr(data, split)
        np.testing.assert_array_equal(ds[:]["input_ids"].numpy(), reference_rows(texts, data.tokenizer, 32, True))
        np.testing.assert_array_equal(ds[:]["idx"].numpy(), np.arange(len(ds)))
    assert data.info["num_train_tokens"] == int((data.train[:]["input_ids"] != data.tokenizer.pad_token_id).sum())
    # unpacked rows (one document each) and two processes: the same rows as the reference
    for packing, num_proc in ((False, 1), (True, 2)):
        ds = _tokenize_and_pack(train, data.tokenizer, 32, packing, True, num_proc)
        np.testing.assert_array_equal(ds["input_ids"], reference_rows(train, data.tokenizer, 32, packing))


@pytest.mark.slow
def test_quickstart_rows_equal_the_list_based_pipeline(tmp_path):
    """configs/quickstart.yaml's data: the stdlib docstrings, BPE 4096, seq_len 128 (about 40 s)."""
    cfg = DataSection(source="stdlib", vocab_size=4096, seq_len=128, cache_dir=str(tmp_path))
    data = load_prepared(prepare_dataset(cfg, log=lambda *a: None))
    train, val = reference_split(stdlib_docstrings(), cfg.val_fraction)
    assert data.tokenizer.get_vocab() == train_bpe_tokenizer(train, cfg.vocab_size).get_vocab()
    for split, texts in (("train", train), ("validation", val)):
        np.testing.assert_array_equal(getattr(data, split)[:]["input_ids"].numpy(),
                                      reference_rows(texts, data.tokenizer, 128, True))


def test_paragraphs_read_in_chunks_equal_a_whole_split(tmp_path):
    text = "a\n\n\nb\n \nc\n\n\n\n\nd \r\n\r\ne\n\n" + "x" * 7 + "\n\n\n"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    whole = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    assert whole == ["a", "b\n \nc", "d", "e", "xxxxxxx"]
    for chunk in range(1, 10):
        assert list(_iter_paragraphs(path, chunk)) == whole


def test_document_ids_number_the_documents_of_each_group():
    tok = markov_tokenizer(MarkovSource(order=1, num_symbols=4))
    texts = [" ".join("abcd"[(i + j) % 4] for j in range(1 + i % 7)) for i in range(4100)]
    ds = _tokenize_and_pack(texts, tok, 16, True, True, 1, document_ids=True)
    ids, docs = np.array(ds["input_ids"]), np.array(ds["document_ids"])
    # expected: in each group of 2000 documents, document d's 2 + len tokens (BOS, symbols, EOS) carry d
    expected = []
    for start in range(0, len(texts), 2000):
        group = [d for d, t in enumerate(texts[start:start + 2000]) for _ in range(len(t.split()) + 2)]
        group += [-1] * (-len(group) % 16)
        expected += [group[i:i + 16] for i in range(0, len(group), 16)]
    np.testing.assert_array_equal(docs, np.array(expected))
    assert ((docs == -1) == (ids == tok.pad_token_id)).all()
    change = (docs[:, 1:] != docs[:, :-1]) & (docs[:, 1:] >= 0)  # inside a row, a new document starts at a BOS
    assert change.sum() > 1000 and (ids[:, 1:][change] == tok.bos_token_id).all()


def markov_prepared(tmp_path, name, symbols=6):
    cfg = DataSection(source="markov", seq_len=32, markov_tokens=20000, markov_symbols=symbols,
                      cache_dir=str(tmp_path / "cache"))
    return prepare_dataset(cfg, tmp_path / name, log=lambda *a: None)


def test_bad_prepared_data_one_clear_line_each(tmp_path):
    good = markov_prepared(tmp_path, "good")
    other = markov_prepared(tmp_path, "other", symbols=5)  # another vocabulary: another tokenizer fingerprint
    assert len(load_prepared(good).train) == json.loads((good / "info.json").read_text())["num_train_blocks"]

    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    shard = bad / "train" / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"shard .*shard-00000.arrow is corrupt: \d+ bytes, info.json says"):
        load_prepared(bad)

    mixed = tmp_path / "mixed"  # a shard directory copied from data made with another tokenizer
    shutil.copytree(good, mixed)
    shutil.rmtree(mixed / "train")
    shutil.copytree(other / "train", mixed / "train")
    with pytest.raises(ConfigError, match="was tokenized with tokenizer .*a shard directory from other data"):
        load_prepared(mixed)

    swapped = tmp_path / "swapped"  # the tokenizer directory replaced
    shutil.copytree(good, swapped)
    shutil.rmtree(swapped / "tokenizer")
    shutil.copytree(other / "tokenizer", swapped / "tokenizer")
    with pytest.raises(ConfigError, match="is not the tokenizer the data were made with"):
        load_prepared(swapped)

    named = DataSection(source="prepared", paths=[str(good)], seq_len=32, tokenizer=str(other / "tokenizer"))
    with pytest.raises(ConfigError, match=r"data.tokenizer: .* is not the tokenizer .* was made with"):
        resolve_data(named)
    assert len(resolve_data(DataSection(source="prepared", paths=[str(good)], seq_len=32,
                                        tokenizer=str(good / "tokenizer"))).train) > 0

    (bad / "train" / "shard-00000.arrow").unlink()
    with pytest.raises(ConfigError, match="shard .* is missing"):
        load_prepared(bad)


def test_bench_data_corpus_size_and_child_memory(tmp_path):
    """eval/bench_data.py's pieces: the generated corpus has the size asked for, and a child's peak RSS is read
    from wait4 (a child that allocates 200 MB reports at least that)."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
    import bench_data

    corpus = bench_data.write_corpus(tmp_path / "c", 1.5)
    size = sum(f.stat().st_size for f in (tmp_path / "c").iterdir())
    assert corpus["megabytes"] == pytest.approx(1.5, abs=0.1) and abs(size - 1.5 * 2**20) < 0.1 * 2**20
    child = [sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('{\"n\": 1}')"]
    out = bench_data.measure(child, dict(os.environ))
    assert out["n"] == 1 and out["peak_rss_mb"] >= 200
