"""The model's speed paths change no numbers: oneDNN GEMM vs F.linear, the masked-position head vs full logits,
the trainer's loss vs a plain reference, fused vs for-loop AdamW; and the training step reads no value back from
the device."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tdlm.config import OptimSection, RunConfig
from tdlm.diffusion import make_schedule, sample_t
from tdlm.model import TdlmConfig, TdlmForMaskedOrCausalLM, linear, onednn_mm
from tdlm.engine.optim import build_optimizer
from tdlm.engine.task import LossOutput
from tdlm.objective import reported_sum
from tdlm.noise import TrainingNoise
from tdlm.tasks import MaskedDiffusionTask

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def tiny_model(**kw) -> TdlmForMaskedOrCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=16, mask_token_id=0,
               pad_token_id=1)
    return TdlmForMaskedOrCausalLM(TdlmConfig(**{**cfg, **kw}))


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_onednn
@pytest.mark.parametrize("bias,out_features", [(False, 40), (True, 40), (False, 16)])  # N > K and N < K
def test_onednn_linear_matches_f_linear_forward_and_backward(bias, out_features):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g, requires_grad=True)
    w = torch.randn(out_features, 24, generator=g, requires_grad=True)
    b = torch.randn(out_features, generator=g, requires_grad=True) if bias else None
    gy = torch.randn(3, 5, out_features, generator=g)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), gy)
    out = linear(x, w, b)
    out_grads = torch.autograd.grad(out, [x, w] + ([b] if bias else []), gy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_mm_takes_transposed_views():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(24, 7, generator=g), torch.randn(24, 9, generator=g)
    torch.testing.assert_close(onednn_mm(a.t(), b.t()), a.t() @ b, rtol=1e-5, atol=1e-5)


def test_linear_falls_back_off_fp32_cpu():
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))  # float64: plain F.linear, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x.float(), w.float()).dtype == torch.bfloat16  # autocast still applies


def test_model_gemm_backends_agree_and_keys_are_unchanged():
    fast = tiny_model()
    slow = copy.deepcopy(fast).set_cpu_gemm("aten")
    assert list(fast.state_dict()) == list(slow.state_dict())
    assert "blocks.0.attn.qkv.weight" in fast.state_dict()
    ids = torch.randint(2, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    for m in (fast, slow):
        F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
    torch.testing.assert_close(fast(ids), slow(ids), rtol=1e-4, atol=1e-5)
    gf, gs = grads(fast), grads(slow)
    assert gf.keys() == gs.keys()
    for n in gf:
        torch.testing.assert_close(gf[n], gs[n], rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="cpu_gemm"):
        fast.set_cpu_gemm("mkl")


def test_masked_head_equals_full_logits_at_the_masked_positions():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 97, (4, 16), generator=g)
    mask = torch.rand(4, 16, generator=g) < 0.4
    torch.testing.assert_close(model(ids, logits_mask=mask), model(ids)[mask], rtol=1e-5, atol=1e-5)
    index = mask.flatten().nonzero().squeeze(1)
    assert torch.equal(model(ids, logits_index=index), model(ids, logits_mask=mask))


@pytest.mark.parametrize("padded", [False, True])
def test_trainer_loss_matches_plain_reference(padded):
    """The masked-diffusion task's loss (masked head, weighted CE) == full logits, log_softmax, gather, w(t), /
    valid tokens; for a packed batch (masked on the host) and a padded one (masked on the device)."""
    model = tiny_model()
    # what the loss path reads of its task
    task = SimpleNamespace(pad_id=1, mask_id=0, never_mask=(), noise=TrainingNoise("bernoulli", make_schedule("linear"), 1e-3))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 97, (4, 16), generator=g)
    if padded:
        ids[3, 12:] = 1  # a padded row
    attn = ids != 1
    t, u = torch.tensor([0.1, 0.5, 0.9, 0.7]), torch.rand(4, 16, generator=g)
    out = MaskedDiffusionTask.outputs(task, model, {"input_ids": ids, **({"attention_mask": attn} if padded else {})},
                                      (t, u))
    loss = out.loss_sum / out.num_tokens
    assert torch.equal(out.positions, (out.masked.flatten().nonzero().squeeze(1)))

    masked = (u < t[:, None]) & attn  # linear schedule: mask probability t
    noisy = torch.where(masked, torch.zeros_like(ids), ids)
    logp = model.set_cpu_gemm("aten")(noisy, attn).double().log_softmax(-1)  # (B, L, V)
    nll = -logp.gather(-1, ids[..., None])[..., 0]  # (B, L)
    ref = ((nll / t[:, None].double()) * masked).sum() / attn.sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_fused_adamw_matches_for_loop():
    models = [tiny_model(), tiny_model()]
    opts = [build_optimizer(m, OptimSection(fused=f)) for m, f in zip(models, (True, False))]
    ids = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        for m, o in zip(models, opts):
            F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_training_step_reads_nothing_back_from_the_device():
    """Loss, backward, clipping and the essential metric updates run with the model and the batch on the meta
    device, which has no values: an op that needs one on the host (``.item()``, ``nonzero``, a boolean index,
    i.e. a host sync on a GPU) raises there. The noise stays on the host, as the trainer draws it."""
    from tdlm.metrics.text_health import build_text_metrics

    model = tiny_model().to("meta")
    cfg = RunConfig()
    task = SimpleNamespace(pad_id=1, mask_id=0, never_mask=(), noise=TrainingNoise("bernoulli", make_schedule("linear"), 1e-3))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 97, (4, 16), generator=g).to("meta")
    t, u = sample_t(4, 1e-3, True, g), torch.rand(4, 16, generator=g)
    out = MaskedDiffusionTask.outputs(task, model, {"input_ids": ids}, (t, u))
    assert out.logits.shape == (int((u < t[:, None]).sum()), 97)
    runner = build_text_metrics(cfg, mask_id=0, device="meta")
    runner.update(1, batch=out, loss=LossOutput(out.loss_sum, out.num_tokens, reported_sum(out), out), model=model)
    (out.loss_sum / out.num_tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert model.embed.weight.grad.device.type == "meta"


@pytest.mark.parametrize("causal", [False, True])
def test_pair_mask_and_position_ids_run_packed_documents_as_if_alone(causal):
    """Two documents packed in one row with a block-diagonal pair mask and positions restarting at 0 give
    each document's logits run alone (the interface document-masked packing and block diffusion use)."""
    torch.manual_seed(0)
    cfg = TdlmConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16, causal=causal)
    model = TdlmForMaskedOrCausalLM(cfg).eval()
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 7))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    pair = (doc[:, None] == doc[None, :])[None]              # (1, 12, 12)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        got = model(packed, pair, position_ids=pos)
        want = torch.cat([model(a), model(b)], 1)
        # a (B, L) padding mask and its pair-mask form agree; default positions are 0..L-1
        pad = torch.tensor([[True] * 10 + [False] * 2])
        assert torch.allclose(model(packed, pad), model(packed, pad[:, None, :].expand(1, 12, 12),
                                                        position_ids=torch.arange(12)), atol=1e-6)
    assert (got - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="max_seq_len"):
        model(packed, position_ids=torch.arange(12) + 10)
