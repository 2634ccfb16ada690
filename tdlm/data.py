"""Data: the embedded corpora, the tokenizer, and tokenize-and-pack into fixed-length blocks with ``datasets``.

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
import json
import math
import sysconfig
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


def hash_split(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by a hash of each text (stable across runs and machines)."""
    train, val = [], []
    for text in texts:
        h = int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "little") / 2**64
        (val if h < val_fraction else train).append(text)
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


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained with ``tokenizers`` on the training split, wrapped for ``transformers``."""
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
# Raw text loading


def raw_splits(cfg: DataSection) -> tuple[list[str], list[str]]:
    """Train and validation texts for text sources (not 'prepared')."""
    if cfg.source == "stdlib":
        train, val = hash_split(stdlib_docstrings(), cfg.val_fraction)
    elif cfg.source == "markov":
        train, val = markov_from_config(cfg).documents(cfg.markov_tokens, cfg.seq_len, cfg.val_fraction, cfg.seed)
    elif cfg.source == "files":
        train, val = hash_split(_read_files(cfg), cfg.val_fraction)
    elif cfg.source == "hub":
        train, val = _read_hub(cfg)
    else:
        raise ConfigError(f"data.source: {cfg.source!r} has no raw text")
    if cfg.max_documents:
        train, val = train[: cfg.max_documents], val[: max(1, int(cfg.max_documents * cfg.val_fraction))]
    if not train:
        raise ConfigError(f"data.source={cfg.source}: the training split is empty")
    if not val:
        raise ConfigError(f"data.source={cfg.source}: the validation split is empty (raise data.val_fraction)")
    return train, val


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


def _read_files(cfg: DataSection) -> list[str]:
    import datasets

    texts = []
    for path in data_files(cfg):
        kind = DATA_FILE_KINDS[path.suffix]
        if kind == "text":  # one document per blank-line-separated paragraph
            texts += [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
            continue
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        if cfg.text_column not in ds.column_names:
            raise ConfigError(f"data.text_column: {cfg.text_column!r} not in {path} (columns: {ds.column_names})")
        texts += [t for t in ds[cfg.text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ConfigError(f"data.paths: no text found in {', '.join(map(str, cfg.paths))}")
    return texts


def _read_hub(cfg: DataSection) -> tuple[list[str], list[str]]:  # pragma: no cover - needs the network
    import datasets

    ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None)
    train = [t for t in ds["train"][cfg.text_column] if t.strip()]
    if "validation" in ds:
        val = [t for t in ds["validation"][cfg.text_column] if t.strip()]
    else:
        train, val = hash_split(train, cfg.val_fraction)
    return train, val


# ----------------------------------------------------------------------------------------------------------
# Tokenize and pack


def _tokenize_and_pack(texts: list[str], tok, seq_len: int, packing: bool, add_special: bool, num_proc: int,
                       document_ids: bool = False):
    """A ``datasets.Dataset`` of fixed-length rows {input_ids, idx}; only a final partial block is right-padded.
    ``document_ids``: also {document_ids}, the document of each position (numbered within each packing batch;
    only equality within a row matters), for document-masked attention (``tdlm/sequences.py``)."""
    import datasets

    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [[bos] + x + [eos] if add_special else x for x in ids]}

    def pad_row(row):
        return row + [pad] * (seq_len - len(row))

    def pack(batch):
        if not packing:
            return {"input_ids": [pad_row(x[:seq_len]) for x in batch["ids"]]}
        flat = [t for x in batch["ids"] for t in x]
        rows = [flat[i:i + seq_len] for i in range(0, len(flat), seq_len)]
        if document_ids:
            docs = [d for d, x in enumerate(batch["ids"]) for _ in x]
            cuts = [docs[i:i + seq_len] for i in range(0, len(docs), seq_len)]
            return {"input_ids": [pad_row(r) for r in rows], "document_ids": [c + [-1] * (seq_len - len(c))
                                                                               for c in cuts]}
        return {"input_ids": [pad_row(r) for r in rows]}

    ds = datasets.Dataset.from_dict({"text": texts})
    nproc = num_proc if num_proc > 1 and len(texts) >= 2 * num_proc else None
    ds = ds.map(tokenize, batched=True, num_proc=nproc, remove_columns=["text"], desc="tokenize")
    ds = ds.map(pack, batched=True, batch_size=2000, num_proc=nproc, remove_columns=["ids"], desc="pack")
    return ds.map(lambda _, i: {"idx": i}, with_indices=True)


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
    """Build (or reuse) ``<dir>/{train,validation,tokenizer,info.json}`` for a data config; returns the dir."""
    import datasets

    datasets.disable_progress_bars()
    out = Path(out_dir) if out_dir else Path(cfg.cache_dir) / _fingerprint(cfg)
    if (out / "info.json").is_file():
        return out
    if cfg.source == "sft":
        from tdlm.sft import build_sft_splits

        def tok_factory(texts):
            return train_bpe_tokenizer(texts, cfg.vocab_size) if cfg.tokenizer == "train" else \
                load_pretrained_tokenizer(cfg.tokenizer)

        tok, splits, info = build_sft_splits(cfg, tok_factory, log)
        info["seq_len"] = cfg.seq_len
        return save_prepared(out, splits, tok, info)
    train, val = raw_splits(cfg)
    info = {"source": cfg.source, "num_train_documents": len(train), "num_val_documents": len(val),
            "seq_len": cfg.seq_len}
    if cfg.source == "markov":
        src = markov_from_config(cfg)
        tok = markov_tokenizer(src)
        info.update(entropy_rate=src.entropy_rate, true_nll_per_token=src.block_entropy_per_token(cfg.seq_len),
                    true_perplexity=math.exp(src.block_entropy_per_token(cfg.seq_len)))
    elif cfg.tokenizer == "train":
        tok = train_bpe_tokenizer(train, cfg.vocab_size)
    else:
        tok = load_pretrained_tokenizer(cfg.tokenizer)
    add_special = cfg.source != "markov"
    log(f"tokenizing {len(train)} train / {len(val)} validation documents (vocab {len(tok)})")
    splits = {name: _tokenize_and_pack(texts, tok, cfg.seq_len, cfg.packing, add_special, cfg.num_proc,
                                       document_ids=cfg.document_mask)
              for name, texts in (("train", train), ("validation", val))}
    return save_prepared(out, splits, tok, info)


def save_prepared(out: Path, splits: dict, tok, info: dict) -> Path:
    """Write ``<out>/{train,validation,tokenizer,info.json}`` through a temporary directory (a concurrent writer
    that finished first wins); returns ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    for name, ds in splits.items():
        if len(ds) == 0:
            raise ConfigError(f"data: the {name} split produced no blocks of data.seq_len={info['seq_len']}")
        ds.save_to_disk(str(tmp / name))
        info[f"num_{name}_blocks"] = len(ds)
        if name == "train":
            info["unigram_accuracy"] = unigram_accuracy(ds, tok.pad_token_id)
    tok.save_pretrained(str(tmp / "tokenizer"))
    info["tokenizer_fingerprint"] = tokenizer_fingerprint(tok)
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    if out.exists():  # a concurrent writer finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def unigram_accuracy(ds, pad_token_id: int) -> float:
    """The share of non-pad tokens equal to the most frequent one: the mask accuracy of a model that has learned
    token frequencies and nothing else (masking picks non-pad positions uniformly). Counted in chunks."""
    counts = np.zeros(0, dtype=np.int64)
    for batch in ds.with_format("numpy", columns=["input_ids"]).iter(batch_size=8192):
        c = np.bincount(np.asarray(batch["input_ids"]).ravel(), minlength=len(counts))
        counts = np.pad(counts, (0, len(c) - len(counts))) + c
    if pad_token_id is not None and pad_token_id < len(counts):
        counts[pad_token_id] = 0
    return float(counts.max() / counts.sum()) if counts.sum() else math.nan


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
    train = datasets.load_from_disk(str(path / "train")).with_format("torch")
    val = datasets.load_from_disk(str(path / "validation")).with_format("torch")
    return PreparedData(train, val, tok, json.loads((path / "info.json").read_text()))


def resolve_data(cfg: DataSection, log=print) -> PreparedData:
    if cfg.source == "prepared":
        if not cfg.paths:
            raise ConfigError("data.paths: source=prepared needs the directory written by data_prep/prepare.py")
        data = load_prepared(cfg.paths[0])
    else:
        data = load_prepared(prepare_dataset(cfg, log=log))
    seq = data.info["seq_len"]
    if seq != cfg.seq_len:
        raise ConfigError(f"data.seq_len: {cfg.seq_len} differs from the prepared data's {seq}")
    return data


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
