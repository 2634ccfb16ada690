"""Hugging Face backbones (``model.pretrained``, ``tdlm/hf_backbone.py``) on tiny random models built from their
configs: every family trains and exports, the adapter's logits equal the HF model's where they must, remote-code
interfaces score as a direct computation from their logits, the exact NELBO on an adapted Llama, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_models import (CAUSAL_FAMILIES, MASKED_FAMILIES, remote_model_dir, run_overrides,
                       tiny_model_dir, word_tokenizer)

from tdlm.config import ConfigError, load_config
from tdlm.data import load_pretrained_tokenizer
from tdlm.hf_backbone import SUBS_NEG_INFINITY, HFBackbone, build_pretrained
from tdlm.runs import load_checkpoint, load_model_dir
from tdlm.tasks import text_engine

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = CAUSAL_FAMILIES + MASKED_FAMILIES


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models")


def backbone(model_dir, **model_keys) -> HFBackbone:
    """The backbone a run of ``model_dir`` trains, in eval mode (``model_keys``: other model.* settings)."""
    cfg = load_config(None, run_overrides(Path(model_dir).parent / "cfg", model_dir,
                                          **{f"model.{k}": v for k, v in model_keys.items()}))
    tok = load_pretrained_tokenizer(cfg.data.tokenizer)
    return build_pretrained(cfg.model, cfg.diffusion, tok, cfg.data.seq_len, log=lambda *a: None).eval(), tok


def ids_and_mask(tok, B=3, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    first_symbol = tok.convert_tokens_to_ids("a")
    ids = first_symbol + torch.randint(0, 6, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.bool)
    attn[1, 7:] = False  # one right-padded row
    ids[1, 7:] = tok.pad_token_id
    return ids, attn


# ---------------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_logits_equal_the_hf_models(models, family):
    model, tok = backbone(tiny_model_dir(models, family))
    ids, attn = ids_and_mask(tok)
    hf = model.hf
    with torch.no_grad():
        if family in MASKED_FAMILIES:  # a masked LM's logits as they are, at every position
            raw = hf(input_ids=ids, attention_mask=attn).logits
            expected = raw
        else:  # adapted: full attention through the model's own is_causal=False path, then shifted by one
            hf.config.is_causal = False
            raw = hf(input_ids=ids, attention_mask=attn).logits
            hf.config.is_causal = True
            expected = torch.cat([raw[:, :1], raw[:, :-1]], 1)
            assert model.adaptation.shift_logits and model.bidirectional
        got = model(ids, attn)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # the objective's path: logits at flat positions only, in their order
        positions = torch.tensor([0, 3, 9, 10, 16, 29])
        torch.testing.assert_close(model(ids, attn, logits_index=positions), expected.reshape(-1, raw.shape[-1])[positions],
                                   rtol=1e-5, atol=1e-5)
        if family in CAUSAL_FAMILIES:
            # annealing at ratio 0 is causal attention: shifted logits = the AR model's logits one position back
            model.set_attention_anneal(0.0, ids.shape[1], torch.Generator().manual_seed(0))
            causal = model(ids)
            model.set_attention_anneal(None)
            ar = hf(input_ids=ids).logits
            torch.testing.assert_close(causal[:, 1:], ar[:, :-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(causal[:, 0], ar[:, 0], rtol=1e-5, atol=1e-5)
            assert (got[:, 1:] - causal[:, 1:]).abs().max() > 1e-4  # full attention really differs
            # kept causal (the AR baseline): the HF model untouched
            ar_model, _ = backbone(tiny_model_dir(models, family), causal=True)
            torch.testing.assert_close(ar_model(ids, attn), ar_model.hf(input_ids=ids, attention_mask=attn).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_the_same_denoiser(models, family, tmp_path):
    import transformers

    model, tok = backbone(tiny_model_dir(models, family))
    ids, attn = ids_and_mask(tok)
    model.save_pretrained(str(tmp_path / "model"))
    again = load_model_dir(tmp_path / "model")
    auto = (transformers.AutoModelForMaskedLM if family in MASKED_FAMILIES
            else transformers.AutoModelForCausalLM).from_pretrained(str(tmp_path / "model"))
    flag = json.loads((tmp_path / "model" / "config.json").read_text())["tdlm"]
    assert flag["interface"] == ("masked" if family in MASKED_FAMILIES else "causal")
    assert flag["shift_logits"] is (family in CAUSAL_FAMILIES) and flag["mask_token_id"] == tok.mask_token_id
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attn), model(ids, attn), rtol=0, atol=0)
        torch.testing.assert_close(auto(input_ids=ids).logits, model.hf(input_ids=ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- training
def val_loss_now(engine) -> float:
    engine.model.eval()
    val = engine.task.evaluate(engine.model, None)
    engine.model.train()
    return float(val.loss_sum / val.count)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_exports_and_evaluates(models, family, tmp_path):
    cfg = load_config(None, run_overrides(tmp_path, tiny_model_dir(models, family),
                                          **{"trainer.eval_every_n_steps": 20, "trainer.save_every_n_steps": 20}))
    engine = text_engine(cfg)
    try:
        before = val_loss_now(engine)
        result = engine.fit()
    finally:
        engine.close()
    assert result["summary/total_steps"] == 20
    assert result["val/loss"] < before - 0.1, (before, result["val/loss"])  # same validation noise both times
    ck = load_checkpoint(cfg.run_dir, "latest")
    assert isinstance(ck.model, HFBackbone) and ck.tokenizer.mask_token_id == engine.task.mask_id
    from transformers import AutoTokenizer  # the export is a plain HF directory, tokenizer included
    assert len(AutoTokenizer.from_pretrained(str(ck.path / "model"))) == len(ck.tokenizer)


def test_resume_is_exact_on_an_hf_backbone(models, tmp_path):
    def losses(rd):
        recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}

    extra = {"trainer.max_steps": 8, "trainer.save_every_n_steps": 4, "trainer.eval_every_n_steps": 4,
             "model.attention_anneal_steps": 6}
    d = tiny_model_dir(models, "qwen2")
    full = load_config(None, run_overrides(tmp_path / "a", d, **extra))
    engine = text_engine(full)
    engine.fit()
    engine.close()
    cut = load_config(None, run_overrides(tmp_path / "b", d, **extra))
    engine = text_engine(cut)
    engine.fit(stop_at=4)
    engine.close()
    engine = text_engine(load_config(None, run_overrides(tmp_path / "b", d, **extra, **{"trainer.resume": "auto"})))
    engine.fit()
    engine.close()
    a, b = losses(full.run_dir), losses(cut.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 9)) and a == b


# ---------------------------------------------------------------------------------------------------- exact NELBO
def test_exact_nelbo_on_an_adapted_llama(models):
    from tdlm.diffusion import LinearSchedule, exact_nelbo
    from tdlm.likelihood import NelboEstimator, sequence_nelbo, summarize

    model, tok = backbone(tiny_model_dir(models, "llama"))
    x = torch.tensor([tok.convert_tokens_to_ids(c) for c in "abcaddef"[:7]])
    L, mask = x.numel(), tok.mask_token_id
    with torch.no_grad():
        exact = exact_nelbo(lambda z: F.log_softmax(model(z[None])[0], -1), x, mask, t_min=1e-3) / L
        n = 300
        ids, valid, idx = x.expand(n, L), torch.ones(n, L, dtype=torch.bool), torch.arange(n)
        for name in ("stratified", "exact-k"):
            est = NelboEstimator(name, LinearSchedule(), 1e-3, seed=0, num_sequences=n)
            sums = torch.stack([sequence_nelbo(model, ids, *est.noise(valid, idx, p), mask) for p in range(12)], 1)
            res = summarize(torch.cat([idx.double()[:, None], valid.double().sum(1, keepdim=True), sums], 1))
            assert abs(res.nelbo_per_token - exact) < 3 * res.stderr, (name, res.nelbo_per_token, exact, res.stderr)
            assert res.stderr < 0.02 * exact


# ---------------------------------------------------------------------------------------------------- remote code
def direct_nelbo(hf, interface, ids, masked, weight, mask_id) -> torch.Tensor:
    """(B,) NELBO straight from the remote model's logits: MDLM's SUBS (mask logit + neg_infinity) and sigma = 0
    for the timesteps interface, the logits as they are for LLaDA's."""
    noisy = torch.where(masked, mask_id, ids)
    if interface == "timesteps":
        logits = hf(input_ids=noisy, timesteps=torch.zeros(ids.shape[0])).logits.double()
        logits[..., mask_id] += SUBS_NEG_INFINITY
    else:
        logits = hf(noisy).logits.double()
    nll = -F.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    return weight.double() * (nll * masked).sum(1)


@pytest.mark.parametrize("interface", ("timesteps", "logits"))
def test_remote_code_perplexity_equals_a_direct_computation(models, interface, tmp_path, capsys):
    import importlib.util

    from tdlm.diffusion import make_schedule
    from tdlm.likelihood import NelboEstimator, eval_split

    d = remote_model_dir(models, interface)
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        backbone(d)
    over = run_overrides(tmp_path, d, **{"model.trust_remote_code": True, "trainer.max_steps": 2,
                                         "trainer.eval_every_n_steps": 2, "trainer.save_every_n_steps": 2,
                                         "metrics.tiers.advanced.enabled": True})
    engine = text_engine(load_config(None, over))
    engine.fit()
    engine.close()
    assert "returns no attention probabilities" in capsys.readouterr().out  # the probe is off, said once
    rd = tmp_path / "runs" / "t"
    assert not any("advanced/" in k for line in (rd / "metrics.jsonl").read_text().splitlines()
                   for k in json.loads(line))
    spec = importlib.util.spec_from_file_location("perplexity", Path(__file__).parent.parent / "eval" / "perplexity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--checkpoint", str(rd), "--json", "--mc-passes", "2", "--batch-size", "8"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ck = load_checkpoint(rd)
    ds = eval_split("validation", ck.tokenizer, 16, ck.config)
    est = NelboEstimator("stratified", make_schedule("linear"), 1e-3, 0, len(ds))
    total, tokens = torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        for p in range(2):
            for a in range(0, len(ds), 8):
                ids = ds["input_ids"][a:a + 8]
                valid = ids != ck.tokenizer.pad_token_id
                masked, weight = est.noise(valid, torch.arange(a, a + ids.shape[0]), p)
                total[p] += direct_nelbo(ck.model.hf, interface, ids, masked, weight, ck.tokenizer.mask_token_id).sum()
                tokens += int(valid.sum()) if p == 0 else 0
    direct = float(total.mean()) / tokens
    assert out["num_tokens"] == tokens
    assert out["nelbo_per_token"] == pytest.approx(direct, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_one_clear_line(models, tmp_path):
    import transformers

    def fails(match, model_dir, **keys):
        with pytest.raises(ConfigError, match=match) as err:
            backbone(model_dir, **keys)
        assert "\n" not in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(r"model.pretrained: .*empty holds no model", empty)
    vision = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16).save_pretrained(str(vision))
    word_tokenizer(True).save_pretrained(str(vision))
    fails(r"model.pretrained: .*neither a masked LM nor a causal LM", vision)
    fails(r"model.shift_logits: true on a masked LM", tiny_model_dir(models, "bert"), shift_logits=True)
    fails(r"model.trust_remote_code", remote_model_dir(models, "logits"))
    # a tokenizer of another model: more tokens than the embedding has rows
    other = tmp_path / "small_vocab"
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=5, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    small.save_pretrained(str(other))
    word_tokenizer(False).save_pretrained(str(other))
    fails(r"data.tokenizer: the tokenizer has 9 tokens, the model's embedding only 5", other)
    with pytest.raises(ConfigError, match="data.source: markov"):
        load_config(None, [f"model.pretrained={empty}", "data.source=markov"])
    with pytest.raises(ConfigError, match="model.lora: applies to a pretrained backbone only"):
        load_config(None, ["model.lora={r: 4, target_modules: [q_proj]}"])


# ---------------------------------------------------------------------------------------------------- memory, LoRA
def test_gradient_checkpointing_gives_the_same_gradients(models):
    grads = []
    for on in (False, True):
        model, tok = backbone(tiny_model_dir(models, "llama"), gradient_checkpointing=on)
        model.train()
        ids, attn = ids_and_mask(tok)
        F.cross_entropy(model(ids, attn).flatten(0, 1), ids.flatten()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert model.hf.is_gradient_checkpointing is on
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_lora_trains_only_adapters_and_exports_merged(models, tmp_path):
    pytest.importorskip("peft")
    import transformers

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    over = run_overrides(tmp_path, tiny_model_dir(models, "llama"),
                         **{"model.lora": json.dumps(lora), "trainer.max_steps": 3, "trainer.eval_every_n_steps": 3,
                            "trainer.save_every_n_steps": 3, "optim.lr": 1e-2})
    engine = text_engine(load_config(None, over))
    before = {n: p.detach().clone() for n, p in engine.task.model.named_parameters()}
    engine.fit()
    model = engine.task.model.eval()
    engine.close()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), changed
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(before) & {n for n in before
                                                                                       if "lora_" in n}
    export = tmp_path / "runs" / "t" / "checkpoints" / "step_0000003" / "model"
    ids, attn = ids_and_mask(load_pretrained_tokenizer(str(export)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(export))  # a plain model: no adapters left
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(load_model_dir(export)(ids, attn), model(ids, attn), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, model.hf(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: \['qkv'\] not found"):
        backbone(tiny_model_dir(models, "llama"), lora=json.dumps({"r": 4, "target_modules": ["qkv"]}))


# ---------------------------------------------------------------------------------------------------- 2 processes
# DDP: 2 processes x 4 rows; ZeRO-2 (optimizer state and gradients sharded): 2 x 2 rows x 2 accumulation steps;
# the reference: 1 process x 4 rows x 2 accumulation steps. The same 8 rows make every optimizer step.
@pytest.mark.slow
@pytest.mark.parametrize("launch_config,micro_batch,accum", [("multi_cpu.yaml", 4, 1),
                                                             ("deepspeed_zero2.yaml", 2, 2)])
def test_two_processes_equal_one_process_on_an_hf_backbone(models, tmp_path, launch_config, micro_batch, accum):
    from conftest import launch_two_processes

    root = Path(__file__).resolve().parent.parent
    d = tiny_model_dir(models, "llama")  # no dropout: its draws would depend on how the batch is split
    common = {"trainer.max_steps": 4, "trainer.eval_every_n_steps": 2, "trainer.save_every_n_steps": 4}
    config = str(root / "configs" / "quickstart.yaml")
    ref = load_config(config, run_overrides(tmp_path, d, **common, **{"trainer.micro_batch_size": 4,
                                                                     "trainer.grad_accum_steps": 2,
                                                                     "trainer.run_name": "ref"}))
    engine = text_engine(ref)
    engine.fit()
    engine.close()
    args = run_overrides(tmp_path, d, **common, **{"trainer.micro_batch_size": micro_batch,
                                                   "trainer.grad_accum_steps": accum, "trainer.run_name": "ddp"})
    launch_two_processes(root / "tdlm" / "train.py", [config, *args], launch_config)

    def records(rd):
        out = {}
        for line in (rd / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.update({(rec["step"], k): v for k, v in rec.items() if k in ("train/loss", "train/grad_norm",
                                                                               "val/loss")})
        return out

    a, b = records(ref.run_dir), records(tmp_path / "runs" / "ddp")
    assert len(a) == 4 + 4 + 2 and a.keys() == b.keys()
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------------------------------------------- eval scripts
@pytest.mark.slow
def test_every_eval_script_runs_on_hf_checkpoints(models, tmp_path, capsys):
    """perplexity, generate, gen_ppl, compare and review on an adapted Llama denoiser and the same Llama kept
    causal, with numbers checked against the runs' own validation: the exported checkpoints are what they load."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
    import compare
    import gen_ppl
    import generate
    import perplexity
    import review

    d = tiny_model_dir(models, "llama")
    runs = {}
    for name, extra in (("diff", {}), ("ar", {"model.causal": True})):
        cfg = load_config(None, run_overrides(tmp_path, d, **{"trainer.run_name": name, "trainer.max_steps": 10,
                                                              "trainer.eval_every_n_steps": 10,
                                                              "data.eval_batches": 0, **extra}))
        engine = text_engine(cfg)
        runs[name] = (cfg.run_dir, engine.fit())
        engine.close()

    def last_json(argv, script):
        capsys.readouterr()
        assert script.main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # the AR checkpoint's exact perplexity is its logged validation loss; the denoiser's is a bound above it
    ar = last_json(["--checkpoint", str(runs["ar"][0]), "--json"], perplexity)
    assert ar["nelbo_per_token"] == pytest.approx(runs["ar"][1]["val/loss"], rel=1e-6)
    diff = last_json(["--checkpoint", str(runs["diff"][0]), "--json", "--mc-passes", "2"], perplexity)
    assert math.isfinite(diff["nelbo_per_token"]) and diff["nelbo_per_token"] > 0
    samples = tmp_path / "samples.jsonl"
    gen = last_json(["--checkpoint", str(runs["diff"][0]), "--num-samples", "3", "--steps", "4", "--seq-len", "12",
                     "--out", str(samples), "--json"], generate)
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    _, tok = backbone(d)
    assert gen["network_calls"] == 4 and len(rows) == 3
    assert all(len(r["ids"]) == 12 and tok.mask_token_id not in r["ids"] for r in rows)
    scored = last_json(["--samples", str(samples), "--scorer", str(runs["ar"][0]), "--json"], gen_ppl)
    assert scored["gen_ppl"] > 1 and scored["scored_tokens"] > 0
    out = tmp_path / "cmp"
    assert compare.main(["--diffusion", str(runs["diff"][0]), "--ar", str(runs["ar"][0]), "--out", str(out),
                         "--scorer", str(runs["ar"][0]), "--num-samples", "2", "--steps", "4",
                         "--mc-passes", "2", "--which", "latest"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert [r["perplexity"]["kind"] for r in report["runs"]] == ["bound", "exact"]
    assert report["runs"][1]["perplexity"]["nelbo_per_token"] == pytest.approx(ar["nelbo_per_token"], rel=1e-9)
    assert review.main(["--runs", str(runs["diff"][0]), str(runs["ar"][0]), "--out", str(tmp_path / "rev")]) == 0
    names = [r["name"] for r in json.loads((tmp_path / "rev" / "report.json").read_text())["runs"]]
    assert names == ["diff", "ar"]
