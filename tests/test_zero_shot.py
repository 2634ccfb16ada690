"""The zero-shot protocol: detokenizers on known strings, chunking that never drops a token, local fixtures in
each set's schema (tests/data/zero_shot), the AR number against a direct computation, and bad input."""

import json
import math

import pytest
import torch
from conftest import tiny_overrides
from test_eval_cli import load_script

from tdlm.config import load_config
from tdlm.tasks import text_engine
from tdlm.zero_shot import (SETS, document_ids, lambada_detokenize, lm1b_detokenize, load_documents, pack_blocks,
                            ptb_detokenize, scientific_papers_detokenize, wikitext_detokenize)

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = __import__("pathlib").Path(__file__).parent / "data" / "zero_shot"
zero_shot = load_script("zero_shot")


def stdlib_runs(tmp):
    """A tiny diffusion run and a tiny AR run on the stdlib docstrings with a 512-token byte-level BPE, so English
    fixtures tokenize without unknown tokens. 8 steps each (seconds)."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, extra in (("diff", {}), ("ar", {"model.causal": True})):
        cfg = load_config(None, tiny_overrides(tmp, **{"trainer.run_name": name, "trainer.max_steps": 8,
                                                       "data.source": "stdlib", "data.vocab_size": 512,
                                                       "model.max_seq_len": 64, "data.seq_len": 64,
                                                       "trainer.save_every_n_steps": 8, "data.eval_batches": 1,
                                                       "trainer.eval_every_n_steps": 8, **extra}))
        engine = text_engine(cfg)
        engine.fit()
        engine.close()
        out[name] = cfg.run_dir
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return stdlib_runs(tmp_path_factory.mktemp("zs"))


@pytest.mark.parametrize("fn, before, after", [
    (wikitext_detokenize, ' = = Early life = = \n The band ( formed in 1990 ) sold 1 @,@ 000 copies , and " it " was '
                          '3 @.@ 5 m long . ', ' == Early life ==\nThe band (formed in 1990) sold 1,000 copies, and '
                                               '"it" was 3.5 m long. '),
    (wikitext_detokenize, "a well @-@ known player 's 10 ° C", "a well-known player's 10°C"),
    (ptb_detokenize, "the company 's shares fell N N to $ N a share <unk> and it did n't \\/ rise",
     "the company's shares fell 1 1 to $1 a share ? and it didn't / rise"),
    (lm1b_detokenize, 'He said : " I know " ( really ) , see http : / / example.com now .',
     'He said: "I know" (really), see http://example.com now.'),
    (lm1b_detokenize, "It 's £ 200 ?", "It's £200?"),
    (lambada_detokenize, "  \u201cHello,\u201d she said  ", '\n"Hello," she said'),
    (scientific_papers_detokenize, "the bound ( theorem 1 ) holds for 10 @,@ 000 ; see [ 1 , 2 ] .",
     "the bound (theorem 1) holds for 10,000; see [1, 2] ."),  # MDLM rejoins " ." only after a word
])
def test_detokenizers_on_known_strings(fn, before, after):
    assert fn(before) == after


def test_every_fixture_loads_in_its_schema_and_chunking_never_drops_a_token(runs):
    from tdlm.data import _tokenize_and_pack
    from tdlm.runs import load_checkpoint

    tok = load_checkpoint(runs["diff"], "latest").tokenizer
    for name in SETS:
        docs = load_documents(name, FIXTURES / f"{name}.jsonl")
        ids = document_ids(tok, docs)
        assert 150 <= sum(map(len, ids)) <= 1500, name  # a few hundred tokens each
        wrapped = pack_blocks(ids, 64, tok.pad_token_id, "wrap")
        # wrap = the trainer's own packing, pad for pad
        assert wrapped == _tokenize_and_pack(docs, tok, 64, True, True, 1)["input_ids"], name
        per_doc = pack_blocks(ids, 64, tok.pad_token_id, "per-document")
        assert len(per_doc) == sum(math.ceil(len(x) / 64) for x in ids)
        for blocks in (wrapped, per_doc):
            assert [t for b in blocks for t in b if t != tok.pad_token_id] == [t for x in ids for t in x]
    assert load_documents("ptb", FIXTURES / "ptb.jsonl")[0].startswith("the company said its profit rose 1 1 to $1")
    assert pack_blocks([[5, 6, 7]], 8, 0) == [[5, 6, 7, 0, 0, 0, 0, 0]]  # shorter than a block: padded, not dropped


def test_diffusion_and_ar_on_fixtures_short_set_finite_and_ar_exact(runs, capsys, tmp_path):
    from tdlm.runs import load_checkpoint

    args = ["--data-root", str(FIXTURES), "--datasets", "ptb", "lm1b", "--estimator", "exact-k",
            "--mc-passes", "3", "--max-documents", "1", "--out", str(tmp_path), "--json"]
    capsys.readouterr()
    assert zero_shot.main(["--checkpoint", str(runs["diff"]), "--which", "latest"] + args) == 0
    diff = json.loads(capsys.readouterr().out)
    tok = load_checkpoint(runs["diff"], "latest").tokenizer
    for r in diff["sets"]:  # one document, shorter than one block of 64: one padded block, every token scored
        n = len(document_ids(tok, load_documents(r["dataset"], FIXTURES / f"{r['dataset']}.jsonl")[:1])[0])
        assert n < 64 and r["num_blocks"] == 1 and r["num_tokens"] == n
        assert r["kind"] == "bound" and r["estimator"] == "exact-k" and r["mc_passes"] == 3
        assert math.isfinite(r["nelbo_per_token"]) and 0 < r["stderr"] < r["nelbo_per_token"]
        assert r["perplexity"] == pytest.approx(math.exp(r["nelbo_per_token"]), rel=1e-12)
    assert set(diff["not_available"]) == set(SETS) - {"ptb", "lm1b"}
    md = (tmp_path / "zero_shot.md").read_text()
    assert "| ptb | <=" in md and "95.26" in md and "82.05" in md  # MDLM and AR beside ours
    # AR: the exact NLL per token of the wrapped fixture equals a direct computation
    capsys.readouterr()
    assert zero_shot.main(["--checkpoint", str(runs["ar"]), "--which", "latest", "--data-root", str(FIXTURES),
                           "--datasets", "lm1b", "--seq-len", "32", "--json"]) == 0
    ar = json.loads(capsys.readouterr().out)["sets"][0]
    ck = load_checkpoint(runs["ar"], "latest")
    blocks = torch.tensor(pack_blocks(document_ids(ck.tokenizer, load_documents("lm1b", FIXTURES / "lm1b.jsonl")),
                                      32, ck.tokenizer.pad_token_id))
    valid = blocks != ck.tokenizer.pad_token_id
    with torch.no_grad():
        logp = ck.model(blocks, valid).double().log_softmax(-1)[:, :-1]
    nll = -logp.gather(2, blocks[:, 1:, None]).squeeze(2)
    tgt = valid[:, 1:]
    assert ar["kind"] == "exact" and ar["stderr"] == 0.0 and ar["num_tokens"] == int(tgt.sum())
    assert ar["nelbo_per_token"] == pytest.approx(float(nll[tgt].sum() / tgt.sum()), rel=1e-6)


def test_bad_input_gives_one_clear_line(runs, capsys, tmp_path):
    ck = ["--checkpoint", str(runs["diff"]), "--which", "latest"]
    cases = [(["--datasets", "ptb2", "--data-root", str(FIXTURES)], "unknown dataset 'ptb2'"),
             (["--data", "ptb=" + str(tmp_path / "none.jsonl")], "does not exist"),
             (["--datasets", "arxiv", "--data", "ptb=x"], "no local data for arxiv"),
             (["--data", "lm1b=" + str(FIXTURES / "ptb.jsonl")], "has no 'text' column"),
             (["--data-root", str(FIXTURES), "--datasets", "ptb", "--seq-len", "65"], "--seq-len: 65 is outside")]
    for extra, msg in cases:
        capsys.readouterr()
        assert zero_shot.main(ck + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], (extra, err)
    # a checkpoint without a tokenizer
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(sorted((runs["diff"] / "checkpoints").iterdir())[-1], bare)
    shutil.rmtree(bare / "tokenizer", ignore_errors=True)
    capsys.readouterr()
    assert zero_shot.main(["--checkpoint", str(bare), "--data-root", str(FIXTURES), "--datasets", "ptb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer" in err[0], err
