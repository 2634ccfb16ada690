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


# ---------------------------------------------------------------------------------------------------- remote code
# Stubs of the two remote-code interfaces, written as a checkpoint directory would ship them (``auto_map``). The
# hidden state mixes in the sequence mean, so every position sees the others (a bidirectional denoiser).
REMOTE_CODE = '''
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput


class StubConfig(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, vocab_size=11, hidden_dim=16, model_length=64, time_conditioning=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_dim, self.model_length = vocab_size, hidden_dim, model_length
        self.time_conditioning = time_conditioning


class StubModel(PreTrainedModel):
    config_class = StubConfig
    base_model_prefix = "stub"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.mix = nn.Linear(config.hidden_dim, config.hidden_dim)
        self.out = nn.Linear(config.hidden_dim, config.vocab_size)
        self.post_init()

    def _logits(self, input_ids, shift=0.0):
        h = self.embed(input_ids)
        return self.out(torch.tanh(h + self.mix(h.mean(1, keepdim=True))) + shift)
{forward}
'''
TIMESTEPS_FORWARD = '''
    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None, return_dict=None):
        assert timesteps.shape == input_ids.shape[:1]
        return MaskedLMOutput(logits=self._logits(input_ids, timesteps[:, None, None]))
'''
LOGITS_FORWARD = '''
    def forward(self, input_ids, attention_mask=None, output_attentions=None, output_hidden_states=None):
        return CausalLMOutputWithPast(logits=self._logits(input_ids))
'''
REMOTE = {"timesteps": ("stub_mdlm", TIMESTEPS_FORWARD, "AutoModelForMaskedLM"),
          "logits": ("stub_llada", LOGITS_FORWARD, "AutoModel")}


def remote_model_dir(root: Path, interface: str, seed: int = 0) -> Path:
    """``root/remote_<interface>``: a stub checkpoint of one remote-code interface, with its code and tokenizer."""
    import importlib.util
    import json

    path = Path(root) / f"remote_{interface}"
    if (path / "config.json").is_file():
        return path
    model_type, forward, auto = REMOTE[interface]
    path.mkdir(parents=True)
    code = path / f"modeling_{model_type}.py"
    code.write_text(REMOTE_CODE.format(model_type=model_type, forward=forward))
    spec = importlib.util.spec_from_file_location(f"_{model_type}_{seed}", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = word_tokenizer(masked=True)
    torch.manual_seed(seed)
    module.StubModel(module.StubConfig(vocab_size=len(tok))).save_pretrained(str(path))
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": f"modeling_{model_type}.StubConfig", auto: f"modeling_{model_type}.StubModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(str(path))
    return path
