"""The zero-shot perplexity protocol of MDLM/DUO: eight public test sets, their detokenizers, the chunking into
blocks of the model's length, and the published figures the results are put beside.

Protocol (``eval/zero_shot.py`` runs it on a checkpoint):

1. Load the set through ``datasets`` from a local path only (a .jsonl/.json/.parquet/.csv/.txt file, a folder of
   such files, or a ``save_to_disk`` directory); nothing is downloaded. The column read is the set's own
   (``sentence`` for PTB, ``article`` for the scientific papers, else ``text``); empty entries are skipped.
2. Undo the set's tokenization artefacts with its detokenizer (below; they follow the ones in
   kuleshov-group/mdlm ``dataloader.py``, which DUO and BD3-LM reuse, so GPT-2-style tokenizers see running text).
3. Tokenize every document as the trainer does, ``[BOS] doc [EOS]``, with the checkpoint's tokenizer, and cut
   into blocks of L tokens (L = the model's length unless ``--seq-len``):
   - ``wrap`` (default, MDLM's ``wrap=True``): the documents are concatenated and cut every L tokens, exactly as
     the trainer packs its data (``tdlm.data._tokenize_and_pack``), so zero-shot and in-domain numbers share one
     recipe. MDLM instead frames every block as ``[BOS] 1022 tokens [EOS]`` and drops the remainder, which leaves
     PTB at L=1024 with no block at all (duo #9);
   - ``per-document``: every document starts its own block (no context across documents).
   In both the last block is right-padded and its pads are never scored, so a set shorter than one block still
   yields all its tokens; no token is ever dropped.
4. Score the blocks with ``tdlm.likelihood.score_rows``: the NELBO bound per token with its Monte-Carlo stderr
   (estimator and passes recorded), or the exact NLL for an AR checkpoint (the first token of a block is context).

The published numbers below are for OWT-trained models at L=1024 with the GPT-2 tokenizer; a model trained
otherwise is not comparable to them, and the report says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Detokenizers. Each undoes what its corpus's preprocessing did to raw text; the rules follow MDLM's
# (kuleshov-group/mdlm ``dataloader.py``, reused by DUO and BD3-LM), so that our numbers use the same text.


def wikitext_detokenize(x: str) -> str:
    """WikiText (Merity et al. 2016) splits punctuation off and escapes number separators as ``@-@``, ``@,@``,
    ``@.@``; headings are ``= = Title = =``. Joins them back. (MDLM's version also holds a regex with literal
    slashes, ``/' [0-9]/``, that can only match that literal string; it is left out.)"""
    x = x.replace("s '", "s'")
    for sep in "-,.":
        x = x.replace(f" @{sep}@ ", sep)
    for p in ":;.!?,":
        x = x.replace(f" {p} ", f"{p} ")
    # no spaces just inside brackets and quotes: "( a b )" -> "(a b)"
    for o, c in ("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"):
        x = re.sub(rf"{re.escape(o)}\s*([^{re.escape(c)}]*?)\s*{re.escape(c)}", rf"{o}\1{c}", x)
    for n in (4, 3, 2):  # heading markers "= = =" -> "==="
        x = x.replace(" ".join("=" * n), "=" * n)
    x = x.replace(" \u00b0 ", "\u00b0").replace(" \n", "\n").replace("\n ", "\n")
    return x.replace(" N ", " 1 ").replace(" 's", "'s")


def ptb_detokenize(x: str) -> str:
    """Penn Treebank (Marcus et al. 1993; the Mikolov et al. text-only version): lower-cased, clitics split
    (``it 's``, ``do n't``), ``/`` escaped as ``\\/``, every number replaced by ``N`` and rare words by ``<unk>``.
    Reattaches clitics, unescapes, writes numbers as 1 and ``<unk>`` as ``?`` (as MDLM does)."""
    x = x.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't").replace(" \n ", "\n")
    x = x.replace("\\/", "/")
    while " N " in x:  # overlapping matches ("N N N") need more than one pass
        x = x.replace(" N ", " 1 ")
    return x.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lm1b_detokenize(x: str) -> str:
    """One Billion Word (Chelba et al. 2013): Moses-style tokenized news sentences. Rejoins URLs, clitics,
    sentence punctuation, brackets, quotes and currency signs."""
    x = x.replace("http : / / ", "http://").replace("https : / / ", "https://")
    x = re.sub(r" '(\w+)", r"'\1", x)
    x = re.sub(r" (\w+) \. ", r" \1. ", x)
    x = re.sub(r" (\w+) \.$", r" \1.", x)
    for p in "?!":
        x = x.replace(f" {p} ", f"{p} ")
        x = re.sub(rf" \{p}$", p, x)
    x = x.replace(" , ", ", ").replace(" : ", ": ").replace(" ; ", "; ").replace(" / ", "/")
    x = re.sub(r'" ([^"]+) "', r'"\1"', x)
    x = re.sub(r"' ([^']+) '", r"'\1'", x)
    x = re.sub(r"\( ([^()]+) \)", r"(\1)", x)
    x = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", x)
    return x.replace("$ ", "$").replace("\u00a3 ", "\u00a3")


def lambada_detokenize(x: str) -> str:
    """LAMBADA (Paperno et al. 2016; OpenAI's ``lambada_test.jsonl``, the GPT-2 version): curly double quotes
    become straight ones, and the passage starts on a new line, as MDLM scores it."""
    return "\n" + x.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers_detokenize(x: str) -> str:
    """arXiv / PubMed articles (Cohan et al. 2018): tokenized like WikiText and LM1B at once; both are applied."""
    return lm1b_detokenize(wikitext_detokenize(x))


def identity(x: str) -> str:
    """AG News is raw text; MDLM applies no detokenizer either."""
    return x


@dataclass(frozen=True)
class ZeroShotSet:
    name: str
    hub: str            # where the data comes from (documentation only; never downloaded)
    split: str          # the split MDLM scores
    column: str
    detokenize: Callable[[str], str]


SETS = {s.name: s for s in (
    ZeroShotSet("ptb", "ptb_text_only", "test", "sentence", ptb_detokenize),
    ZeroShotSet("wikitext2", "wikitext / wikitext-2-raw-v1", "test", "text", wikitext_detokenize),
    ZeroShotSet("wikitext103", "wikitext / wikitext-103-raw-v1", "test", "text", wikitext_detokenize),
    ZeroShotSet("lm1b", "lm1b", "test", "text", lm1b_detokenize),
    ZeroShotSet("lambada", "openaipublic gpt-2/data/lambada_test.jsonl", "test", "text", lambada_detokenize),
    ZeroShotSet("ag_news", "ag_news", "test", "text", identity),
    ZeroShotSet("pubmed", "scientific_papers / pubmed", "test", "article", scientific_papers_detokenize),
    ZeroShotSet("arxiv", "scientific_papers / arxiv", "test", "article", scientific_papers_detokenize),
)}
CHUNKING = ("wrap", "per-document")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def get_set(name: str) -> ZeroShotSet:
    if name not in SETS:
        raise ConfigError(f"--datasets: unknown dataset {name!r}; known: {', '.join(SETS)}")
    return SETS[name]


def load_documents(name: str, path: str | Path, split: str | None = None, max_documents: int = 0) -> list[str]:
    """The detokenized documents of one set from a local path (see the module docstring); never downloads."""
    import datasets

    zs, path = get_set(name), Path(path)
    split = split or zs.split
    if not path.exists():
        raise ConfigError(f"--data {name}: {path} does not exist")
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"--data {name}: {path} has no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
    elif path.is_dir():
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except ValueError as exc:  # no such split among the folder's files
            raise ConfigError(f"--data {name}: {path}: {str(exc).splitlines()[0]}") from None
    else:
        if path.suffix not in _FILE_BUILDERS:
            raise ConfigError(f"--data {name}: {path} is not one of {', '.join(_FILE_BUILDERS)} or a directory")
        ds = datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    if zs.column not in ds.column_names:
        raise ConfigError(f"--data {name}: {path} has no {zs.column!r} column (columns: {ds.column_names})")
    docs = [zs.detokenize(t) for t in ds[zs.column] if isinstance(t, str) and t.strip()]
    if max_documents:
        docs = docs[:max_documents]
    if not docs:
        raise ConfigError(f"--data {name}: {path} holds no non-empty {zs.column!r} entries")
    return docs


def pack_blocks(token_lists: list[list[int]], seq_len: int, pad_id: int, chunking: str = "wrap") -> list[list[int]]:
    """Blocks of ``seq_len`` ids: concatenated then cut (``wrap``), or each list cut on its own
    (``per-document``); only a list's (wrap: the set's) last block is right-padded, so no id is dropped."""
    if chunking not in CHUNKING:
        raise ConfigError(f"--chunking: {chunking!r} is not one of {', '.join(CHUNKING)}")
    groups = [[t for ids in token_lists for t in ids]] if chunking == "wrap" else token_lists
    return [blk + [pad_id] * (seq_len - len(blk)) for ids in groups for blk in
            (ids[i:i + seq_len] for i in range(0, len(ids), seq_len))]


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``[BOS] doc [EOS]`` per document, as the trainer tokenizes (``tdlm.data._tokenize_and_pack``)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [[bos] + ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def block_dataset(blocks: list[list[int]]):
    """Rows {input_ids, idx} in torch format, as ``tdlm.likelihood.score_rows`` reads them."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": blocks, "idx": list(range(len(blocks)))}).with_format("torch")


# ----------------------------------------------------------------------------------------------------------
# Published zero-shot perplexities (lower is better; diffusion rows are upper bounds). All: trained on
# OpenWebText, GPT-2 tokenizer, L=1024. Tags as in /work/shared/reference: [paper] read in the paper or quoted
# from it in a maintainer-visible issue, [recalled] not confirmed by a second source (check before quoting).

MDLM_PAPER = "Sahoo et al. 2024, MDLM (arXiv:2406.07524), zero-shot table, as quoted in kuleshov-group/mdlm #29"
PUBLISHED = [
    *({"model": "MDLM", "dataset": d, "perplexity": v, "bound": True, "source": MDLM_PAPER, "tag": "paper"}
      for d, v in (("ptb", 95.26), ("wikitext103", 32.83), ("lm1b", 67.01), ("lambada", 47.52),
                   ("ag_news", 61.15), ("pubmed", 41.89), ("arxiv", 37.37))),
    *({"model": "AR (MDLM's)", "dataset": d, "perplexity": v, "bound": False, "source": MDLM_PAPER, "tag": "paper"}
      for d, v in (("ptb", 82.05), ("lm1b", 51.25), ("lambada", 51.28), ("ag_news", 52.09), ("pubmed", 49.01),
                   ("arxiv", 41.73))),
    # mdlm #29 lists AR WikiText as 41.73, a repeat of the arXiv cell; the paper's value as we recall it:
    {"model": "AR (MDLM's)", "dataset": "wikitext103", "perplexity": 25.75, "bound": False,
     "source": "Sahoo et al. 2024, MDLM (arXiv:2406.07524); mdlm #29 misquotes it as 41.73", "tag": "recalled"},
    *({"model": "SEDD absorb (MDLM's)", "dataset": d, "perplexity": v, "bound": True,
       "source": "Sahoo et al. 2024, MDLM (arXiv:2406.07524), zero-shot table", "tag": "recalled"}
      for d, v in (("ptb", 100.09), ("wikitext103", 34.28), ("lm1b", 68.20), ("lambada", 49.86),
                   ("ag_news", 62.09), ("pubmed", 44.53), ("arxiv", 38.48))),
    *({"model": "DUO", "dataset": d, "perplexity": v, "bound": True,
       "source": "Sahoo et al. 2025, The Diffusion Duality (arXiv:2506.10892), zero-shot table", "tag": "recalled"}
      for d, v in (("ptb", 89.35), ("wikitext103", 33.57), ("lm1b", 73.86), ("lambada", 49.78),
                   ("ag_news", 67.81), ("pubmed", 44.48), ("arxiv", 40.39))),
    {"model": "DUO (chapter II)", "dataset": "ptb", "perplexity": 91.94, "bound": True,
     "source": "arXiv:2602.21185 via an aggregator (field-2026.md)", "tag": "recalled"},
    *({"model": "SEDD small", "dataset": d, "perplexity": v, "bound": True,
       "source": "Lou et al. 2024, SEDD (arXiv:2310.16834), zero-shot table", "tag": "recalled"}
      for d, v in (("lambada", 50.92), ("wikitext2", 41.84), ("ptb", 114.24), ("wikitext103", 40.62),
                   ("lm1b", 79.29))),
    *({"model": "GPT-2 small (SEDD's)", "dataset": d, "perplexity": v, "bound": False,
       "source": "Lou et al. 2024, SEDD (arXiv:2310.16834), zero-shot table", "tag": "recalled"}
      for d, v in (("lambada", 45.04), ("wikitext2", 42.43), ("ptb", 138.43), ("wikitext103", 41.60),
                   ("lm1b", 75.20))),
]


def published_for(dataset: str) -> list[dict]:
    return [p for p in PUBLISHED if p["dataset"] == dataset]


def find_local(name: str, data: dict, data_root: str | Path | None) -> Path | None:
    """The local path of a set: given as ``--data name=PATH``, else ``data_root/name{.jsonl,...}`` or
    ``data_root/name/``; None when there is none."""
    if name in data:
        return Path(data[name])
    if data_root:
        root = Path(data_root)
        for cand in [root / f"{name}{ext}" for ext in _FILE_BUILDERS] + [root / name]:
            if cand.exists():
                return cand
    return None


def resolve_paths(datasets: list | None, data: list, data_root: str | None) -> dict:
    """{set: local path} of the sets to score from ``--data NAME=PATH`` items and ``--data-root``; every named
    set must have data, and without names every set that has data is taken. Checked before a model is loaded."""
    given = {}
    for item in data:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--data: {item!r} is not NAME=PATH")
        given[get_set(name).name] = path
    names = [get_set(n).name for n in datasets] if datasets else list(SETS)
    paths = {n: p for n in names if (p := find_local(n, given, data_root)) is not None}
    missing = [n for n in (datasets or []) if n not in paths]
    if missing:
        raise ConfigError(f"--datasets: no local data for {', '.join(missing)} (give --data NAME=PATH or --data-root)")
    if not paths:
        raise ConfigError("--data: no local data for any set; nothing is downloaded")
    return paths


def evaluate_sets(ck, accelerator, paths: dict, chunking: str = "wrap", seq_len: int = 0, split: str | None = None,
                  estimator: str = "stratified", passes: int = 4, seed: int = 0, t_min: float | None = None,
                  batch_size: int = 16, max_documents: int = 0) -> list[dict]:
    """One result per set in ``paths`` {name: local path}: bound (or exact AR NLL) per token +- stderr, tokens
    scored and the full recipe."""
    import math

    from .likelihood import score_rows

    max_len = ck.model.config.max_seq_len
    seq_len = seq_len or max_len
    if not 2 <= seq_len <= max_len:
        raise ConfigError(f"--seq-len: {seq_len} is outside [2, the model's length {max_len}]")
    tok, out = ck.tokenizer, []
    for name, path in paths.items():
        docs = load_documents(name, path, split, max_documents)
        blocks = pack_blocks(document_ids(tok, docs), seq_len, tok.pad_token_id, chunking)
        res, recipe = score_rows(ck, block_dataset(blocks), accelerator, estimator, passes, seed, t_min, batch_size)
        se = 0.0 if ck.causal else res.stderr
        out.append({"dataset": name, "path": str(path), "split": split or SETS[name].split,
                    "detokenizer": SETS[name].detokenize.__name__, "chunking": chunking, "seq_len": seq_len,
                    "num_documents": len(docs), "num_blocks": len(blocks), "num_tokens": res.num_tokens,
                    "nelbo_per_token": res.nelbo_per_token, "stderr": se, "perplexity": res.perplexity,
                    "perplexity_95": None if se is None else
                    [math.exp(res.nelbo_per_token + s * 1.96 * se) for s in (-1, 1)],
                    "per_pass": res.per_pass, **recipe})
    return out


def markdown_table(results: list[dict], label: str = "ours") -> str:
    """Our figure per set (perplexity, bound marked <=, with the 95% interval from the stderr) beside every
    published figure for that set."""
    models = list(dict.fromkeys(p["model"] for r in results for p in published_for(r["dataset"])))
    head = ["set", f"{label} (ppl)", "nelbo/token +- stderr", "tokens", "recipe"] + models
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        pub = {p["model"]: p for p in published_for(r["dataset"])}
        bound = "<=" if r["kind"] == "bound" else ""
        se = "exact" if r["kind"] == "exact" else ("n/a" if r["stderr"] is None else f"{r['stderr']:.4f}")
        recipe = f"{r['estimator']} x{r['mc_passes']}, {r['chunking']} L={r['seq_len']}"
        cells = [r["dataset"], f"{bound}{r['perplexity']:.2f}", f"{r['nelbo_per_token']:.4f} +- {se}",
                 str(r["num_tokens"]), recipe]
        cells += [(("<=" if pub[m]["bound"] else "") + f"{pub[m]['perplexity']:.2f}"
                   + ("*" if pub[m]["tag"] == "recalled" else "")) if m in pub else "" for m in models]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nPublished: OWT-trained, GPT-2 tokenizer, L=1024 (not comparable to a model trained otherwise); "
                 "* = recalled, not confirmed by a second source. Sources: "
                 + "; ".join(sorted({p["source"] for p in PUBLISHED})) + ".")
    return "\n".join(lines)
