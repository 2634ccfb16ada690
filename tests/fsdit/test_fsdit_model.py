"""Tests for tdlm/fsdit/model.py: parameter count, adaLN-Zero init, conditioning/CFG drop, diagnostics paths."""

import math

import pytest
import torch

from tdlm.fsdit.model import (
    FSDiT,
    FSDiTConfig,
    TimestepEmbedder,
    attention_entropy,
    count_parameters,
    sincos_pos_embed_2d,
)

# Tiny models: one intra-op thread (spinning OpenMP threads on 2 shared cores slow them ~100x).
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(image_size=8, patch_size=2, hidden_size=36, depth=2, num_heads=3, mlp_ratio=2.0, cond_dim=20)


def randomize_zero_init(model: FSDiT, seed: int = 0) -> FSDiT:
    """adaLN-Zero makes a fresh model output exactly 0; give the zero-initialised layers small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layers = [b.adaLN_modulation[-1] for b in model.blocks]
        layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
        for layer in layers:
            layer.weight.copy_(0.1 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
    return model


def tiny_model(**overrides) -> FSDiT:
    torch.manual_seed(0)
    return randomize_zero_init(FSDiT(FSDiTConfig(**{**TINY, **overrides}))).eval()


def test_default_parameter_count():
    model = FSDiT(FSDiTConfig())
    D, r = 450, 3
    block = (10 + 2 * r) * D * D + (3 + 1 + r + 1 + 6) * D  # qkv+proj 4D², mlp 2rD², adaLN 6D², plus biases
    assert sum(p.numel() for p in model.blocks.parameters()) == 6 * block == 19_477_800
    assert count_parameters(model) == count_parameters(model, trainable_only=True) == 21_312_012
    # The anchors' 21.43 M counts the fixed pos-embed as a frozen parameter; here it is a buffer of 256 x 450.
    assert model.pos_embed.numel() == 115_200
    assert count_parameters(model) + model.pos_embed.numel() == 21_427_212
    assert count_parameters(FSDiT(FSDiTConfig(projector="linear"))) == 21_312_012 - 1_097_550 + (768 * 450 + 450)


def test_adaln_zero_init_gives_identity_blocks_and_zero_output():
    torch.manual_seed(0)
    model = FSDiT(FSDiTConfig(**TINY)).eval()
    x, t, cond = torch.randn(4, 3, 8, 8), torch.rand(4), torch.randn(4, 20)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    v = model(x, t, cond)
    assert v.shape == (4, 3, 8, 8) and torch.count_nonzero(v) == 0
    assert len(seen) == 2 and all(torch.equal(inp, out) for inp, out in seen)


def test_forward_hooks_see_per_block_residual_stream():
    model = tiny_model()
    stats = []
    hooks = [
        b.register_forward_hook(lambda m, a, o: stats.append(torch.stack([o.abs().mean(), o.pow(2).mean().sqrt()])))
        for b in model.blocks
    ]
    model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 20))
    for h in hooks:
        h.remove()
    table = torch.stack(stats)  # (depth, 2): abs-mean and RMS per layer
    assert table.shape == (2, 2)
    assert torch.all(table[:, 1] >= table[:, 0]) and torch.all(table > 0)  # RMS >= mean |x| (Jensen)


def test_explicit_attention_matches_sdpa_and_returns_probabilities():
    model = tiny_model()
    x, t, cond = torch.randn(3, 3, 8, 8), torch.rand(3), torch.randn(3, 20)
    with torch.no_grad():
        v_fast = model(x, t, cond)
        v_diag, probs = model(x, t, cond, return_attn=True)
    assert torch.allclose(v_fast, v_diag, atol=1e-5)
    assert len(probs) == 2 and probs[0].shape == (3, 3, 16, 16) and probs[0].dtype == torch.float32
    assert torch.allclose(probs[1].sum(-1), torch.ones(3, 3, 16), atol=1e-6)
    ent = attention_entropy(probs[0])
    assert ent.shape == (3,) and torch.all((ent > 0.5) & (ent <= 1.0 + 1e-6))


def test_attention_entropy_closed_forms():
    uniform = torch.full((2, 4, 5, 16), 1 / 16)
    assert torch.allclose(attention_entropy(uniform), torch.ones(4))
    onehot = torch.zeros(2, 4, 5, 16)
    onehot[..., 3] = 1
    assert torch.allclose(attention_entropy(onehot), torch.zeros(4))
    half = torch.zeros(1, 1, 1, 16)
    half[..., :2] = 0.5  # two keys: H = ln 2, normalised by ln 16 -> 1/4
    assert attention_entropy(half).item() == pytest.approx(0.25, abs=1e-6)


def test_null_vector_and_drop_mask():
    model = tiny_model()
    x, t, cond = torch.randn(4, 3, 8, 8), torch.rand(4), torch.randn(4, 20)
    with torch.no_grad():
        v_cond = model(x, t, cond)
        v_null = model(x, t, None)
        drop = torch.tensor([True, False, True, False])
        v_mixed = model(x, t, cond, drop=drop)
    assert (v_cond - v_null).abs().max() > 1e-3  # the condition matters
    assert torch.allclose(v_mixed[drop], v_null[drop], atol=1e-6)
    assert torch.allclose(v_mixed[~drop], v_cond[~drop], atol=1e-6)


def test_training_mode_drops_about_p_of_samples():
    model = tiny_model(class_dropout=0.25)
    B = 400
    x, t, cond = torch.randn(B, 3, 8, 8), torch.rand(B), torch.randn(B, 20)
    with torch.no_grad():
        v_null = model(x, t, None)
        model.train()
        torch.manual_seed(1)
        v_train = model(x, t, cond)
    dropped = (v_train - v_null).flatten(1).abs().amax(1) < 1e-6
    assert 0.18 < dropped.float().mean().item() < 0.32  # Binomial(400, 0.25): 0.25 +- 0.022 std


def test_timestep_embedding_scales_t_by_1000():
    emb = TimestepEmbedder(hidden_size=8, freq_dim=256)
    s = emb.sinusoid(torch.tensor([0.001, 0.5, 0.501]))
    assert s[0, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)  # first frequency is 1: cos(1000 * 0.001)
    assert s[0, 128].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    # Neighbouring times are told apart: with raw t their sinusoids would differ by < 0.01 in every channel.
    assert (s[1] - s[2]).abs().max() > 0.5


def test_sincos_pos_embed_formula_and_odd_halves():
    table = sincos_pos_embed_2d(8, 2)  # 4 positions; each half: 2 freqs (1, 1/100), [sin, cos]
    row, col = 1, 0  # position index 2 = (h=1, w=0)
    expect_w = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    expect_h = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    assert torch.allclose(table[2], torch.tensor(expect_w + expect_h), atol=1e-6)
    big = sincos_pos_embed_2d(450, 16)  # halves of 225: D=450 is not a multiple of 4
    assert big.shape == (256, 450)
    assert torch.cdist(big, big).add(torch.eye(256) * 1e3).min() > 1.0  # every position distinct


def test_context_scale_variants_and_gradients():
    for mode, shape in [("channel", (36,)), ("scalar", ())]:
        model = tiny_model(context_scale=mode, context_scale_init=2.0, cond_layernorm=True).train()
        assert model.context_scale.shape == shape and torch.all(model.context_scale == 2.0)
        v = model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 20), drop=torch.tensor([False, True]))
        v.pow(2).mean().backward()
        assert model.context_scale.grad.abs().sum() > 0 and model.null_y.grad.abs().sum() > 0


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="fsdit.model.hidden_size"):
        FSDiTConfig(hidden_size=450, num_heads=8)
    with pytest.raises(ValueError, match="fsdit.model.class_dropout"):
        FSDiTConfig(class_dropout=1.5)
    with pytest.raises(ValueError, match="fsdit.model.image_size"):
        FSDiTConfig(image_size=33)
