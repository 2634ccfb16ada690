"""The lm-eval adapter through the real ``lm_eval`` evaluator on local tasks (tests/harness_tasks): loglikelihood
against the exact enumeration of the conditional NELBO, rolling against eval/perplexity.py, stop sequences."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides
from test_eval_cli import load_script

from tdlm.accel import eval_accelerator
from tdlm.config import load_config
from tdlm.diffusion import exact_nelbo
from tdlm.runs import load_checkpoint
from tdlm.tasks import text_engine

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
TASKS = str(ROOT / "tests" / "harness_tasks")
harness, perplexity = load_script("harness"), load_script("perplexity")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny Markov-corpus runs (words a..f, L=32): diffusion and AR, 24 steps each."""
    tmp, out = tmp_path_factory.mktemp("harness"), {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, extra in (("diff", {}), ("ar", {"model.causal": True})):
        cfg = load_config(None, tiny_overrides(tmp, **{"trainer.run_name": name, "trainer.max_steps": 24,
                                                       "trainer.save_every_n_steps": 24, **extra}))
        engine = text_engine(cfg)
        engine.fit()
        engine.close()
        out[name] = load_checkpoint(cfg.run_dir, "latest")
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their jsonl files relative to the repository root


def run(ck, tasks, **kw):
    from tdlm.harness import run_tasks

    return run_tasks(eval_accelerator(), str(ck.path), tasks, TASKS, loaded=ck, **kw)


def test_loglikelihood_is_the_conditional_nelbo_within_3_stderr(runs, at_root):
    ck = runs["diff"]
    out, records = run(ck, ["tdlm_toy_mc"], mc_passes=48)
    assert out["distinct_requests"] == 7 and 0 <= out["results"]["tdlm_toy_mc"]["acc,none"] <= 1
    rec = next(r for r in records if r["args"] == ["a b c", " d e f a b c"])
    assert rec["tokens"] == 6 and rec["passes"] == 48
    tok, model, mask = ck.tokenizer, ck.model, ck.tokenizer.mask_token_id
    ctx = torch.tensor([tok.bos_token_id] + tok("a b c", add_special_tokens=False)["input_ids"])
    cont = torch.tensor(tok("d e f a b c", add_special_tokens=False)["input_ids"])

    def logprob(z):  # the continuation's log-probabilities with the context always visible
        with torch.no_grad():
            return F.log_softmax(model(torch.cat([ctx, z])[None])[0, len(ctx):].double(), -1)

    exact = exact_nelbo(logprob, cont, mask, t_min=model.config.t_min)  # 63 mask sets, linear schedule
    assert model.config.schedule == "linear" and 0 < rec["stderr"] < 0.1 * exact
    assert abs(-rec["loglikelihood"] - exact) < 3 * rec["stderr"], (rec, exact)
    greedy = bool((logprob(torch.full_like(cont, mask)).argmax(-1) == cont).all())
    assert rec["is_greedy"] == greedy
    # AR: exact, no stderr
    out, records = run(runs["ar"], ["tdlm_toy_mc"])
    rec = next(r for r in records if r["args"] == ["a b c", " d e f a b c"])
    with torch.no_grad():
        logp = F.log_softmax(runs["ar"].model(torch.cat([ctx, cont])[None])[0].double(), -1)
    direct = sum(float(logp[len(ctx) - 1 + j, cont[j]]) for j in range(6))
    assert rec["stderr"] == 0.0 and rec["loglikelihood"] == pytest.approx(direct, rel=1e-6)


def test_batching_does_not_change_the_estimates(runs):
    from tdlm.harness import TdlmLM

    ck = runs["diff"]
    pairs = [([ck.tokenizer.bos_token_id] + [4 + i % 6] * i, [4 + (i + j) % 6 for j in range(1, 5)]) for i in range(7)]
    one = TdlmLM(loaded=ck, mc_passes=4, batch_size=1, accelerator=eval_accelerator()).conditional_loglikelihood(pairs)
    many = TdlmLM(loaded=ck, mc_passes=4, batch_size=7, accelerator=eval_accelerator()).conditional_loglikelihood(pairs)
    for a, b in zip(one, many):
        assert a[0] == pytest.approx(b[0], rel=1e-5) and a[2] == b[2]
    assert len({round(a[0], 6) for a in one}) > 1


def test_rolling_matches_perplexity_script(runs, at_root, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("a b c d e f a b c d e f\n")  # 12 words + [BOS] [EOS]: one window of 32
    for name, passes in (("ar", 1), ("diff", 16)):
        ck = runs[name]
        out, records = run(ck, ["tdlm_toy_rolling"], mc_passes=passes)
        rec = next(r for r in records if r["args"][0].startswith("a b c d e f a b"))
        capsys.readouterr()
        assert perplexity.main(["--checkpoint", str(ck.path), "--text", str(text), "--estimator", "exact-k",
                                "--mc-passes", str(max(passes, 2)), "--json"]) == 0
        ppl = json.loads(capsys.readouterr().out)
        assert rec["tokens"] == ppl["num_tokens"] == (13 if name == "ar" else 14)
        if name == "ar":  # exact on both sides
            assert -rec["loglikelihood"] == pytest.approx(ppl["nelbo_per_token"] * ppl["num_tokens"], rel=1e-6)
            # lm-eval's word perplexity over both documents from our log-likelihoods
            lls = [r["loglikelihood"] for r in records]
            words = [len(re.split(r"\s+", json.loads(x)["text"]))
                     for x in (ROOT / "tests/harness_tasks/toy_rolling.jsonl").read_text().splitlines()]
            assert out["results"]["tdlm_toy_rolling"]["word_perplexity,none"] == pytest.approx(
                math.exp(-sum(lls) / sum(words)), rel=1e-9)
        else:  # two unbiased estimates of one bound
            se = math.hypot(rec["stderr"] / 14, ppl["stderr"])
            assert 0 < se and abs(-rec["loglikelihood"] / 14 - ppl["nelbo_per_token"]) < 3 * se
        assert rec["passes"] == passes and out["rolling_stderr"]["n"] == 2


def test_generate_until_respects_stop_sequences(runs, at_root):
    from lm_eval.api.instance import Instance

    from tdlm.harness import TdlmLM

    for name in ("diff", "ar"):
        lm = TdlmLM(loaded=runs[name], accelerator=eval_accelerator())
        kw = {"max_gen_toks": 12, "do_sample": True, "temperature": 1.0}  # one seeded draw per request
        free = lm.generate_until([Instance("generate_until", {}, ("a b", {**kw, "until": []}), 0)])[0]
        assert 1 <= len(free.split()) <= 12, (name, free)
        stop = free.split()[len(free.split()) // 2]  # a word the free sample holds: the stop is really exercised
        stopped = lm.generate_until([Instance("generate_until", {}, ("a b", {**kw, "until": ["x", stop]}), 0)])[0]
        assert stopped == free[:free.index(stop)]  # the same seeded draw, cut at the first stop sequence
    out, records = run(runs["diff"], ["tdlm_toy_gen"], steps=4, block_length=4)
    gens = [r for r in records if r["type"] == "generate_until"]
    assert len(gens) == 2 and all("c" not in r["text"] for r in gens) and gens[0]["steps"] == 4
    assert "exact_match,none" in out["results"]["tdlm_toy_gen"]


def test_bad_input_gives_one_clear_error(runs, at_root, capsys, tmp_path):
    from lm_eval.api.instance import Instance

    from tdlm.harness import TdlmLM

    ck = str(runs["diff"].path)
    for argv, msg in ((["--tasks", "tdlm_toy_mc", "--include-path", TASKS, "--mc-passes", "0"], "--mc-passes: must be"),
                      (["--tasks", "tdlm_toy_mc", "--include-path", str(tmp_path / "x")], "is not a directory")):
        capsys.readouterr()
        assert harness.main(["--checkpoint", ck] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    lm = TdlmLM(loaded=runs["diff"], accelerator=eval_accelerator())
    with pytest.raises(ValueError, match="continuation of 40 tokens does not fit the model's length 32"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("a", " " + " ".join("abcdef"[i % 6] for i in range(40))), 0)])


@pytest.mark.slow
def test_unknown_task_is_one_clear_error(runs, at_root, capsys):
    """Slow: a task not under --include-path makes lm-eval index its thousands of built-in tasks (~50 s)."""
    assert harness.main(["--checkpoint", str(runs["diff"].path), "--tasks", "no_such_task", "--include-path",
                         TASKS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task(s) no_such_task" in err[0], err


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(runs, at_root, tmp_path):
    """lm-eval shards the documents over the processes; the noise is keyed by each request's tokens, so every
    request gets the same estimate, and the gathered records and metrics match one process."""
    import os
    import subprocess
    import sys

    from test_eval_cli import free_port

    args = ["--checkpoint", str(runs["diff"].path), "--tasks", "tdlm_toy_mc", "tdlm_toy_rolling", "--include-path",
            TASKS, "--mc-passes", "4", "--batch-size", "2"]
    assert harness.main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(ROOT / "eval" / "harness.py"), *args,
                           "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "harness.json").read_text()) for d in ("one", "two"))
    assert two["num_processes"] == 2 and one["distinct_requests"] == two["distinct_requests"] == 9
    recs = [[json.loads(x) for x in (tmp_path / d / "requests.jsonl").read_text().splitlines()] for d in ("one", "two")]
    for a, b in zip(*recs):
        assert a["args"] == b["args"] and a["loglikelihood"] == pytest.approx(b["loglikelihood"], rel=1e-5)
    for task in ("tdlm_toy_mc", "tdlm_toy_rolling"):
        for k, v in one["results"][task].items():
            if isinstance(v, float) and "stderr" not in k:
                assert two["results"][task][k] == pytest.approx(v, rel=1e-5), (task, k)
