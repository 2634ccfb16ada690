"""The text objective (``tdlm.objective``) directly, with no trainer or task: the masked-diffusion NELBO and the AR
NLL against plain references, and the one code path that training, validation and the estimators share."""

import torch
from test_model import tiny_model

from tdlm.likelihood import NelboEstimator, sequence_ar_nll, sequence_nelbo
from tdlm.diffusion import make_schedule
from tdlm.objective import autoregressive_outputs, masked_diffusion_outputs, reported_sum, sequence_sums

MASK, PAD = 0, 1


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (3, 10), generator=g)
    ids[2, 7:] = PAD  # a padded row
    valid = ids != PAD
    masked = (torch.rand(3, 10, generator=g) < torch.tensor([[0.2], [0.6], [0.9]])) & valid
    masked[0, 0] = True  # every row has a masked token
    return ids, valid, masked, masked.flatten().nonzero().squeeze(1)


def reference_rows(model, ids, valid, masked, weight):
    """Full logits, log-softmax in float64, gather, weight: (B,) NELBO of each sequence."""
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    logp = model.set_cpu_gemm("aten")(noisy, valid).double().log_softmax(-1)
    nll = -logp.gather(-1, ids[..., None])[..., 0]
    return (nll * masked * weight.double()[:, None]).sum(1)


def test_masked_diffusion_outputs_match_a_plain_reference():
    model = tiny_model().eval()
    ids, valid, masked, positions = batch()
    weight = torch.tensor([5.0, 1.7, 1.1])
    with torch.no_grad():
        out = masked_diffusion_outputs(model, ids, valid, masked, positions, weight, MASK, valid)
        clipped = masked_diffusion_outputs(model, ids, valid, masked, positions, weight, MASK, valid, clip_weight=2.0)
        ref = reference_rows(model, ids, valid, masked, weight)
    sums = sequence_sums(out)
    torch.testing.assert_close(sums[:, 0], ref, rtol=1e-5, atol=0)
    assert torch.equal(sums[:, 1], valid.double().sum(1)) and int(out.num_tokens) == int(valid.sum())
    torch.testing.assert_close(out.loss_sum.double(), ref.sum(), rtol=1e-5, atol=0)
    assert out.logits.shape == (int(masked.sum()), 97)  # the LM head ran at the masked positions only
    # a clipped weight changes the gradient's loss only: the reported objective keeps the true weight
    torch.testing.assert_close(clipped.loss_sum.double(), reference_rows(model, ids, valid, masked,
                                                                         weight.clamp(max=2.0)).sum(), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(reported_sum(clipped, 2.0), ref.sum(), rtol=1e-5, atol=0)
    assert torch.equal(sequence_sums(clipped), sums)


def test_validation_and_the_estimators_call_the_same_objective():
    """``likelihood.sequence_nelbo`` (eval/perplexity.py) is the validation row sum of the training objective,
    bit for bit, under the estimators' own noise."""
    model = tiny_model().eval()
    ids, valid, _, _ = batch(seed=5)
    for name in ("stratified", "exact-k"):
        est = NelboEstimator(name, make_schedule("linear"), 1e-3, seed=0, num_sequences=3)
        masked, weight = est.noise(valid, torch.arange(3), pass_idx=0)
        with torch.no_grad():
            a = sequence_nelbo(model, ids, masked, weight, MASK, valid)
            out = masked_diffusion_outputs(model, ids, valid, masked, masked.flatten().nonzero().squeeze(1), weight,
                                           MASK, valid)
        assert torch.equal(a, sequence_sums(out)[:, 0]), name
        torch.testing.assert_close(a, reference_rows(model, ids, valid, masked, weight), rtol=1e-5, atol=0)


def test_autoregressive_outputs_are_the_exact_next_token_nll():
    model = tiny_model(causal=True).eval()
    ids, valid, _, _ = batch(seed=7)
    with torch.no_grad():
        out = autoregressive_outputs(model, ids, valid, valid)
        logp = model.set_cpu_gemm("aten")(ids, valid).double().log_softmax(-1)
        nll, n = sequence_ar_nll(model, ids, valid, valid)
    target_valid = valid[:, 1:]
    ref = (-logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * target_valid).sum(1)
    sums = sequence_sums(out)
    torch.testing.assert_close(sums[:, 0], ref, rtol=1e-5, atol=0)
    assert torch.equal(sums[:, 1], target_valid.double().sum(1)) and int(out.num_tokens) == int(target_valid.sum())
    assert torch.equal(nll, sums[:, 0]) and torch.equal(n, sums[:, 1])
