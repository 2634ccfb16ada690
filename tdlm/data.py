"""Data: the embedded corpora, the tokenizer, and tokenize-and-pack into fixed-length blocks with ``datasets``,
streamed from the text to Arrow token shards that training memory-maps, with no list of the corpus in memory
(docs/data.md).

Two corpora ship with the package and need no network:
- ``stdlib``: real English text on any machine with Python, the docstrings of the standard library
  (extracted with ``ast``, deduplicated, split deterministically by a hash of the text).
- ``markov``: a random k-th order Markov chain over a small alphabet with a computable entropy rate, so a
  model's perplexity can be compared with the true optimum (``MarkovSource.block_entropy_per_token``).
Other sources: local txt/jsonl/parquet files, a hub dataset (code path present, not exercised offline) and a
directory written by ``data_prep/prepare.py``.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataSection

SPECIAL_TOKENS = {"pad_token": "[PAD]", "mask_token": "[MASK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}


# ----------------------------------------------------------------------------------------------------------
# Corpora


def stdlib_docstrings(min_chars: int = 40) -> list[str]:
    """Deduplicated docstrings of the Python standard library, in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc.isascii():
                    seen.add(doc.strip())
    return sorted(seen)


def is_validation(text: str, val_fraction: float) -> bool:
    """The split rule: a document is in validation when the md5 of its text, read as a number in [0, 1), is below
    ``val_fraction``; it depends on the text alone, so it is stable across runs, machines and document order."""
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "little") / 2**64 < val_fraction


def hash_split(texts: Iterable[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of a list by ``is_validation`` (stable across runs and machines)."""
    train, val = [], []
    for text in texts:
        (val if is_validation(text, val_fraction) else train).append(text)
    return train, val


@dataclass
class MarkovSource:
    """A random order-k Markov chain over ``num_symbols`` letters; rows drawn from Dirichlet(concentration)."""

    order: int = 2
    num_symbols: int = 12
    concentration: float = 0.25
    seed: int = 1234

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.num_states = self.num_symbols ** self.order
        self.transition = rng.dirichlet(np.full(self.num_symbols, self.concentration), size=self.num_states)
        # Stationary distribution of the chain on k-grams: state s=(x1..xk) -> s'=(x2..xk,c).
        P = np.zeros((self.num_states, self.num_states))
        for s in range(self.num_states):
            base = (s * self.num_symbols) % self.num_states
            P[s, base:base + self.num_symbols] += self.transition[s]
        pi = np.full(self.num_states, 1.0 / self.num_states)
        for _ in range(10000):
            nxt = pi @ P
            if np.abs(nxt - pi).max() < 1e-15:
                break
            pi = nxt
        self.stationary = nxt / nxt.sum()

    @property
    def symbols(self) -> list[str]:
        return [chr(ord("a") + i) for i in range(self.num_symbols)]

    @property
    def entropy_rate(self) -> float:
        """h = sum_s pi(s) H(P(.|s)) in nats per symbol."""
        row_h = -(self.transition * np.log(np.clip(self.transition, 1e-300, None))).sum(1)
        return float(self.stationary @ row_h)

    def block_entropy_per_token(self, length: int) -> float:
        """Entropy per token of a length-L window of the stationary chain: (H(first k) + (L-k) h) / L."""
        p = self.stationary
        h0 = float(-(p * np.log(np.clip(p, 1e-300, None))).sum())
        return (h0 + (length - self.order) * self.entropy_rate) / length

    def sample(self, num_tokens: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        state = int(rng.choice(self.num_states, p=self.stationary))
        out = np.empty(num_tokens, dtype=np.int64)
        digits = [(state // self.num_symbols ** (self.order - 1 - i)) % self.num_symbols for i in range(self.order)]
        out[: self.order] = digits[:num_tokens]
        cum = np.cumsum(self.transition, axis=1)
        u = rng.random(num_tokens)
        for i in range(self.order, num_tokens):
            c = int(np.searchsorted(cum[state], u[i] * cum[state, -1], side="right"))
            c = min(c, self.num_symbols - 1)
            out[i] = c
            state = (state * self.num_symbols + c) % self.num_states
        return out

    def documents(self, num_tokens: int, seq_len: int, val_fraction: float, seed: int):
        """Windows of exactly seq_len symbols as space-separated text: (train, validation)."""
        n_val = max(1, int(num_tokens * val_fraction) // seq_len)
        n_train = max(1, num_tokens // seq_len - n_val)
        syms = self.symbols

        def docs(n, s):
            chain = self.sample(n * seq_len, s).reshape(n, seq_len)
            return [" ".join(syms[c] for c in row) for row in chain]

        return docs(n_train, seed), docs(n_val, seed + 1)


def markov_from_config(cfg: DataSection) -> MarkovSource:
    return MarkovSource(cfg.markov_order, cfg.markov_symbols, cfg.markov_concentration, cfg.seed)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


def train_bpe_tokenizer(texts: Iterable, vocab_size: int):
    """Byte-level BPE trained with ``tokenizers`` on the training split (an iterable of texts or of lists of texts,
    consumed once), wrapped for ``transformers``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **SPECIAL_TOKENS)


def markov_tokenizer(source: MarkovSource):
    """One token per chain symbol, so token perplexity is directly comparable with exp(entropy rate)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for s in source.symbols:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def load_pretrained_tokenizer(name_or_path: str):
    """A pretrained tokenizer by local path or hub name; adds [MASK]/[PAD]/BOS/EOS if it lacks them.

    A model directory whose config.json names a ``mask_token_id`` (LLaDA) keeps that token as the mask. [MASK]
    is added first, so a vocabulary that lacks one gets it at id ``len(vocab)``, MDLM's convention for GPT-2."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - many loader errors; one clear line for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.tokenizer: cannot load tokenizer {name_or_path!r}: {reason}") from None
    config_file = Path(name_or_path) / "config.json"
    if tok.mask_token is None and config_file.is_file():
        mask_id = json.loads(config_file.read_text()).get("mask_token_id")
        if isinstance(mask_id, int) and 0 <= mask_id < len(tok):
            tok.mask_token = tok.convert_ids_to_tokens(mask_id)
    order = ("mask_token", "pad_token", "bos_token", "eos_token")
    missing = {k: SPECIAL_TOKENS[k] for k in order if getattr(tok, k, None) is None}
    if missing:
        tok.add_special_tokens(missing)
    return tok


def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Raw text as a stream: one document at a time, never a list of the corpus


def iter_split(cfg: DataSection, split: str) -> Iterator[str]:
    """The documents of one split ("train" or "validation") of a text source (not 'prepared'), in corpus order.
    Files are read as they are consumed; the stdlib corpus is a fixed few MB and the markov one is bounded by
    ``data.markov_tokens``, so those two are built whole."""
    if cfg.source == "markov":
        train, val = markov_from_config(cfg).documents(cfg.markov_tokens, cfg.seq_len, cfg.val_fraction, cfg.seed)
        docs: Iterator[str] = iter(train if split == "train" else val)
    elif cfg.source == "hub":
        docs = _iter_hub(cfg, split)
    elif cfg.source in ("stdlib", "files"):
        texts = stdlib_docstrings() if cfg.source == "stdlib" else _iter_files(cfg)
        want_val = split == "validation"
        docs = (t for t in texts if is_validation(t, cfg.val_fraction) == want_val)
    else:
        raise ConfigError(f"data.source: {cfg.source!r} has no raw text")
    if cfg.max_documents:
        keep = cfg.max_documents if split == "train" else max(1, int(cfg.max_documents * cfg.val_fraction))
        docs = itertools.islice(docs, keep)
    return docs


DATA_FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Suffix -> ``datasets`` loader of the files source=files reads (a directory: these, in sorted order)."""


def data_files(cfg: DataSection) -> list[Path]:
    """The files of ``data.paths``, a directory expanded to its data files (not recursive) in sorted order."""
    files = []
    suffixes = "/".join(DATA_FILE_KINDS)
    for p in cfg.paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in DATA_FILE_KINDS)
            if not found:
                raise ConfigError(f"data.paths: no {suffixes} files in {path}")
            files += found
        elif not path.is_file():
            raise ConfigError(f"data.paths: file not found: {path}")
        elif path.suffix not in DATA_FILE_KINDS:
            raise ConfigError(f"data.paths: {path} is not a {suffixes} file")
        else:
            files.append(path)
    return files


def _iter_files(cfg: DataSection) -> Iterator[str]:
    """The documents of the ``data.paths`` files in order: a .txt file's blank-line-separated paragraphs, a
    .jsonl/.json/.parquet file's non-empty ``data.text_column`` values."""
    found = False
    for path in data_files(cfg):
        kind = DATA_FILE_KINDS[path.suffix]
        for text in _iter_paragraphs(path) if kind == "text" else _iter_column(path, kind, cfg.text_column):
            found = True
            yield text
    if not found:
        raise ConfigError(f"data.paths: no text found in {', '.join(map(str, cfg.paths))}")


def _read_files(cfg: DataSection) -> list[str]:
    """All documents of the ``data.paths`` files as a list: for small inputs only (evaluation text files)."""
    return list(_iter_files(cfg))


def _iter_paragraphs(path: Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """``[t.strip() for t in text.split("\\n\\n") if t.strip()]`` of the whole file, read a chunk at a time: the
    text after the last separator of what has been read is carried into the next chunk, so the pieces are those of
    splitting the whole text (``split`` matches left to right)."""
    carry = ""
    with open(path, encoding="utf-8") as f:  # universal newlines, as Path.read_text
        while chunk := f.read(chunk_chars):
            *done, carry = (carry + chunk).split("\n\n")
            yield from (t.strip() for t in done if t.strip())
    if carry.strip():
        yield carry.strip()


def _iter_column(path: Path, kind: str, column: str) -> Iterator[str]:
    """The non-empty string values of ``column`` of a json/parquet file, streamed by ``datasets`` in batches."""
    import datasets

    stream = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
    for batch in stream.iter(batch_size=1000):
        if column not in batch:
            raise ConfigError(f"data.text_column: {column!r} not in {path} (columns: {list(batch)})")
        yield from (t for t in batch[column] if isinstance(t, str) and t.strip())


def _iter_hub(cfg: DataSection, split: str) -> Iterator[str]:  # pragma: no cover - needs the network
    """A hub dataset streamed (``streaming=True``): its validation split when it has one, else the hash rule on
    its train split."""
    import datasets

    ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None, streaming=True)
    own_split = "validation" in ds
    for row in ds[split if own_split else "train"]:
        text = row[cfg.text_column]
        if text.strip() and (own_split or is_validation(text, cfg.val_fraction) == (split == "validation")):
            yield text


# ----------------------------------------------------------------------------------------------------------
# Tokenize and pack, written as Arrow shards
#
# A split goes through disk twice, never through a Python list: its documents are written to an Arrow IPC file in
# record batches of PACK_GROUP_DOCUMENTS, ``datasets.map`` (num_proc workers) tokenizes and packs one batch per
# call, read with plain file reads, and a last streaming pass adds the row index and writes the shards that
# training memory-maps. Plain reads (not memory maps) keep the preparing processes' resident memory flat: pages of a
# memory-mapped file that have been read count in a process's RSS until it unmaps them.

PACK_GROUP_DOCUMENTS = 2000
"""Documents packed together: their token stream is cut into seq_len rows and only the group's last row is
right-padded. 2000 was the ``datasets.map`` batch of the list-based pipeline, so the rows are the same; the groups
are fixed by document order, so the rows do not depend on ``data.num_proc`` (before, each worker's share did)."""
SHARD_BYTES = 64 << 20
"""Target size of one token shard: a unit of streaming and of assignment to processes."""
SPLITS = ("train", "validation")


def _document_batches(path: Path) -> Iterator[list[str]]:
    """The documents of a file written by ``_write_documents``, one packing group at a time."""
    import pyarrow as pa

    with pa.OSFile(str(path)) as src:
        reader = pa.ipc.open_file(src)
        for g in range(reader.num_record_batches):
            yield reader.get_batch(g).column(0).to_pylist()


def _write_documents(texts: Iterable[str], path: Path) -> int:
    """Write documents to an Arrow IPC file, one record batch per packing group; returns how many."""
    import pyarrow as pa

    schema = pa.schema([("text", pa.large_string())])
    count = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        texts = iter(texts)
        while group := list(itertools.islice(texts, PACK_GROUP_DOCUMENTS)):
            writer.write_batch(pa.record_batch([pa.array(group, pa.large_string())], schema=schema))
            count += len(group)
    return count


def _pack_group(ids: list[list[int]], seq_len: int, packing: bool, pad: int, document_ids: bool) -> dict:
    """One group's token lists -> {input_ids (rows, seq_len)[, document_ids]}: packed, the documents joined and cut
    into seq_len rows with the last right-padded; else one document per row, cut at seq_len and right-padded.
    ``document_ids``: the document of each position (numbered within the group; -1 on padding; only equality
    within a row matters), for document-masked attention."""
    if not packing:
        rows = np.full((len(ids), seq_len), pad, dtype=np.int64)
        for r, x in enumerate(ids):
            rows[r, :min(len(x), seq_len)] = x[:seq_len]
        return {"input_ids": rows}
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    size = -(-total // seq_len) * seq_len
    flat = np.full(size, pad, dtype=np.int64)
    flat[:total] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
    out = {"input_ids": flat.reshape(-1, seq_len)}
    if document_ids:
        docs = np.full(size, -1, dtype=np.int64)
        docs[:total] = np.repeat(np.arange(len(ids)), lengths)
        out["document_ids"] = docs.reshape(-1, seq_len)
    return out


def pack_documents(doc_file: Path, out_dir: Path, tok, seq_len: int, packing: bool, add_special: bool,
                   num_proc: int, document_ids: bool = False) -> dict:
    """Tokenize and pack the documents of ``doc_file`` into Arrow shards ``out_dir/shard-NNNNN.arrow`` of fixed-length
    rows {input_ids[, document_ids], idx}; returns {shards: [{file, rows, bytes}], tokens, unigram_counts}."""
    import datasets
    import pyarrow as pa

    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    with pa.OSFile(str(doc_file)) as src:
        num_groups = pa.ipc.open_file(src).num_record_batches

    def tokenize_and_pack(batch):  # one packing group per call (batch_size=1)
        rows = []
        with pa.OSFile(str(doc_file)) as src:
            reader = pa.ipc.open_file(src)
            for g in batch["group"]:
                texts = reader.get_batch(g).column(0).to_pylist()
                ids = tok(texts, add_special_tokens=False)["input_ids"]
                rows.append(_pack_group([[bos] + x + [eos] for x in ids] if add_special else ids, seq_len, packing,
                                        pad, document_ids))
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    columns = {"input_ids": datasets.Sequence(datasets.Value("int64"))}
    if document_ids and packing:
        columns["document_ids"] = datasets.Sequence(datasets.Value("int64"))
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = datasets.Dataset.from_dict({"group": list(range(num_groups))})
    nproc = num_proc if num_proc > 1 and num_groups >= 2 else None
    fingerprint = hashlib.sha256(str(out_dir).encode()).hexdigest()[:32]  # datasets' limit with num_proc: 64
    packed = groups.map(tokenize_and_pack, batched=True, batch_size=1, num_proc=nproc, remove_columns=["group"],
                        features=datasets.Features(columns), cache_file_name=str(out_dir / "packed.arrow"),
                        load_from_cache_file=False, new_fingerprint=fingerprint, desc="tokenize and pack")
    packed_files = [f["filename"] for f in packed.cache_files]
    del packed
    result = _write_shards(packed_files, out_dir, seq_len, pad, tokenizer_fingerprint(tok))
    for f in packed_files:
        Path(f).unlink()
    return result


def _write_shards(packed_files: list[str], out_dir: Path, seq_len: int, pad: int, fingerprint: str) -> dict:
    """Copy the packed rows into shards of about SHARD_BYTES with the row index column ``idx``, counting tokens on
    the way (streamed record batch by record batch, plain reads). Each shard's schema metadata names the tokenizer
    fingerprint, so a shard from other data is refused on load (``load_shards``)."""
    import pyarrow as pa

    shard_rows = max(1, SHARD_BYTES // (8 * seq_len))
    shards: list[dict] = []
    counts = np.zeros(0, dtype=np.int64)
    state = {"writer": None, "sink": None, "rows": 0}
    row = 0

    def close():
        if state["writer"] is not None:
            state["writer"].close()
            state["sink"].close()
            path = out_dir / shards[-1]["file"]
            shards[-1].update(rows=state["rows"], bytes=path.stat().st_size)
            state["writer"] = None

    for name in packed_files:
        with pa.OSFile(name) as src:
            for batch in pa.ipc.open_stream(src):
                start = 0
                while start < batch.num_rows:
                    if state["writer"] is None or state["rows"] == shard_rows:
                        close()
                        shards.append({"file": f"shard-{len(shards):05d}.arrow"})
                        names = batch.schema.names + ["idx"]
                        schema = pa.schema([batch.schema.field(n) for n in batch.schema.names]
                                           + [pa.field("idx", pa.int64())],
                                           metadata={"tdlm": json.dumps({"tokenizer_fingerprint": fingerprint,
                                                                         "seq_len": seq_len})})
                        state.update(sink=pa.OSFile(str(out_dir / shards[-1]["file"]), "wb"), rows=0)
                        state["writer"] = pa.ipc.new_stream(state["sink"], schema)
                    piece = batch.slice(start, min(batch.num_rows - start, shard_rows - state["rows"]))
                    idx = pa.array(np.arange(row, row + piece.num_rows, dtype=np.int64))
                    state["writer"].write_batch(pa.record_batch(piece.columns + [idx], names=names))
                    tokens = piece.column("input_ids").flatten().to_numpy()
                    c = np.bincount(tokens, minlength=len(counts))
                    counts = np.pad(counts, (0, len(c) - len(counts))) + c
                    start += piece.num_rows
                    state["rows"] += piece.num_rows
                    row += piece.num_rows
    close()
    valid = int(counts.sum() - (counts[pad] if pad is not None and pad < len(counts) else 0))
    return {"shards": shards, "rows": row, "tokens": valid, "unigram_counts": counts}


def _tokenize_and_pack(texts: Iterable[str], tok, seq_len: int, packing: bool, add_special: bool, num_proc: int,
                       document_ids: bool = False):
    """An in-memory ``datasets.Dataset`` of the rows ``prepare_dataset`` makes from ``texts``: for small inputs
    held by the caller (evaluation text files)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        doc_file = Path(tmp) / "documents.arrow"
        _write_documents(texts, doc_file)
        packed = pack_documents(doc_file, Path(tmp) / "rows", tok, seq_len, packing, add_special, num_proc,
                                document_ids)
        return load_shards(Path(tmp) / "rows", packed["shards"], tokenizer_fingerprint(tok), in_memory=True)


def _fingerprint(cfg: DataSection) -> str:
    keys = ("source", "paths", "hub_name", "hub_config", "text_column", "tokenizer", "vocab_size", "seq_len",
            "packing", "val_fraction", "max_documents", "markov_order", "markov_symbols", "markov_tokens",
            "markov_concentration", "seed")
    d = {k: asdict(cfg)[k] for k in keys}
    # keys added later enter only when set, so the caches of data configs without them stay valid
    if cfg.document_mask:
        d["document_mask"] = True
    if cfg.source == "sft":
        d.update(sft_padding=cfg.sft_padding, sft_template=cfg.sft_template, sft_overlong=cfg.sft_overlong)
    # every file read, so a file added to (or edited in) a data.paths directory makes a new cache entry
    files = data_files(cfg) if cfg.source == "files" else [Path(p) for p in cfg.paths]
    d["paths"] = [(str(p), p.stat().st_mtime_ns if p.exists() else 0) for p in files]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def prepare_dataset(cfg: DataSection, out_dir: str | Path | None = None, log=print) -> Path:
    """Build (or reuse) ``<dir>/{train,validation,tokenizer,info.json}`` for a data config; returns the dir. Each
    split directory holds Arrow shards (``info.json`` lists them with their rows and bytes). Memory stays flat in
    corpus size except for the BPE trainer's word counts, which grow with the vocabulary of the text, not its
    length."""
    import shutil

    import datasets

    datasets.disable_progress_bars()
    out = Path(out_dir) if out_dir else Path(cfg.cache_dir) / _fingerprint(cfg)
    if (out / "info.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build_prepared(cfg, tmp, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # a concurrent writer finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def _build_prepared(cfg: DataSection, tmp: Path, log) -> None:
    """Write the splits' shards, the tokenizer and info.json into ``tmp`` (see ``prepare_dataset``)."""
    if cfg.source == "sft":
        return _build_sft(cfg, tmp, log)
    doc_files = {split: tmp / f"{split}.documents.arrow" for split in SPLITS}
    counts = {split: _write_documents(iter_split(cfg, split), doc_files[split]) for split in SPLITS}
    if not counts["train"]:
        raise ConfigError(f"data.source={cfg.source}: the training split is empty")
    if not counts["validation"]:
        raise ConfigError(f"data.source={cfg.source}: the validation split is empty (raise data.val_fraction)")
    info = {"source": cfg.source, "num_train_documents": counts["train"], "num_val_documents": counts["validation"],
            "seq_len": cfg.seq_len}
    if cfg.source == "markov":
        src = markov_from_config(cfg)
        tok = markov_tokenizer(src)
        info.update(entropy_rate=src.entropy_rate, true_nll_per_token=src.block_entropy_per_token(cfg.seq_len),
                    true_perplexity=math.exp(src.block_entropy_per_token(cfg.seq_len)))
    elif cfg.tokenizer == "train":
        tok = train_bpe_tokenizer(_document_batches(doc_files["train"]), cfg.vocab_size)
    else:
        tok = load_pretrained_tokenizer(cfg.tokenizer)
    add_special = cfg.source != "markov"
    log(f"tokenizing {counts['train']} train / {counts['validation']} validation documents (vocab {len(tok)})")
    info["format"] = "shards"
    info["shards"] = {}
    for name in SPLITS:
        # document ids are written when document-masked packing asks for them (data.document_mask, issue 13)
        packed = pack_documents(doc_files[name], tmp / name, tok, cfg.seq_len, cfg.packing, add_special,
                                cfg.num_proc, document_ids=bool(getattr(cfg, "document_mask", False)))
        doc_files[name].unlink()
        if packed["rows"] == 0:
            raise ConfigError(f"data: the {name} split produced no blocks of data.seq_len={cfg.seq_len}")
        info["shards"][name] = packed["shards"]
        info[f"num_{name}_blocks"] = packed["rows"]
        info[f"num_{name}_tokens"] = packed["tokens"]
        if name == "train":
            info["unigram_accuracy"] = _unigram_share(packed["unigram_counts"], tok.pad_token_id)
    _write_tokenizer_and_info(tmp, tok, info)


def _build_sft(cfg: DataSection, tmp: Path, log) -> None:
    """SFT examples (``tdlm/sft.py``: one example a row, with its loss mask) saved as ``datasets`` directories,
    which ``load_prepared`` memory-maps like the shards; an SFT corpus is small enough to build in memory."""
    from tdlm.sft import build_sft_splits

    def tok_factory(texts):
        return train_bpe_tokenizer(texts, cfg.vocab_size) if cfg.tokenizer == "train" else \
            load_pretrained_tokenizer(cfg.tokenizer)

    tok, splits, info = build_sft_splits(cfg, tok_factory, log)
    info["seq_len"] = cfg.seq_len
    for name, ds in splits.items():
        if len(ds) == 0:
            raise ConfigError(f"data: the {name} split produced no blocks of data.seq_len={cfg.seq_len}")
        ds.save_to_disk(str(tmp / name))
        info[f"num_{name}_blocks"] = len(ds)
        if name == "train":
            info["unigram_accuracy"] = unigram_accuracy(ds, tok.pad_token_id)
    _write_tokenizer_and_info(tmp, tok, info)


def _write_tokenizer_and_info(tmp: Path, tok, info: dict) -> None:
    """The tokenizer and ``info.json`` (with the tokenizer's fingerprint, which loading checks) of a prepared dir."""
    tok.save_pretrained(str(tmp / "tokenizer"))
    info["tokenizer_fingerprint"] = tokenizer_fingerprint(tok)
    (tmp / "info.json").write_text(json.dumps(info, indent=2))


def _unigram_share(counts: np.ndarray, pad_token_id: int | None) -> float:
    counts = counts.copy()
    if pad_token_id is not None and pad_token_id < len(counts):
        counts[pad_token_id] = 0
    return float(counts.max() / counts.sum()) if counts.sum() else math.nan


def unigram_accuracy(ds, pad_token_id: int) -> float:
    """The share of non-pad tokens equal to the most frequent one: the mask accuracy of a model that has learned
    token frequencies and nothing else (masking picks non-pad positions uniformly). Counted in chunks."""
    counts = np.zeros(0, dtype=np.int64)
    for batch in ds.with_format("numpy", columns=["input_ids"]).iter(batch_size=8192):
        c = np.bincount(np.asarray(batch["input_ids"]).ravel(), minlength=len(counts))
        counts = np.pad(counts, (0, len(c) - len(counts))) + c
    return _unigram_share(counts, pad_token_id)


@dataclass
class PreparedData:
    train: object
    validation: object
    tokenizer: object
    info: dict

    def baselines(self) -> dict:
        """What a model can reach on this data, for health thresholds relative to it (``build_text_metrics``):
        the training split's unigram accuracy and, for a corpus with a known entropy (markov), the optimal loss
        (nats per token)."""
        unigram = self.info.get("unigram_accuracy")
        if unigram is None:  # prepared before it was measured at preparation time
            unigram = unigram_accuracy(self.train, self.tokenizer.pad_token_id)
        return {"unigram_accuracy": unigram, "optimal_loss": self.info.get("true_nll_per_token")}


def load_shards(split_dir: Path, shards: list[dict], fingerprint: str, in_memory: bool = False):
    """The memory-mapped ``datasets.Dataset`` of a split's shards, each checked against ``info.json`` (size, rows)
    and the tokenizer fingerprint in its metadata; a bad shard is one ConfigError line naming it."""
    import datasets
    import pyarrow as pa

    parts = []
    for shard in shards:
        path = split_dir / shard["file"]
        again = "; prepare the data again (data_prep/prepare.py, or delete it from data.cache_dir)"
        if not path.is_file():
            raise ConfigError(f"data.paths: shard {path} is missing{again}")
        try:
            with pa.OSFile(str(path)) as src:
                meta = json.loads((pa.ipc.open_stream(src).schema.metadata or {}).get(b"tdlm", b"{}"))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ConfigError(f"data.paths: shard {path} is corrupt ({str(exc).splitlines()[0]}){again}") from None
        if meta.get("tokenizer_fingerprint") != fingerprint:
            raise ConfigError(f"data.paths: shard {path} was tokenized with tokenizer "
                              f"{meta.get('tokenizer_fingerprint')}, not this data's {fingerprint}; a shard directory "
                              f"from other data{again}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise ConfigError(f"data.paths: shard {path} is corrupt: {size} bytes, info.json says {shard['bytes']}"
                              f"{again}")
        try:
            part = datasets.Dataset.from_file(str(path), in_memory=in_memory)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ConfigError(f"data.paths: shard {path} is corrupt ({str(exc).splitlines()[0]}){again}") from None
        if len(part) != shard["rows"]:
            raise ConfigError(f"data.paths: shard {path} is corrupt: {len(part)} rows, info.json says {shard['rows']}"
                              f"{again}")
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_prepared(path: str | Path) -> PreparedData:
    import datasets
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "info.json").is_file():
        raise ConfigError(f"data.paths: {path} is not a prepared dataset (no info.json); run data_prep/prepare.py")
    try:
        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except Exception as exc:  # noqa: BLE001 - many loader errors; one clear line for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.tokenizer: cannot load {path / 'tokenizer'}: {reason}") from None
    info = json.loads((path / "info.json").read_text())
    fingerprint = tokenizer_fingerprint(tok)
    if info.get("tokenizer_fingerprint", fingerprint) != fingerprint:
        raise ConfigError(f"data.paths: {path / 'tokenizer'} (fingerprint {fingerprint}) is not the tokenizer the "
                          f"data were made with ({info['tokenizer_fingerprint']}); prepare the data again")
    if "shards" in info:
        train, val = (load_shards(path / s, info["shards"][s], fingerprint) for s in SPLITS)
    else:  # a directory written by datasets.save_to_disk (before shards)
        train, val = (datasets.load_from_disk(str(path / s)) for s in SPLITS)
    return PreparedData(train.with_format("torch"), val.with_format("torch"), tok, info)


def resolve_data(cfg: DataSection, log=print) -> PreparedData:
    if cfg.source == "prepared":
        if not cfg.paths:
            raise ConfigError("data.paths: source=prepared needs the directory written by data_prep/prepare.py")
        data = load_prepared(cfg.paths[0])
        if cfg.tokenizer != "train":  # a named tokenizer (or model.pretrained's) must be the one the data used
            named = tokenizer_fingerprint(load_pretrained_tokenizer(cfg.tokenizer))
            if named != data.info.get("tokenizer_fingerprint", named):
                raise ConfigError(f"data.tokenizer: {cfg.tokenizer} (fingerprint {named}) is not the tokenizer "
                                  f"{cfg.paths[0]} was made with ({data.info['tokenizer_fingerprint']})")
    else:
        data = load_prepared(prepare_dataset(cfg, log=log))
    seq = data.info["seq_len"]
    if seq != cfg.seq_len:
        raise ConfigError(f"data.seq_len: {cfg.seq_len} differs from the prepared data's {seq}")
    return data

class ShardOrderSampler(torch.utils.data.Sampler):
    """``data.streaming``: training rows read shard by shard instead of shuffled over the whole split.

    Process r of W reads the shards r, r+W, ...; each epoch permutes (by the seed) their order and the rows within
    each shard, so a process keeps to one shard at a time. The order yielded here interleaves the processes'
    micro-batches, so Accelerate's batch sharding (global batch i to process i mod W) gives each process its own
    shards. An epoch is as many micro-batches per process as the process with the fewest rows has (the others drop
    their remainder), so all take the same number. Where a process is, ``position``: (shard, offset)."""

    def __init__(self, shard_rows: list[int], files: list[str], batch_size: int, num_processes: int, seed: int):
        if len(shard_rows) < num_processes:
            raise ConfigError(f"data.streaming: the training split has {len(shard_rows)} shard(s), fewer than the "
                              f"{num_processes} processes; prepare it in smaller shards or train without streaming")
        self.rows, self.files, self.batch_size, self.seed = shard_rows, files, batch_size, seed
        self.world = num_processes
        self.starts = np.concatenate([[0], np.cumsum(shard_rows)[:-1]]).astype(np.int64)
        self.batches = min(sum(shard_rows[r::num_processes]) for r in range(num_processes)) // batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size * self.world

    def _shards(self, rank: int, epoch: int) -> list[int]:
        mine = list(range(rank, len(self.rows), self.world))
        return [mine[i] for i in np.random.default_rng([self.seed, epoch, rank]).permutation(len(mine))]

    def _rows(self, rank: int, epoch: int) -> Iterator[int]:
        for shard in self._shards(rank, epoch):
            order = np.random.default_rng([self.seed, epoch, len(self.rows) + shard]).permutation(self.rows[shard])
            yield from (self.starts[shard] + order).tolist()

    def __iter__(self) -> Iterator[int]:
        streams = [self._rows(r, self.epoch) for r in range(self.world)]
        for _ in range(self.batches):
            for stream in streams:
                yield from itertools.islice(stream, self.batch_size)

    def position(self, epoch: int, batches: int) -> list[dict]:
        """Each process's next row after ``batches`` micro-batches of ``epoch``: its shard file and the offset in
        that shard's (permuted) order."""
        out = []
        for rank in range(self.world):
            left = batches * self.batch_size
            for shard in self._shards(rank, epoch):
                if left < self.rows[shard]:
                    break
                left -= self.rows[shard]
            out.append({"process": rank, "epoch": epoch, "shard": self.files[shard], "offset": left})
        return out


class Collator:
    """Stacks rows; adds ``attention_mask`` only when the batch holds padding (packed batches skip the mask)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows):
        ids = torch.stack([r["input_ids"] for r in rows]).long()
        batch = {"input_ids": ids, "idx": torch.stack([r["idx"] for r in rows]).long()}
        for key, dtype in (("loss_mask", torch.bool), ("document_ids", torch.long)):  # SFT, document masks
            if key in rows[0]:
                batch[key] = torch.stack([torch.as_tensor(r[key]) for r in rows]).to(dtype)
        valid = ids != self.pad
        if not bool(valid.all()):
            batch["attention_mask"] = valid
        return batch
