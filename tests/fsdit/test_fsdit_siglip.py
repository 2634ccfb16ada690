"""Tests for tdlm/fsdit/siglip.py: offline loading, the missing-path error, preprocessing, pooling, both caches."""

import numpy as np
import pytest
import torch
from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

from tdlm.fsdit.siglip import (
    LRUCache,
    OnlineEmbedder,
    SiglipEncoder,
    encoder_fingerprint,
    load_siglip,
    pool_support,
    precompute_embeddings,
    tiny_siglip_config,
)


# Tiny models: one intra-op thread (spinning OpenMP threads on 2 shared cores slow them ~100x).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return SiglipEncoder.from_config(tiny_siglip_config(), seed=0)


def images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_save_and_load_back_offline(tmp_path, encoder):
    encoder.model.save_pretrained(tmp_path / "siglip")
    loaded = SiglipEncoder.from_pretrained(tmp_path / "siglip")
    x = images(3)
    assert torch.equal(loaded.encode(x), encoder.encode(x))
    assert loaded.encoder_id == encoder.encoder_id and loaded.dim == 32 and loaded.image_size == 16
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.model.training  # frozen encoders stay in eval mode


def test_full_siglip_checkpoint_loads_its_vision_tower(tmp_path):
    text = SiglipTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    full = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=tiny_siglip_config().to_dict()))
    full.save_pretrained(tmp_path / "full")
    vision = load_siglip(tmp_path / "full")
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expect = full.vision_model(pixel_values=pixels).pooler_output
        assert torch.allclose(vision(pixel_values=pixels).pooler_output, expect, atol=1e-6)


@pytest.mark.parametrize("path", [None, "", "/definitely/not/here"])
def test_missing_path_error_names_the_config_key(path):
    with pytest.raises(FileNotFoundError, match=r"^fsdit\.siglip\.path: no SigLIP checkpoint") as err:
        SiglipEncoder.from_pretrained(path)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"^eval\.siglip_dir: "):
        load_siglip(path, key="eval.siglip_dir")


def test_preprocess_resizes_bicubic_and_keeps_range(encoder):
    x = images(2)
    y = encoder.preprocess(x)
    assert y.shape == (2, 3, 16, 16) and y.min() >= -1 and y.max() <= 1
    const = torch.full((1, 3, 32, 32), 0.25)
    assert torch.allclose(encoder.preprocess(const), torch.full((1, 3, 16, 16), 0.25), atol=1e-6)
    assert torch.equal(encoder.preprocess(torch.zeros(1, 3, 16, 16)), torch.zeros(1, 3, 16, 16))  # right size: as is


def test_support_pooling_is_the_mean_of_per_image_embeddings(encoder):
    support = images(8, seed=1).view(2, 4, 3, 32, 32)
    pooled = encoder.encode_support(support)
    per_image = encoder.encode(support.flatten(0, 1)).view(2, 4, -1)
    assert pooled.shape == (2, 32) and torch.allclose(pooled, per_image.mean(1), atol=1e-6)
    assert torch.allclose(pool_support(per_image.flip(1)), pooled, atol=1e-6)  # order of the set does not matter


def test_embeddings_can_feed_a_trainable_projector(encoder):
    # Regression: embeddings made under torch.inference_mode() cannot be saved for backward.
    z = encoder.encode_support(images(4, seed=3).view(2, 2, 3, 32, 32))
    proj = torch.nn.Linear(32, 5)
    proj(z).pow(2).sum().backward()
    assert not z.requires_grad and proj.weight.grad.abs().sum() > 0


def test_encoder_id_depends_on_weights():
    a = SiglipEncoder.from_config(tiny_siglip_config(), seed=0)
    b = SiglipEncoder.from_config(tiny_siglip_config(), seed=0)
    c = SiglipEncoder.from_config(tiny_siglip_config(), seed=1)
    assert a.encoder_id == b.encoder_id != c.encoder_id and len(a.encoder_id) == 16
    assert encoder_fingerprint(a.model) == a.encoder_id


def test_precompute_once_cache(tmp_path, encoder, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    emb = precompute_embeddings(encoder, data, tmp_path, dataset_id="ds1", batch_size=4)
    direct = encoder.encode(torch.as_tensor(data).float() / 127.5 - 1)
    assert emb.shape == (10, 32) and torch.allclose(emb, direct, atol=1e-5)
    files = list(tmp_path.glob("siglip-*-ds1.pt"))
    assert [f.name for f in files] == [f"siglip-{encoder.encoder_id}-ds1.pt"]

    calls = []
    monkeypatch.setattr(encoder, "encode", lambda x, batch_size=256: calls.append(len(x)) or direct[: len(x)])
    again = precompute_embeddings(encoder, data, tmp_path, dataset_id="ds1")
    assert calls == [] and torch.equal(again, emb)  # served from disk
    precompute_embeddings(encoder, data[:6], tmp_path, dataset_id="ds1")  # same id, different N: recomputed
    assert calls == [6]
    precompute_embeddings(encoder, data, tmp_path, dataset_id="ds2")  # another dataset: its own file
    assert calls == [6, 10] and len(list(tmp_path.glob("siglip-*.pt"))) == 2


def test_lru_cache_hits_and_eviction():
    cache = LRUCache(capacity=2)
    assert cache.get("a") is None  # miss
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # hit; a is now most recent
    cache.put("c", 3)  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None and cache.get("c") == 3
    assert cache.stats() == {"hit_rate": 0.5, "items": 2, "hits": 2, "lookups": 4}
    cache.reset_stats()
    assert cache.hit_rate == 0.0 and len(cache) == 2
    with pytest.raises(ValueError, match="fsdit.siglip.cache_size"):
        LRUCache(0)


def test_online_embedder_hit_rate_and_loads_only_misses(encoder):
    pool = images(6, seed=2)
    loaded = []

    def load(keys):
        loaded.append(list(keys))
        return pool[keys]

    online = OnlineEmbedder(encoder, capacity=4)
    first = online.embed([0, 1, 2, 1], load)  # 3 unique keys, all misses
    assert loaded == [[0, 1, 2]] and first.shape == (4, 32) and torch.equal(first[1], first[3])
    online.embed([1, 2, 3], load)  # 2 hits, 1 miss
    assert loaded[-1] == [3]
    assert online.cache.stats() == {"hit_rate": pytest.approx(2 / 6), "items": 4, "hits": 2, "lookups": 6}
    online.embed([4], load)  # capacity 4: evicts key 0, the least recently used
    assert 0 not in online.cache and len(online.cache) == 4
    direct = encoder.encode(pool)
    assert torch.allclose(online.embed([0, 1, 2, 3, 4, 5], load), direct, atol=1e-5)
    pooled = online.embed_support(torch.tensor([[0, 1], [4, 5]]), load)
    assert torch.allclose(pooled, torch.stack([direct[:2].mean(0), direct[4:].mean(0)]), atol=1e-5)
