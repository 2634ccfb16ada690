"""Samplers: fixed positions, greedy = argmax, the cache, schedules, blocks, filtering, float64 Gumbel, seeds."""

import math

import pytest
import torch
from test_diffusion import TinyDenoiser

from tdlm.diffusion import LinearSchedule, make_schedule
from tdlm.sampling import (SamplerConfig, ancestral_sample, ar_generate, filter_logits, generate, gumbel_argmax,
                           masked_fraction)

pytestmark = pytest.mark.usefixtures("one_thread")
MASK, V = 0, 5


class Counting(torch.nn.Module):
    """Wraps a model; records how many masks every network call saw."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, z, attention_mask=None):
        self.seen.append(z.clone())
        return self.net(z)


class PerPosition(torch.nn.Module):
    """Context-free: fixed logits per position, whatever the canvas."""

    def __init__(self, L, seed=0):
        super().__init__()
        self.logits = torch.randn(L, V, generator=torch.Generator().manual_seed(seed)) * 3

    def forward(self, z, attention_mask=None):
        return self.logits.expand(z.shape[0], -1, -1)


def canvas_with_fixed(B, L, g):
    """A prompt of 3 tokens plus scattered fixed positions (infilling); the rest is [MASK]."""
    c = torch.full((B, L), MASK)
    c[:, :3] = torch.randint(1, V, (B, 3), generator=g)
    c[:, [7, 8, L - 1]] = torch.randint(1, V, (B, 3), generator=g)
    return c


@pytest.mark.parametrize("method", ["ancestral", "low_confidence", "random"])
@pytest.mark.parametrize("block_length", [0, 4])
def test_fixed_positions_never_change_and_everything_is_filled(method, block_length):
    L, B = 12, 6
    g = torch.Generator().manual_seed(0)
    canvas = canvas_with_fixed(B, L, g)
    fixed = canvas != MASK
    cfg = SamplerConfig(steps=8, method=method, block_length=block_length, temperature=1.0, forbidden_token_ids=(4,))
    out = generate(TinyDenoiser(L), canvas, MASK, cfg, torch.Generator().manual_seed(1)).ids
    assert torch.equal(out[fixed], canvas[fixed])
    assert not (out == MASK).any()
    assert not (out[~fixed] == 4).any()  # forbidden ids are never drawn
    assert len(set(map(tuple, out[:, 3:7].tolist()))) > 1  # it samples, rows differ


def test_one_step_per_token_greedy_is_the_argmax():
    L = 10
    model = PerPosition(L)
    expected = model.logits[:, 1:].argmax(-1) + 1  # [MASK] (id 0) is never a candidate
    canvas = torch.full((3, L), MASK)
    for method in ("low_confidence", "ancestral"):
        out = generate(model, canvas, MASK, SamplerConfig(steps=L, method=method, temperature=0.0),
                       torch.Generator().manual_seed(0))
        assert torch.equal(out.ids, expected.expand(3, -1)), method
    # With a context-dependent model, one token per step in confidence order is sequential greedy decoding.
    net = TinyDenoiser(L)
    z = torch.full((1, L), MASK)
    for _ in range(L):
        logits = net(z)[0]
        logits[:, MASK] = -math.inf
        probs = logits.softmax(-1).max(-1)
        conf = probs.values.masked_fill(z[0] != MASK, -1)
        pos = int(conf.argmax())
        z[0, pos] = int(probs.indices[pos])
    out = generate(net, torch.full((1, L), MASK), MASK, SamplerConfig(steps=L, method="low_confidence",
                                                                        temperature=0.0))
    assert torch.equal(out.ids, z) and out.network_calls == L


@pytest.mark.parametrize("batch", [1, 4])
def test_cache_gives_the_same_samples_with_fewer_network_calls(batch):
    L, steps = 16, 64  # 4 steps per token: most steps reveal nothing
    runs, models = {}, {}
    for cache in (False, True):
        cfg = SamplerConfig(steps=steps, method="ancestral", use_cache=cache, temperature=1.0)
        models[cache] = Counting(TinyDenoiser(L))
        runs[cache] = generate(models[cache], torch.full((batch, L), MASK), MASK, cfg,
                               torch.Generator().manual_seed(3))
    assert torch.equal(runs[True].ids, runs[False].ids)
    assert runs[False].network_calls == runs[False].steps_run == runs[True].steps_run
    # exactly one call per distinct canvas: the first, then one after every step that revealed something
    seen = models[False].seen
    distinct = 1 + sum(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
    assert runs[True].network_calls == distinct == len(models[True].seen) < runs[False].network_calls
    if batch == 1:
        assert distinct <= L  # one sequence: at most one call per revealed token


def test_deterministic_for_a_seed_and_per_row_generators_are_batch_free():
    L = 12
    net = TinyDenoiser(L)
    cfg = SamplerConfig(steps=6, method="low_confidence", temperature=1.0, top_p=0.9)
    a = generate(net, torch.full((4, L), MASK), MASK, cfg, torch.Generator().manual_seed(9)).ids
    b = generate(net, torch.full((4, L), MASK), MASK, cfg, torch.Generator().manual_seed(9)).ids
    c = generate(net, torch.full((4, L), MASK), MASK, cfg, torch.Generator().manual_seed(10)).ids
    assert torch.equal(a, b) and not torch.equal(a, c)
    gens = lambda rows: [torch.Generator().manual_seed(100 + r) for r in rows]  # noqa: E731
    together = generate(net, torch.full((4, L), MASK), MASK, cfg, gens(range(4))).ids
    apart = torch.cat([generate(net, torch.full((2, L), MASK), MASK, cfg, gens(r)).ids for r in ([0, 1], [2, 3])])
    assert torch.equal(together, apart)


def test_step_schedules_set_how_many_tokens_each_step_commits():
    L = 16
    seen = {}
    for sched in ("linear", "cosine"):
        model = Counting(TinyDenoiser(L))
        generate(model, torch.full((1, L), MASK), MASK, SamplerConfig(steps=4, method="low_confidence",
                                                                       step_schedule=sched))
        seen[sched] = [int((z == MASK).sum()) for z in model.seen]
    assert seen["linear"] == [16, 12, 8, 4]
    # cosine: the noise schedule's curve, masked fraction m = 1 - alpha(1 - tau) = 1 - sin(pi tau / 2) ->
    # commit round(16 (1 - m)) = 6, 11, 15, 16 tokens by steps 1..4
    assert seen["cosine"] == [16, 10, 5, 1]
    for tau in (0.1, 0.5, 0.9):  # one name, one curve: the sampler's cosine is training's cosine schedule
        assert masked_fraction("cosine", tau) == pytest.approx(1 - math.sin(math.pi * tau / 2), abs=1e-12)
        assert masked_fraction("cosine", tau) == pytest.approx(
            float(make_schedule("cosine").mask_prob(torch.tensor(1 - tau, dtype=torch.float64))), abs=1e-15)
    # the ancestral sampler under the training NoiseSchedule reproduces the linear reveal probabilities
    torch.manual_seed(0)
    ids = ancestral_sample(TinyDenoiser(L), LinearSchedule(), 3, L, MASK, steps=8,
                           generator=torch.Generator().manual_seed(0), forbidden_token_ids=(1,))
    assert ids.shape == (3, L) and not (ids == MASK).any() and not (ids == 1).any()


def test_semi_autoregressive_blocks_fill_left_to_right():
    L, prompt = 14, 2
    model = Counting(TinyDenoiser(L))
    canvas = torch.full((2, L), MASK)
    canvas[:, :prompt] = 3
    generate(model, canvas, MASK, SamplerConfig(steps=8, method="low_confidence", block_length=4))
    blocks = [(2, 6), (6, 10), (10, 14)]
    assert len(model.seen) == 8  # steps 3 + 3 + 2 over three blocks
    current = [0, 0, 0, 1, 1, 1, 2, 2]
    for z, j in zip(model.seen, current):
        lo, hi = blocks[j]
        assert (z[:, hi:] == MASK).all()  # later blocks untouched while this one is generated
        assert not (z[:, :lo] == MASK).any()  # earlier blocks complete


def test_top_k_and_top_p_filtering_closed_form():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = p.log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, 1.0, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.45) == [True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept() == [True] * 4
    # temperature sharpens before the nucleus is taken: at T=0.5, p ~ [.685, .247, .062, .007]
    assert kept(top_p=0.65) == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0.5, top_p=0.65))[0].tolist() == [True, False, False, False]


def test_float64_gumbel_matches_softmax_frequencies():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0], dtype=torch.float64)
    n = 40000
    for T in (1.0, 0.5):
        draws = gumbel_argmax(logits.expand(n, -1), T, g)
        freq = torch.bincount(draws, minlength=5).double() / n
        p = (logits / T).softmax(-1)
        assert torch.all((freq - p).abs() < 4 * (p * (1 - p) / n).sqrt() + 1e-4), (freq, p)


def test_autoregressive_sampling_keeps_the_prompt_and_is_greedy_at_zero_temperature():
    class Causal(torch.nn.Module):  # next token = (last token + 1) mod 5, never 0
        def forward(self, z, attention_mask=None):
            nxt = z % (V - 1) + 1
            return torch.nn.functional.one_hot(nxt, V).float() * 5

    prompt = torch.tensor([[2], [4]])
    out = ar_generate(Causal(), prompt, 6, SamplerConfig(temperature=0.0))
    assert out.tolist() == [[2, 3, 4, 1, 2, 3], [4, 1, 2, 3, 4, 1]]
    sampled = ar_generate(Causal(), prompt, 6, SamplerConfig(temperature=1.0, top_k=1),
                          [torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(sampled, out)


def test_cache_recomputes_only_the_rows_that_changed():
    L, steps, B = 16, 64, 6
    runs = {}
    for cache in (False, True):
        cfg = SamplerConfig(steps=steps, method="ancestral", use_cache=cache, temperature=1.0)
        runs[cache] = generate(TinyDenoiser(L), torch.full((B, L), MASK), MASK, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(runs[True].ids, runs[False].ids)
    assert runs[False].rows_computed == B * runs[False].network_calls
    assert B <= runs[True].rows_computed <= B + B * L  # the first call, then one row per row-step that revealed
