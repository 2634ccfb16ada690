"""Training-step throughput: tdlm vs ``transformers.BertForMaskedLM`` of the same shape, in one process; JSON out.

    python eval/bench_train.py                       # CPU, the issue's shape: 6 x 384, 6 heads, L=128, B=16, V=8192
    python eval/bench_train.py --ablations           # + what each optimisation is worth (see ARMS below)
    python eval/bench_train.py --compile             # + torch.compile'd tdlm, with its compile time
    python eval/bench_train.py --ar                  # + tdlm trained autoregressively (model.causal=true)
    python eval/bench_train.py --estimators          # + tdlm under the exact-k and importance training estimators
    python eval/bench_train.py --preset gpu-125m     # CUDA: 125M parameters, L=1024, bf16 autocast, MFU vs peak
    python eval/bench_train.py --find-max-batch 1024 # + the largest micro-batch that fits (CUDA: until OOM)

Both models train on the same batches with the same optimizer (``tdlm.engine.optim.build_optimizer``: AdamW,
decay groups), gradient clipping and threads. tdlm runs the training loss path (``MaskedDiffusionTask.outputs``:
masking noise, the LM head at masked positions only, w(t)-weighted CE / valid tokens); BERT does what an HF user would:
the same masked inputs with ``labels`` = -100 off the masked positions, full logits, mean CE. Arms alternate in
rotating order for ``--rounds`` rounds (``eval/bench_common.py``), medians and ratios reported; on CPU over the
repetitions that got at least ``--min-cpu-share`` of the cores (``kept_rounds``; the all-rounds figures are
beside them), since another job's burst slows a 2-thread step 5-10x.

Identical shape: layers, hidden, heads, vocabulary (tied head in both), sequence length and batch are the same.
BERT's FFN is a 4h GELU MLP (2 matrices); tdlm's is SwiGLU (3 matrices), so tdlm gets intermediate_size = 8h/3
(1024 at h=384): the FFN has the same parameters *and* the same FLOPs. Dropout is 0 in both (tdlm's default;
BERT's 0.1 default would add work tdlm does not do). BERT keeps its own extras (biases, LayerNorm, position
embeddings, the MLM transform layer); they are part of what a user of it pays.

FLOPs: ``model`` = 6 N tokens + 12 layers L h tokens (attention), N = the parameters of the matrix products
(tied head counted once), the issue's formula for both models. ``executed`` = what was computed: tdlm's LM head
runs only at masked positions (about half), so its executed FLOPs are lower than its model FLOPs. Both are
divided by a measured fp32 (CPU) / bf16 (CUDA) matmul peak of this device: the better of torch.matmul (MKL on
CPU) and oneDNN, 2048^2 (CPU) / 8192^2 (CUDA), interleaved with nothing else. On CUDA the spec-sheet dense bf16
peak is reported too where the device is known (H100/H200 SXM: 989 TFLOP/s, H100 PCIe: 756).

``--ar``: the same backbone with ``causal=True`` and the trainer's AR loss (next-token NLL, logits at every
position); ``ratios.diffusion_vs_ar`` is how many times faster the diffusion step is (the goal: within ~5%).
``--hf``: a Hugging Face Llama of the same shape adapted to diffusion (``tdlm.hf_backbone``, full attention
mask, shifted logits; its LM head runs at every position); ``ratios.hf_llama_vs_tdlm`` is its tokens/s relative
to tdlm's own backbone in the same interleaved rounds.
``--estimators``: tdlm's step under ``diffusion.estimator`` exact-k and importance (the tdlm arm is bernoulli), on
the same batches and the same initial weights; ``ratios.exact_k_vs_bernoulli`` / ``importance_vs_bernoulli`` are
their tokens/s relative to bernoulli (the estimator issue's bound: at least 0.97). The host draw of the uniforms
is the same for all three and stays outside the step, as in the other arms; the masking from them is inside.
``--find-max-batch N``: after the timing, with only that arm's model and optimizer resident, the largest
micro-batch of the tdlm arms (diffusion, and AR with ``--ar``) whose step fits, by doubling from ``--batch`` and
bisecting to within 1/8; on a CPU nothing runs out of memory and the search stops at N. ``eval/gpu_check.py``
runs these arms on a GPU in one call.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn

from bench_common import emit, interleaved, machine_state, median, ratio, set_threads, spread, uncontended
from tdlm.config import OptimSection
from tdlm.diffusion import apply_noise, make_schedule, sample_t
from tdlm.engine.optim import build_optimizer
from tdlm.flops import matmul_params, training_flops_per_token
from tdlm.model import TdlmConfig, TdlmForMaskedOrCausalLM, linear, onednn_mm
from tdlm.noise import TrainingNoise
from tdlm.tasks import AutoregressiveTask, MaskedDiffusionTask  # the training loss path (its ``outputs``)

PRESETS = {
    "cpu": dict(layers=6, hidden=384, heads=6, vocab=8192, seq_len=128, batch=16, rounds=10, warmup=2),
    "gpu-125m": dict(layers=12, hidden=768, heads=12, vocab=50304, seq_len=1024, batch=16, rounds=20, warmup=5),
}
# dense bf16 spec-sheet peaks; the first name contained in the device name wins
SPEC_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
MASK_ID, PAD_ID = 0, 1


# ----------------------------------------------------------------------------------------------------------
# Models and steps


def build_tdlm(a, causal: bool = False) -> TdlmForMaskedOrCausalLM:
    cfg = TdlmConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                     intermediate_size=8 * a.hidden // 3, max_seq_len=a.seq_len, mask_token_id=MASK_ID,
                     pad_token_id=PAD_ID, causal=causal)
    return TdlmForMaskedOrCausalLM(cfg)


def build_bert(a) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                     num_attention_heads=a.heads, intermediate_size=4 * a.hidden, max_position_embeddings=a.seq_len,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID)
    return BertForMaskedLM(cfg)


def use_onednn_linear(model: nn.Module) -> nn.Module:
    """Route a foreign model's nn.Linear layers through tdlm's CPU GEMM (the like-for-like-backend control)."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.forward = lambda x, m=m: linear(x, m.weight, m.bias)
    return model


class FullHead(nn.Module):
    """tdlm computing logits at every position and selecting the masked ones afterwards (ablation)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None, logits_mask=None, logits_index=None):
        logits = self.inner(input_ids, attention_mask)
        if logits_index is not None:
            return logits.flatten(0, 1).index_select(0, logits_index)
        return logits[logits_mask] if logits_mask is not None else logits


def make_step(model, loss_fn, optim_cfg: OptimSection, amp: torch.dtype | None):
    """One optimizer step: loss, backward, clip at 1.0, AdamW step, zero grads (set_to_none), as the trainer."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, optim_cfg)
    device = params[0].device.type

    def step(batch):
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def task_stub(causal: bool = False, estimator: str = "bernoulli") -> SimpleNamespace:
    """What the text tasks' loss path (``outputs``) reads from its task, without building one (no data, no
    accelerator), and that path."""
    outputs = (AutoregressiveTask if causal else MaskedDiffusionTask).outputs
    return SimpleNamespace(pad_id=PAD_ID, mask_id=MASK_ID, never_mask=(), outputs=outputs,
                           noise=TrainingNoise(estimator, make_schedule("linear"), 1e-3))


def tdlm_loss(stub):
    def loss(model, batch):
        out = stub.outputs(stub, model, {"input_ids": batch["ids"]}, (batch["t"], batch["u"]))
        return out.loss_sum / out.num_tokens

    return loss


def tdlm_ar_arm(a, device: str) -> tuple:
    """The AR baseline on the same backbone: causal attention, next-token loss, logits at every position."""
    torch.manual_seed(0)
    return build_tdlm(a, causal=True).to(device), tdlm_loss(task_stub(causal=True)), OptimSection(), True


def hf_llama_arm(a, device: str) -> tuple:
    """A Hugging Face Llama of tdlm's shape (same layers, width, heads, SwiGLU width, tied embedding, RoPE)
    adapted to diffusion as ``model.pretrained`` adapts one (full 4D attention mask, shifted logits), trained on
    the same loss path. The HF model computes logits at every position."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tdlm.hf_backbone import Adaptation, HFBackbone

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=8 * a.hidden // 3,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=a.seq_len, tie_word_embeddings=True, attention_bias=False)
    model = HFBackbone(LlamaForCausalLM(cfg), Adaptation("causal", False, True, MASK_ID, PAD_ID))
    return model.to(device), tdlm_loss(task_stub()), OptimSection(), True


def bert_loss(model, batch):
    ids = batch["ids"]
    nb = apply_noise(ids, ids != PAD_ID, batch["t_dev"], batch["u_dev"], make_schedule("linear"), MASK_ID)
    labels = torch.where(nb.masked, ids, torch.full_like(ids, -100))
    return model(input_ids=nb.noisy_ids, labels=labels).loss


# ----------------------------------------------------------------------------------------------------------
# FLOPs and peak


def step_flops(n_matmul: int, a, masked_frac: float, head_everywhere: bool) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of one step: 6 N tokens + attention; head at masked positions if not everywhere."""
    tokens = a.batch * a.seq_len
    model = training_flops_per_token(n_matmul, a.layers, a.seq_len, a.hidden) * tokens
    head = 6 * a.vocab * a.hidden * tokens
    executed = model if head_everywhere else model - head * (1 - masked_frac)
    return model, executed


def matmul_arms(device: str, reps: int = 4) -> tuple[dict, float, str]:
    """Timed arms of ``reps`` square matmuls per backend (torch.matmul, and oneDNN on CPU); (arms, FLOPs, dtype).

    They run inside the same interleaved rounds as the training steps, so the peak and the steps see the same
    load; the peak is the better backend's median.
    """
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    x = torch.randn(n, n, device=device, dtype=dtype)
    w = torch.randn(n, n, device=device, dtype=dtype)

    def rep(fn):
        def arm(i):
            for _ in range(reps):
                fn()
        return arm

    arms = {"peak_torch_matmul": rep(lambda: x @ w.t())}
    if device == "cpu":
        arms["peak_onednn"] = rep(lambda: onednn_mm(x, w))
    return arms, 2.0 * n**3 * reps, f"{n}^3 {str(dtype).replace('torch.', '')}"


# ----------------------------------------------------------------------------------------------------------
# Arms


def build_arms(a, device: str) -> dict:
    """name -> (model, loss_fn, optimizer config, LM head at every position?)."""
    torch.manual_seed(0)
    tdlm = build_tdlm(a).to(device)
    bert = build_bert(a).to(device)
    stub = task_stub()
    fused = OptimSection()
    arms = {"tdlm": (tdlm, tdlm_loss(stub), fused, False), "bert": (bert, bert_loss, fused, True)}
    if a.ar:
        arms["tdlm_ar"] = tdlm_ar_arm(a, device)
    if a.hf:
        arms["hf_llama"] = hf_llama_arm(a, device)
    if a.estimators:  # the same step under the other training estimators: their masking is all that differs
        for estimator in ("exact-k", "importance"):
            arms["tdlm_" + estimator.replace("-", "_")] = (copy.deepcopy(tdlm), tdlm_loss(task_stub(False, estimator)),
                                                          fused, False)
    if a.ablations:
        arms["tdlm_full_head"] = (FullHead(copy.deepcopy(tdlm)), tdlm_loss(stub), fused, True)
        arms["tdlm_forloop_adamw"] = (copy.deepcopy(tdlm), tdlm_loss(stub), OptimSection(fused=False), False)
        if device == "cpu":
            arms["tdlm_mkl_gemm"] = (copy.deepcopy(tdlm).set_cpu_gemm("aten"), tdlm_loss(stub), fused, False)
            arms["bert_onednn_gemm"] = (use_onednn_linear(copy.deepcopy(bert)), bert_loss, fused, True)
    if a.compile:
        arms["tdlm_compiled"] = (torch.compile(copy.deepcopy(tdlm), backend=a.compile_backend), tdlm_loss(stub),
                                 fused, False)
    return arms


def make_batches(a, device: str, n: int = 4, batch: int | None = None) -> list[dict]:
    """Token ids on the device; the noise t, u on the host, where the trainer draws it (tdlm masks there and
    sends the positions over asynchronously) and, for BERT, already on the device (``t_dev``, ``u_dev``)."""
    g = torch.Generator().manual_seed(1)
    batch = batch or a.batch
    out = []
    for _ in range(n):
        ids = torch.randint(4, a.vocab, (batch, a.seq_len), generator=g)
        t = sample_t(batch, 1e-3, True, g)
        u = torch.rand(batch, a.seq_len, generator=g)
        out.append({"ids": ids.to(device), "t": t, "u": u, "t_dev": t.to(device), "u_dev": u.to(device)})
    return out


def memory_per_arm(steps: dict, batches: list[dict]) -> dict:
    """CUDA only: peak allocated memory above the resident state while one arm takes a step, GiB."""
    out = {}
    for name, step in steps.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(batches[0])
        torch.cuda.synchronize()
        out[name] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return out


def largest_fitting(fits, start: int, limit: int) -> dict:
    """The largest batch b <= ``limit`` with ``fits(b)``: doubling from ``start``, then bisecting until the gap
    to the first failing size is at most 1/8 of the fitting one (each probe is a full step at that size)."""
    probes = {}

    def probe(b):
        probes[b] = fits(b)
        return probes[b]

    lo, hi, b = 0, None, max(1, min(start, limit))
    while True:
        if not probe(b):
            hi = b
            break
        lo = b
        if b >= limit:
            break
        b = min(2 * b, limit)
    if lo == 0:  # even the start failed: halve down to 1
        b = hi
        while b > 1 and not probe(b // 2):
            b //= 2
        lo = b // 2 if b > 1 else 0
        hi = b
    while hi is not None and hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return {"max": lo, "first_failing": hi, "limit": limit, "probes": [[k, v] for k, v in probes.items()]}


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OOM (a RuntimeError subclass), or a library's allocation failure under the same memory pressure."""
    msg = str(exc).lower()
    return "out of memory" in msg or "alloc_failed" in msg


def max_micro_batch(a, device: str, amp, name: str, arm: tuple) -> dict:
    """``largest_fitting`` for one arm's optimizer step at sequence length ``a.seq_len`` (CUDA: until OOM), with
    the peak memory of each fitting probe, GiB; only this arm's model and optimizer state are resident."""
    model, loss, optim_cfg, _ = arm
    step = make_step(model, loss, optim_cfg, amp)
    step(make_batches(a, device, 1)[0])  # the optimizer state exists before the first probe is measured
    peaks = {}

    def fits(b):
        ok = True
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            step(make_batches(a, device, 1, batch=b)[0])
            if device == "cuda":
                torch.cuda.synchronize()
                peaks[b] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            ok = False
        if not ok:  # the exception (and its frames' activations) is gone here: free what it held
            for p in model.parameters():
                p.grad = None
            gc.collect()
            torch.cuda.empty_cache()
        return ok

    out = largest_fitting(fits, a.batch, a.find_max_batch)
    out["peak_memory_gib_at_max"] = peaks.get(out["max"])
    out["tokens_at_max"] = out["max"] * a.seq_len
    print(f"max micro-batch {name}: {out['max']} at L={a.seq_len} (first failing: {out['first_failing']})",
          file=sys.stderr, flush=True)
    return out


def report_arms(a, arms: dict, seconds: dict, masked_frac: float, peak: float, spec: float | None,
                torch_peak: float | None, timing: dict, kept: dict) -> dict:
    tokens = a.batch * a.seq_len
    out = {}
    for name, (model, _, _, head_everywhere) in arms.items():
        sec = median(seconds[name])
        n_mm = matmul_params(model)
        model_f, exec_f = step_flops(n_mm, a, masked_frac, head_everywhere)
        out[name] = {
            "tokens_per_s": round(tokens / sec, 1), **spread(seconds[name]),
            "params_total": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "params_matmul": n_mm, "model_tflops_per_s": round(model_f / sec / 1e12, 4),
            "mfu_model_flops": round(model_f / sec / peak, 3),
            "executed_flops_frac_of_peak": round(exec_f / sec / peak, 3),
            "kept_rounds": kept[name], "all_rounds_tokens_per_s": round(tokens / median(timing["seconds"][name]), 1),
            "rounds_s": [round(x, 4) for x in timing["seconds"][name]], "rounds_cpu_share": timing["cpu_shares"][name]}
        if torch_peak:
            out[name]["mfu_vs_torch_matmul_peak"] = round(model_f / sec / torch_peak, 3)
        if spec:
            out[name]["mfu_vs_spec_peak"] = round(model_f / sec / spec, 3)
    return out


def run(a) -> dict:
    device = a.device
    threads = set_threads(a.threads)
    before = machine_state(threads)
    amp = torch.bfloat16 if device == "cuda" else None
    arms = build_arms(a, device)
    batches = make_batches(a, device)
    masked_frac = sum(float((b["u"] < b["t"][:, None]).float().mean()) for b in batches) / len(batches)
    steps = {name: make_step(m, loss, oc, amp) for name, (m, loss, oc, _) in arms.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    compile_s = compile_error = None
    if "tdlm_compiled" in steps:  # the first calls compile (and recompile once: M, the masked count, varies)
        t0 = time.perf_counter()
        try:
            for b in batches:
                steps["tdlm_compiled"](b)
            compile_s = round(time.perf_counter() - t0, 1)
        except Exception as exc:  # noqa: BLE001 - a compiler failure drops its arm; the eager figures still count
            compile_error = f"{type(exc).__name__}: {str(exc)[:2000]}"
            print(f"tdlm_compiled dropped: {compile_error}", file=sys.stderr, flush=True)
            del arms["tdlm_compiled"], steps["tdlm_compiled"]
    peak_arms, peak_f, peak_shape = matmul_arms(device)
    timed = {n: (lambda i, s=s: s(batches[i % len(batches)])) for n, s in steps.items()}
    timing = interleaved({**timed, **peak_arms}, rounds=a.rounds, warmup=a.warmup, sync=sync)
    # CPU: repetitions that got less than --min-cpu-share of the cores were hit by another job's burst; on CUDA
    # the host's share says nothing about the device, so every repetition counts
    sec, kept = uncontended(timing, a.min_cpu_share if device == "cpu" else 0.0)
    peaks = {k: peak_f / median(sec[k]) for k in peak_arms}
    spec = None
    if device == "cuda":
        spec = next((v for k, v in SPEC_BF16_PEAK.items() if k in torch.cuda.get_device_name()), None)

    ratios = {f"{n}_vs_bert": ratio(sec, "bert", n) for n in arms if n != "bert"}
    if "bert_onednn_gemm" in arms:
        ratios["tdlm_vs_bert_onednn_gemm"] = ratio(sec, "bert_onednn_gemm", "tdlm")
    if "tdlm_mkl_gemm" in arms:
        ratios["onednn_gemm_vs_mkl_gemm_in_tdlm"] = ratio(sec, "tdlm_mkl_gemm", "tdlm")
    if "tdlm_ar" in arms:  # > 1: the diffusion step is faster than the AR step on the same backbone
        ratios["diffusion_vs_ar"] = ratio(sec, "tdlm_ar", "tdlm")
    if "hf_llama" in arms:  # the adapted HF Llama's tokens/s relative to tdlm's own backbone (< 1: slower)
        ratios["hf_llama_vs_tdlm"] = ratio(sec, "tdlm", "hf_llama")
    for name in ("tdlm_exact_k", "tdlm_importance"):  # the bound: no slower than 0.97 of bernoulli
        if name in arms:
            ratios[f"{name[5:]}_vs_bernoulli"] = ratio(sec, "tdlm", name)
    if "tdlm_compiled" in arms:
        ratios["compiled_vs_eager"] = ratio(sec, "tdlm", "tdlm_compiled")
    out = {"benchmark": "train_step", "preset": a.preset, "device": device,
           "shape": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "vocab", "seq_len", "batch")},
           "tdlm_intermediate_size": 8 * a.hidden // 3, "bert_intermediate_size": 4 * a.hidden,
           "precision": "bf16 autocast" if amp else "fp32", "masked_fraction": round(masked_frac, 3),
           "rounds": a.rounds,
           "arms": report_arms(a, arms, sec, masked_frac, max(peaks.values()), spec,
                               peaks["peak_torch_matmul"] if device == "cpu" else None, timing, kept),
           "min_cpu_share": a.min_cpu_share if device == "cpu" else None,
           "all_rounds_ratios": {f"{n}_vs_bert": ratio(timing["seconds"], "bert", n) for n in arms if n != "bert"},
           "ratios": ratios,
           "matmul_peak": {"shape": peak_shape, **{f"{k}_tflops": round(v / 1e12, 4) for k, v in peaks.items()},
                           **spread(sec[max(peaks, key=peaks.get)]),
                           "kept_rounds": {k: kept[k] for k in peak_arms}},
           "cpu_share": timing["cpu_share"], "machine_before": before, "machine_after": machine_state(threads)}
    if spec:
        out["spec_bf16_peak_tflops"] = spec / 1e12
    if compile_s is not None:
        out["tdlm_compiled_first_4_steps_s"] = compile_s
    if compile_error is not None:
        out["tdlm_compiled_error"] = compile_error
    if device == "cuda":
        out["peak_step_memory_gib"] = memory_per_arm(steps, batches)
    if a.find_max_batch:
        names = ["tdlm"] + (["tdlm_ar"] if "tdlm_ar" in arms else [])
        arms = steps = timed = peak_arms = None  # the other arms' models and optimizer states leave first
        out["max_micro_batch"] = {}
        for name in names:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            try:  # a failure here is recorded, and the timings above are still reported
                arm = tdlm_ar_arm(a, device) if name == "tdlm_ar" else \
                    (build_tdlm(a).to(device), tdlm_loss(task_stub()), OptimSection(), False)
                out["max_micro_batch"][name] = max_micro_batch(a, device, amp, name, arm)
            except Exception as exc:  # noqa: BLE001
                out["max_micro_batch"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            arm = None
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="default: gpu-125m when CUDA is available, else cpu")
    for k in ("layers", "hidden", "heads", "vocab", "seq_len", "batch", "rounds", "warmup"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.add_argument("--min-cpu-share", type=float, default=0.85,
                   help="CPU: report the repetitions that got at least this share of the threads' CPU time "
                        "(0 = all); see eval/bench_common.py")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled arm (eval/gpu_check.py --dry-run: aot_eager)")
    p.add_argument("--ar", action="store_true", help="add tdlm trained autoregressively (tdlm_ar)")
    p.add_argument("--estimators", action="store_true",
                   help="add tdlm under diffusion.estimator exact-k and importance (tdlm is bernoulli)")
    p.add_argument("--hf", action="store_true",
                   help="add a Hugging Face Llama of the same shape adapted to diffusion (hf_llama)")
    p.add_argument("--find-max-batch", type=int, default=0, metavar="N",
                   help="also find the largest micro-batch <= N of the tdlm arms (0 = no)")
    a = p.parse_args(argv)
    a.preset = a.preset or ("gpu-125m" if torch.cuda.is_available() else "cpu")
    a.device = "cuda" if a.preset.startswith("gpu") else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--preset {a.preset} needs CUDA (none is available here); on a CPU use --preset cpu")
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


if __name__ == "__main__":
    emit(run(parse()))
