"""Tiny random Hugging Face models for the backbone tests, built from their configs and saved to a directory with
a word-level tokenizer over a small Markov corpus (offline: nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

SYMBOLS = [chr(ord("a") + i) for i in range(6)]
CAUSAL_FAMILIES = ("llama", "qwen2", "gpt2")
MASKED_FAMILIES = ("bert", "modernbert")


def corpus(directory: Path, seq_len: int = 16, tokens: int = 12000) -> Path:
    """A files-source corpus: Markov-chain documents of ``seq_len`` symbols, one paragraph each."""
    from tdlm.data import MarkovSource

    path = Path(directory) / "corpus.txt"
    if not path.is_file():
        train, val = MarkovSource(1, len(SYMBOLS), 0.25, seed=7).documents(tokens, seq_len, 0.2, seed=7)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(train + val) + "\n")
    return path


def word_tokenizer(masked: bool):
    """Whitespace word-level tokenizer over the symbols. A causal LM's has BOS/EOS only (tdlm adds [MASK] and
    [PAD], growing the embedding); a masked LM's has them all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ({"unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]", "bos_token": "[CLS]",
                 "eos_token": "[SEP]"} if masked else {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    vocab = {tok: i for i, tok in enumerate(specials.values())}
    for s in SYMBOLS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def hf_config(family: str, vocab: int, hidden: int = 32, layers: int = 2, heads: int = 2, positions: int = 64):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                              max_position_embeddings=positions, tie_word_embeddings=False, bos_token_id=1,
                              eos_token_id=2, pad_token_id=None)
    if family == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                              max_position_embeddings=positions, tie_word_embeddings=True, bos_token_id=1,
                              eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
                             bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=2 * hidden, max_position_embeddings=positions, pad_token_id=1)
    if family == "modernbert":
        return tf.ModernBertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, intermediate_size=2 * hidden,
                                   max_position_embeddings=positions, pad_token_id=1, bos_token_id=3,
                                   eos_token_id=4, cls_token_id=3, sep_token_id=4, global_attn_every_n_layers=1,
                                   local_attention=positions)
    raise ValueError(family)


def tiny_model_dir(root: Path, family: str, seed: int = 0, **shape) -> Path:
    """``root/<family>``: a random ``family`` model and its tokenizer in ``save_pretrained`` form."""
    import transformers as tf

    path = Path(root) / family
    if (path / "config.json").is_file():
        return path
    masked = family in MASKED_FAMILIES
    tok = word_tokenizer(masked)
    cfg = hf_config(family, len(tok), **shape)
    torch.manual_seed(seed)
    model = (tf.AutoModelForMaskedLM if masked else tf.AutoModelForCausalLM).from_config(cfg)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def run_overrides(tmp_path: Path, model_dir: Path, **extra) -> list[str]:
    """A seconds-long diffusion run of ``model_dir`` on the Markov files corpus (16-token rows)."""
    base = {
        "model.pretrained": str(model_dir), "data.source": "files", "data.paths": str(corpus(tmp_path.parent)),
        "data.seq_len": 16, "data.val_fraction": 0.1, "data.cache_dir": str(tmp_path / "data_cache"),
        "trainer.output_dir": str(tmp_path / "runs"), "trainer.run_name": "t", "trainer.max_steps": 20,
        "trainer.micro_batch_size": 8, "trainer.eval_every_n_steps": 2, "trainer.save_every_n_steps": 10,
        "trainer.progress_bar": False, "sample.at_end": 0, "data.eval_batches": 4, "metrics.logging_steps": 1,
        "metrics.detailed_metrics_steps": 2, "metrics.attention_analysis_steps": 2, "optim.warmup_steps": 2,
        "optim.lr": 3e-3, "wandb.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
