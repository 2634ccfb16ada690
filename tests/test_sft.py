"""SFT (conditional masked diffusion), never-masked tokens, variable length and document-masked packing: the prompt
is never masked or scored, the conditional NELBO equals exact enumeration over the response's mask sets, cut rows
carry no loss past their length, packed documents equal each document alone, bad input is one clear line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_diffusion import TinyDenoiser
from test_likelihood import selected

from conftest import launch_two_processes
from tdlm.config import ConfigError, load_config
from tdlm.diffusion import LinearSchedule, exact_nelbo
from tdlm.engine.randomness import keyed_generator
from tdlm.likelihood import NelboEstimator, sequence_nelbo, summarize
from tdlm.sequences import RandomLength, batch_positions, document_attention
from tdlm.tasks import text_engine

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def write_sft(path, n=240):
    """Toy examples: a prompt of 2-12 words, a response of 1-5 words that depends on it."""
    lines = []
    for i in range(n):
        prompt = " ".join(WORDS[(i * j + 3) % 10] for j in range(2 + i % 11))
        response = " ".join(WORDS[(i + j) % 10] for j in range(1 + i % 5))
        ex = {"prompt": prompt, "response": response} if i % 3 else {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
        lines.append(json.dumps(ex))
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_overrides(tiny, tmp_path, **extra):
    data = write_sft(tmp_path / "sft.jsonl") if not (tmp_path / "sft.jsonl").exists() else tmp_path / "sft.jsonl"
    base = {"data.source": "sft", "data.paths": f"[{data}]", "data.vocab_size": 300, "data.val_fraction": 0.1,
            "data.seq_len": 64, "model.max_seq_len": 64}
    return tiny(**{**base, **extra})


def prompt_of(batch):
    """Prompt positions: every position before the first response token."""
    return batch["loss_mask"].long().cumsum(1) == 0


@pytest.mark.parametrize("estimator", ["bernoulli", "exact-k", "importance"])
def test_prompt_never_masked_or_scored_across_many_steps(tiny, tmp_path, estimator):
    engine = text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{"diffusion.estimator": estimator,
                                                                             "trainer.run_name": estimator})))
    try:
        task, B = engine.task, 8
        rows = [task.train_set[i] for i in range(64)]
        masked_responses = 0
        for step in range(1, 41):
            batch = task.collate_fn(rows[(step * B) % 64:(step * B) % 64 + B])
            noise = task.draw_noise(keyed_generator(0, step), B)
            with torch.no_grad():
                out = task.outputs(engine.model, batch, noise)
            prompt = prompt_of(batch)
            assert prompt.any(1).all() and not (out.masked & prompt).any()
            scored = torch.zeros_like(out.masked).flatten()
            scored[out.positions] = True
            assert not (scored.view_as(prompt) & ~batch["loss_mask"]).any()  # nor a pad
            assert int(out.num_tokens) == int(task.num_targets(batch)) == int(batch["loss_mask"].sum())
            masked_responses += int(out.masked.sum())
        assert masked_responses > 100
    finally:
        engine.close()


def test_ar_scores_response_tokens_only(tiny, tmp_path):
    engine = text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{"model.causal": True})))
    try:
        task = engine.task
        batch = task.collate_fn([task.train_set[i] for i in range(8)])
        with torch.no_grad():
            out = task.outputs(engine.model, batch, ())
        lm = batch["loss_mask"]
        assert int(task.num_targets(batch)) == int(lm[:, 1:].sum()) == int(out.num_tokens)
        assert torch.equal(out.token_ce != 0, lm[:, 1:] & (out.token_ce != 0))  # nothing outside the response
        assert (out.token_ce[lm[:, 1:]] > 0).all()
    finally:
        engine.close()


class Wrapped(torch.nn.Module):
    def __init__(self, L):
        super().__init__()
        self.net = TinyDenoiser(L)

    def forward(self, ids, attention_mask=None, logits_mask=None, logits_index=None):
        return selected(self.net(ids), logits_mask, logits_index)


@pytest.mark.parametrize("name", ["iid", "stratified", "exact-k"])
def test_conditional_nelbo_equals_exact_enumeration_over_response_mask_sets(name):
    """Prompt of 3 clean tokens, response of 5: every estimator, through ``batch_positions``, is unbiased for the
    NELBO whose mask sets range over the response only (enumerated exactly)."""
    x = torch.tensor([2, 1, 3, 4, 4, 1, 2, 3])
    loss_mask = torch.tensor([False] * 3 + [True] * 5)
    model, t_min, n, K = Wrapped(8).eval(), 1e-3, 400, 24
    with torch.no_grad():
        exact = exact_nelbo(lambda z: F.log_softmax(model.net(z[None])[0], -1), x, 0, t_min=t_min,
                            positions=[3, 4, 5, 6, 7]) / 5
        unconditional = exact_nelbo(lambda z: F.log_softmax(model.net(z[None])[0], -1), x, 0, t_min=t_min) / 8
        batch = {"input_ids": x.expand(n, 8), "loss_mask": loss_mask.expand(n, 8), "idx": torch.arange(n)}
        pos = batch_positions(batch, pad_id=99)
        est = NelboEstimator(name, LinearSchedule(), t_min, seed=0, num_sequences=n)
        sums = []
        for p in range(K):
            masked, weight = est.noise(pos.eligible, batch["idx"], p)
            assert not masked[:, :3].any()
            sums.append(sequence_nelbo(model, batch["input_ids"], masked, weight, 0))
        res = summarize(torch.cat([batch["idx"].double()[:, None], pos.eligible.double().sum(1, keepdim=True),
                                   torch.stack(sums, 1)], 1))
    assert res.num_tokens == 5 * n
    assert abs(res.nelbo_per_token - exact) < 3 * res.stderr, (name, res.nelbo_per_token, exact, res.stderr)
    assert res.stderr < 0.02 * exact  # power: a 6% bias would fail
    if name == "exact-k":  # the lowest-variance estimator tells the conditional bound from the unconditional one
        assert abs(unconditional - exact) > 5 * res.stderr


def test_never_mask_tokens_stay_clean_and_out_of_the_denominator(tiny, tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[(i * j) % 10] for j in range(2 + i % 9)) for i in range(300)))
    engine = text_engine(load_config(None, tiny(**{"data.source": "files", "data.paths": f"[{corpus}]",
                                                   "data.vocab_size": 300, "diffusion.never_mask": "[bos, eos]"})))
    try:
        task = engine.task
        bos, eos = task.tokenizer.bos_token_id, task.tokenizer.eos_token_id
        batch = task.collate_fn([task.train_set[i] for i in range(8)])
        special = (batch["input_ids"] == bos) | (batch["input_ids"] == eos)
        assert special.any()
        for step in range(1, 21):
            with torch.no_grad():
                out = task.outputs(engine.model, batch, task.draw_noise(keyed_generator(0, step), 8))
            assert not (out.masked & special).any()
            assert int(out.num_tokens) == int((~special & (batch["input_ids"] != task.pad_id)).sum())
    finally:
        engine.close()
    with pytest.raises(ConfigError, match=r"diffusion.never_mask: 'zzz' is not a token"):
        text_engine(load_config(None, tiny(**{"diffusion.never_mask": "[zzz]", "trainer.run_name": "bad"})))


def test_random_length_rows_carry_no_loss_past_their_length_and_lower_valid_ratio(tiny, tmp_path):
    rows = [{"input_ids": torch.arange(10, 42), "idx": torch.tensor(i)} for i in range(400)]
    cut = RandomLength(rows, prob=0.5, pad_id=1, seed=0)
    lengths = torch.tensor([int((cut[i]["input_ids"] != 1).sum()) for i in range(400)])
    assert 0.35 < float((lengths < 32).double().mean()) < 0.65 and lengths.min() >= 1
    for i in range(400):  # a prefix is kept, the rest is padding
        ids = cut[i]["input_ids"]
        assert torch.equal(ids[:lengths[i]], torch.arange(10, 10 + int(lengths[i]))) and (ids[lengths[i]:] == 1).all()
    cut.set_epoch(1)
    assert any(int((cut[i]["input_ids"] != 1).sum()) != lengths[i] for i in range(400))  # a new draw per epoch

    def run(prob, name):
        engine = text_engine(load_config(None, tiny(**{"data.random_length_prob": prob, "trainer.run_name": name,
                                                       "trainer.max_steps": 4, "metrics.logging_steps": 4,
                                                       "metrics.detailed_metrics_steps": 4,
                                                       "metrics.attention_analysis_steps": 4})))
        try:
            task = engine.task
            batch = task.collate_fn([task.train_set[i] for i in range(8)])
            with torch.no_grad():
                out = task.outputs(engine.model, batch, task.draw_noise(keyed_generator(0, 1), 8))
            past = batch["input_ids"] == task.pad_id
            assert not (out.masked & past).any() and int(out.num_tokens) == int((~past).sum())
            return engine.fit()["metrics/valid_ratio"], float((~past).double().mean())
        finally:
            engine.close()

    assert run(0.0, "whole")[0] == 1.0  # the Markov corpus has no padding
    ratio, first_batch = run(1.0, "cut")
    assert 0.3 < ratio < 0.7 and first_batch < 0.9  # E[U{1..32}] / 32 = 0.52


def test_document_masked_packing_equals_each_document_alone(tiny, tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[(i * j) % 10] for j in range(2 + (i * 7) % 13)) for i in range(600)))
    engine = text_engine(load_config(None, tiny(**{"data.source": "files", "data.paths": f"[{corpus}]",
                                                   "data.vocab_size": 300, "data.document_mask": True,
                                                   "data.seq_len": 64, "model.max_seq_len": 64})))
    try:
        task, model = engine.task, engine.raw_model.eval()
        batch = task.collate_fn([task.train_set[i] for i in range(4)])
        pos = batch_positions(batch, task.pad_id)
        assert pos.attention_mask.dim() == 3 and pos.position_ids is not None
        worst, docs_seen = 0.0, 0
        with torch.no_grad():
            packed = model(batch["input_ids"], pos.attention_mask, position_ids=pos.position_ids)
            for b in range(4):
                d = batch["document_ids"][b]
                for doc in d.unique().tolist():
                    span = (d == doc).nonzero().squeeze(1)
                    alone = model(batch["input_ids"][b, span][None])[0]
                    worst = max(worst, float((packed[b, span] - alone).abs().max()))
                    docs_seen += 1
            unmasked = model(batch["input_ids"])
        assert docs_seen > 4 and worst < 1e-4, worst
        assert float((unmasked - packed).abs().max()) > 1e-2  # without the mask the documents see each other
        print(f"packed vs alone: worst |logit difference| {worst:.2e} over {docs_seen} documents")
        # the advanced probe attends as the objective did and takes each document as a sequence of its own
        from tdlm.metrics import text as T
        from tdlm.metrics.core import Inputs

        with torch.no_grad():
            out = task.outputs(model, batch, task.draw_noise(keyed_generator(0, 1), 4))
            probe = T.ModelProbe(num_layers=2, mask_id=task.mask_id)
            probe.update(Inputs(1, {"batch": out, "model": model}))
            got = float(probe.compute()["advanced/sequence_diversity"])
            noisy, naive = torch.where(out.masked, task.mask_id, out.input_ids), []
            for b in range(4):
                d = batch["document_ids"][b]
                for doc in d.unique().tolist():
                    span = (d == doc).nonzero().squeeze(1)
                    h = model.hidden_states(noisy[b, span][None], return_all_hidden=True)["all_hidden"][-1][0]
                    u = F.normalize(h[out.valid[b, span]].double(), dim=-1)
                    if len(u) >= 2:
                        naive.append(1 - float((u @ u.T).sum() - len(u)) / (len(u) * (len(u) - 1)))
        assert got == pytest.approx(sum(naive) / len(naive), rel=1e-4)
        result = engine.fit()
        assert math.isfinite(result["val/loss"])
    finally:
        engine.close()


def test_document_attention_positions_restart():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    real = docs >= 0
    pair, positions = document_attention(docs, real)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert pair[0, 3].tolist() == [False, False, False, True, True, False, False, False]
    assert pair[0, 6].tolist() == [False] * 6 + [True, False]  # a pad attends itself only (no NaN row)


@pytest.mark.parametrize("line, message", [
    ('{"question": "x", "answer": "y"}', "needs string fields 'prompt' and 'response', or 'messages'"),
    ('{"prompt": "alpha", "response": "  "}', "empty response"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}', "empty response"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "must be the assistant's"),
    ('{"prompt": "' + " ".join(["alpha"] * 200) + '", "response": "beta"}', "exceed data.seq_len=64"),
    ("not json", "not valid JSON"),
])
def test_bad_sft_lines_name_the_file_and_line(tiny, tmp_path, line, message):
    path = write_sft(tmp_path / "sft.jsonl")
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:241: .*{message}"):
        text_engine(load_config(None, sft_overrides(tiny, tmp_path)))


def test_messages_without_a_chat_template_and_overlong_truncation(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"sft.jsonl:1: 'messages' need a chat template and the tokenizer"):
        text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{"data.sft_template": "chat"})))
    path = tmp_path / "sft.jsonl"
    path.write_text(path.read_text() + json.dumps({"prompt": " ".join(["alpha"] * 200), "response": "beta"}) + "\n")
    engine = text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{"data.sft_overlong": "truncate",
                                                                             "data.val_fraction": 0.5})))
    try:
        rows = [r for split in (engine.task.data.train, engine.task.data.validation) for r in split]
        assert all(len(r["input_ids"]) == 64 and r["loss_mask"].any() for r in rows)
    finally:
        engine.close()


def test_eos_padding_scores_the_padding(tiny, tmp_path):
    engine = text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{"data.sft_padding": "eos"})))
    try:
        tok, row = engine.task.tokenizer, engine.task.train_set[0]
        ids, lm = row["input_ids"], row["loss_mask"]
        assert (ids != tok.pad_token_id).all() and ids[-1] == tok.eos_token_id and lm[-3:].all()
        first = int(lm.long().argmax())
        assert ids[0] == tok.bos_token_id and not lm[:first].any() and lm[first:].all()
    finally:
        engine.close()


@pytest.mark.slow
def test_sft_two_processes_equal_one_and_resume_exactly(tiny, tmp_path):
    from test_distributed import ROOT, assert_same_metrics

    over = sft_overrides(tiny, tmp_path, **{"trainer.max_steps": 6, "trainer.eval_every_n_steps": 3,
                                            "trainer.save_every_n_steps": 3, "trainer.micro_batch_size": 4,
                                            "trainer.grad_accum_steps": 2, "trainer.run_name": "ref",
                                            "metrics.detailed_metrics_steps": 3,
                                            "metrics.attention_analysis_steps": 3})
    engine = text_engine(load_config(None, over))
    try:
        engine.fit()
    finally:
        engine.close()
    two = [o.replace("trainer.grad_accum_steps=2", "trainer.grad_accum_steps=1").replace(
        "trainer.run_name=ref", "trainer.run_name=two") for o in over]
    (tmp_path / "empty.yaml").write_text("{}\n")
    launch_two_processes(ROOT / "tdlm" / "train.py", [str(tmp_path / "empty.yaml"), *two])
    ref = tmp_path / "runs" / "ref"
    worst = assert_same_metrics(ref, tmp_path / "runs" / "two")
    part = [o.replace("trainer.run_name=ref", "trainer.run_name=part") for o in over]
    engine = text_engine(load_config(None, part))
    try:
        engine.fit(stop_at=3)
    finally:
        engine.close()
    engine = text_engine(load_config(None, part + ["trainer.resume=auto"]))
    try:
        engine.fit()
    finally:
        engine.close()
    assert_same_metrics(ref, tmp_path / "runs" / "part", rel=1e-9)
    print(f"SFT 2 processes vs 1: worst relative loss difference {worst:.2e}")


@pytest.mark.parametrize("family, causal", [("llama", False), ("llama", True), ("bert", False)])
def test_document_masked_packing_on_an_hf_backbone(tmp_path, family, causal):
    """Two documents packed in one row: an HF backbone (adapted llama, llama kept causal, BERT) with the pair
    mask and restarting positions gives each document's logits run alone."""
    from hf_models import run_overrides, tiny_model_dir

    from tdlm.data import load_pretrained_tokenizer
    from tdlm.hf_backbone import build_pretrained

    model_dir = tiny_model_dir(tmp_path / "models", family)
    cfg = load_config(None, run_overrides(tmp_path / "cfg", model_dir, **{"model.causal": causal}))
    tok = load_pretrained_tokenizer(cfg.data.tokenizer)
    model = build_pretrained(cfg.model, cfg.diffusion, tok, 16, log=lambda *a: None).eval()
    first = tok.convert_tokens_to_ids("a")
    a, b = first + torch.arange(5) % 6, first + (torch.arange(7) * 5) % 6
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 2])
    ids = torch.cat([a, b, torch.full((2,), tok.pad_token_id)])[None]
    pos = batch_positions({"input_ids": ids, "document_ids": docs}, tok.pad_token_id)
    with torch.no_grad():
        packed = model(ids, pos.attention_mask, position_ids=pos.position_ids)[0]
        alone = torch.cat([model(a[None])[0], model(b[None])[0]])
        unmasked = model(ids)[0]
    worst = float((packed[:12] - alone).abs().max())
    assert worst < 1e-4 and float((unmasked[:12] - alone).abs().max()) > 1e-3, worst
    print(f"{family} causal={causal}: packed vs alone worst |logit difference| {worst:.2e}")


@pytest.mark.parametrize("causal", [False, True])
def test_generate_answers_prompts_and_stops_at_eos(tiny, tmp_path, capsys, causal):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from eval import generate

    engine = text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{"model.causal": causal,
                                                                             "data.sft_padding": "eos"})))
    try:
        engine.fit()
        tok = engine.task.tokenizer
    finally:
        engine.close()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "alpha beta", "response": "gamma"}\n'
                       '{"messages": [{"role": "user", "content": "delta"}]}\n')
    run = str(tmp_path / "runs" / "t")
    assert generate.main(["--checkpoint", run, "--prompts", str(prompts), "--steps", "8", "--out",
                          str(tmp_path / "out.jsonl")]) == 0
    text = capsys.readouterr().out
    assert text.count("--- prompt") == 2 and "reference: gamma" in text and "prompt:    delta" in text
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for r in rows:  # cut at the first EOS: none left in the response, and its text is its ids decoded
        assert tok.eos_token_id not in r["ids"]
        assert r["response"] == tok.decode(r["ids"], skip_special_tokens=True).strip()
    assert generate.main(["--checkpoint", run, "--prompt", "alpha", "--steps", "8"]) == 0  # an SFT run: rendered
    assert "--- prompt 0 ---" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert generate.main(["--checkpoint", run, "--prompts", str(bad)]) == 2
    assert f"{bad}:1: needs a string 'prompt'" in capsys.readouterr().err


def test_sft_continues_tdlms_own_checkpoint(tiny, tmp_path):
    """``model.pretrained`` = a tdlm checkpoint's model/ (what make demo-sft does with the quickstart one): the
    weights are the checkpoint's and its tokenizer (beside model/) is the data's."""
    engine = text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{"trainer.run_name": "base"})))
    try:
        engine.fit()
    finally:
        engine.close()
    model_dir = tmp_path / "runs" / "base" / "checkpoints" / "step_0000008" / "model"
    engine = text_engine(load_config(None, sft_overrides(tiny, tmp_path, **{
        "model.pretrained": str(model_dir), "trainer.run_name": "cont", "data.sft_padding": "eos"})))
    try:
        from safetensors.torch import load_file

        saved = load_file(str(model_dir / "model.safetensors"))
        assert torch.equal(engine.raw_model.embed.weight, saved["embed.weight"])
        assert engine.cfg.data.tokenizer == str(model_dir.parent / "tokenizer")
        assert math.isfinite(engine.fit()["val/loss"])
    finally:
        engine.close()


def test_a_tokenizer_padding_with_its_eos_is_refused():
    """Padding is never attended or scored, so a tokenizer whose pad token is its EOS would hide every response's
    EOS from the loss (and make sft_padding=eos act as pad): refused in one line."""
    from types import SimpleNamespace

    from tdlm.config import DataSection
    from tdlm.sft import build_sft_splits

    tok = SimpleNamespace(pad_token_id=2, eos_token_id=2, eos_token="</s>")
    with pytest.raises(ConfigError, match=r"data.tokenizer: gpt2 uses its EOS token \('</s>'\) as padding"):
        build_sft_splits(DataSection(source="sft", tokenizer="gpt2"), lambda texts: tok, log=lambda *a: None)
