"""Any Hugging Face model as the denoiser (``model.pretrained``): a thin module with the backbone's call signature
around a ``transformers`` model, so the tasks, the objective, the estimators, the samplers and the metrics run
on it unchanged.

    model(noisy_ids, attention_mask, logits_index=positions)  -> (M, V) logits at the flat positions b * L + i
    model(ids, attention_mask)                                -> (B, L, V)

Families (``interface`` in the saved flag):
- ``masked``: any ``AutoModelForMaskedLM`` (BERT, RoBERTa, DistilBERT, ModernBERT, ...); its logits as they are.
- ``causal``: any ``AutoModelForCausalLM``. Adapted to diffusion, its causal mask is replaced by a full one through
  the model's own 4D attention-mask argument (the mask is used as given), optionally annealed from causal to full
  (DiffuLLaMA), and its logits are shifted (position i read from the hidden state at i-1, position 0 from its
  own, as DiffuLLaMA and Dream do). Kept causal (``model.causal``) it is the AR baseline, untouched.
- ``timesteps``: remote code with MDLM's ``forward(input_ids, timesteps)`` (DUO's repository too), under SUBS:
  the mask token's logit gets -1e6 (``neg_infinity`` there), ``timesteps`` = sigma = 0 for checkpoints without
  time conditioning, as ``_process_sigma`` does.
- ``logits``: remote code with LLaDA's / Dream's ``forward(input_ids).logits``; Dream's shifted.

The flag ``tdlm`` in the exported config.json records the interface, the attention and shift used, the mask token
and the noise schedule, so evaluation rebuilds the same denoiser from the directory the Auto classes load.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tdlm.config import ConfigError

FLAG = "tdlm"
SUBS_NEG_INFINITY = -1000000.0  # MDLM/DUO's neg_infinity, added to the mask token's logit (SUBS)
SHIFTED_REMOTE = ("Dream",)  # remote model types trained with shifted logits (Dream's generation_utils)


@dataclass
class Adaptation:
    """How tdlm uses a Hugging Face model; saved as ``config.tdlm`` beside the model's own config."""

    interface: str              # masked | causal | timesteps | logits
    causal: bool                # kept causal: the AR objective
    shift_logits: bool
    mask_token_id: int
    pad_token_id: int | None
    schedule: str = "linear"
    t_min: float = 1e-3
    loglinear_eps: float = 1e-3
    lora_merged: bool = False
    block_size: int = 0         # block diffusion's L' (0 = plain MDLM), as ``TdlmConfig.block_size``


class BackboneConfig:
    """What the rest of tdlm reads from ``model.config`` (the tdlm backbone's field names), for an HF backbone."""

    def __init__(self, hf_config, a: Adaptation, num_layers: int):
        self.hf = hf_config
        self.causal, self.mask_token_id, self.pad_token_id = a.causal, a.mask_token_id, a.pad_token_id
        self.schedule, self.t_min, self.loglinear_eps = a.schedule, a.t_min, a.loglinear_eps
        self.block_size = a.block_size
        self.num_layers = num_layers
        self.num_heads = _first_attr(hf_config, "num_attention_heads", "n_head", "n_heads", default=1)
        self.hidden_size = _first_attr(hf_config, "hidden_size", "n_embd", "dim", "hidden_dim", default=0)
        self.max_seq_len = _first_attr(hf_config, "max_position_embeddings", "n_positions", "model_length",
                                       "max_sequence_length", default=1 << 30)
        self.vocab_size = hf_config.vocab_size


def _first_attr(obj, *names, default=None):
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return default


class HFBackbone(nn.Module):
    """A Hugging Face model behind the tdlm backbone's interface (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, adaptation: Adaptation):
        super().__init__()
        self.hf = hf_model
        self.adaptation = a = adaptation
        self.bidirectional = a.interface == "causal" and not a.causal
        layers = _first_attr(hf_model.config, "num_hidden_layers", "n_layer", "n_blocks", "n_layers", default=1)
        self.config = BackboneConfig(hf_model.config, a, int(layers))
        self.anneal_pattern: torch.Tensor | None = None  # (L, L) bool while attention is being annealed
        # FSDP's transformer-based wrapping shards by the HF model's block classes
        self._no_split_modules = getattr(self.base_model, "_no_split_modules", None)

    # ------------------------------------------------------------------------------------------------ parts
    @property
    def base_model(self) -> nn.Module:
        """The ``transformers`` model itself (under LoRA, the ``peft`` model's)."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    def get_input_embeddings(self):
        return self.base_model.get_input_embeddings()

    @property
    def supports_attention_probs(self) -> bool:
        """Real attention probabilities through ``output_attentions`` (eager attention); not for remote code."""
        return self.adaptation.interface in ("masked", "causal")

    def set_attention_anneal(self, ratio: float | None, seq_len: int = 0, generator=None) -> None:
        """DiffuLLaMA's annealed mask for the next steps: causal, plus each future key with probability ``ratio``
        (one (L, L) draw shared by the batch, from ``generator`` so every process draws the same); None = full."""
        if ratio is None or ratio >= 1.0:
            self.anneal_pattern = None
            return
        extra = torch.rand(seq_len, seq_len, generator=generator) < ratio
        self.anneal_pattern = torch.ones(seq_len, seq_len, dtype=torch.bool).tril() | extra

    # ------------------------------------------------------------------------------------------------ forward
    def _attention_mask(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype):
        """The mask the HF model gets: 2D (or none) where it keeps its own attention; for an adapted causal LM, or
        a boolean pair mask (B, L, L) / (B, 1, L, L) (document-masked packing, block diffusion's block-causal
        mask), a 4D additive mask (B, 1, L, L), which HF models use as given: 0 where a query may attend,
        dtype-min elsewhere (a causal LM kept causal gets the causal mask ANDed in here, as tdlm's backbone does)."""
        pair = attention_mask is not None and attention_mask.dim() > 2
        if not self.bidirectional and not pair:
            return attention_mask
        B, L = ids.shape
        allowed = torch.ones(B, 1, L, L, dtype=torch.bool, device=ids.device)
        if pair:
            allowed = allowed & (attention_mask.bool() if attention_mask.dim() == 4 else attention_mask.bool()[:, None])
            if self.adaptation.causal:
                allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        elif attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if self.anneal_pattern is not None:
            allowed = allowed & self.anneal_pattern[:L, :L].to(ids.device)
        return torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)

    def _float_dtype(self) -> torch.dtype:
        p = next(self.hf.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def _call(self, ids, attention_mask, **kwargs):
        """The HF model's output (an object with ``logits``; a bare tensor or tuple from some remote code)."""
        a = self.adaptation
        if a.interface in ("timesteps", "logits") and (
                attention_mask is not None and attention_mask.dim() > 2 or "position_ids" in kwargs):
            raise ValueError(f"document-masked attention needs a masked or causal Hugging Face model; the "
                             f"remote-code {a.interface} interface takes no pair mask or positions")
        if a.interface == "timesteps":
            # MDLM/DUO _process_sigma: sigma is zeroed when the model has no time conditioning (refused otherwise)
            out = self.hf(input_ids=ids, timesteps=torch.zeros(ids.shape[0], device=ids.device))
        elif a.interface == "logits":
            out = self.hf(ids, attention_mask=attention_mask) if attention_mask is not None else self.hf(ids)
        else:
            if kwargs.get("position_ids") is None:
                kwargs.pop("position_ids", None)
            elif kwargs["position_ids"].dim() == 1:  # (L,) for the batch, as tdlm's backbone takes them
                kwargs["position_ids"] = kwargs["position_ids"][None].expand(ids.shape[0], -1)
            out = self.hf(input_ids=ids, attention_mask=self._attention_mask(ids, attention_mask, self._float_dtype()),
                          use_cache=False, **kwargs)
        return out

    @staticmethod
    def _logits_of(out) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)):
            return out[0]
        return out.logits

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        if self.adaptation.interface == "timesteps":  # SUBS: the mask token is never predicted
            logits = logits.clone()
            logits[..., self.adaptation.mask_token_id] += SUBS_NEG_INFINITY
        return logits

    def forward(self, input_ids, attention_mask=None, logits_mask=None, return_attention: bool = False,
                return_all_hidden: bool = False, logits_index=None, position_ids=None):
        """As ``TdlmForMaskedOrCausalLM.forward``: logits (B, L, V), or at ``logits_mask`` / ``logits_index``;
        ``position_ids`` (B, L) go to the HF model's own argument and a pair ``attention_mask`` (document masks,
        block diffusion) becomes its 4D mask (masked and causal families)."""
        if return_attention or return_all_hidden:
            out = self.hidden_states(input_ids, attention_mask, return_attention, return_all_hidden, position_ids)
            out["logits"] = self._select(out.pop("_logits"), input_ids.shape, logits_mask, logits_index,
                                         position_ids)
            return out
        extra = {} if position_ids is None else {"position_ids": position_ids}
        logits = self._logits_of(self._call(input_ids, attention_mask, **extra))
        return self._select(logits, input_ids.shape, logits_mask, logits_index, position_ids)

    def _select(self, logits, shape, logits_mask, logits_index, position_ids=None):
        """Shift (position i <- hidden state i-1; a sequence's first position keeps its own: position 0, or with
        ``position_ids`` every document start), select positions, then SUBS."""
        B, L = shape
        V = logits.shape[-1]
        shift = self.adaptation.shift_logits and not self.adaptation.causal
        if logits_index is None and logits_mask is not None:
            logits_index = logits_mask.flatten().nonzero().squeeze(1)
        if shift and position_ids is not None:  # document starts keep their own hidden state, as position 0 does
            flat = torch.arange(B * L, device=logits.device)
            src_all = flat - (position_ids.expand(B, L).flatten() != 0).long()
            src = src_all if logits_index is None else src_all.index_select(0, logits_index)
            return self._finish(logits.reshape(B * L, V).index_select(0, src).view(
                (B, L, V) if logits_index is None else (-1, V)))
        if logits_index is None:
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            return self._finish(logits)
        src = logits_index - (logits_index % L != 0).long() if shift else logits_index
        return self._finish(logits.reshape(B * L, V).index_select(0, src))

    def hidden_states(self, input_ids, attention_mask=None, return_attention: bool = False,
                      return_all_hidden: bool = False, position_ids=None):
        """Every layer's output and, on request, its attention probabilities, from the model's own
        ``output_hidden_states`` / ``output_attentions`` under eager attention (SDPA cannot return them)."""
        if not self.supports_attention_probs:
            raise NotImplementedError(f"{self.adaptation.interface} remote code returns no attention probabilities")
        base = self.base_model
        before = base.config._attn_implementation
        if return_attention and before != "eager":
            base.set_attn_implementation("eager")
        try:
            extra = {} if position_ids is None else {"position_ids": position_ids}
            out = self._call(input_ids, attention_mask, output_hidden_states=True, output_attentions=return_attention,
                             **extra)
        finally:
            if base.config._attn_implementation != before:
                base.set_attn_implementation(before)
        hidden = list(out.hidden_states)
        res = {"hidden": hidden[-1], "_logits": out.logits}
        if return_attention:
            res["attentions"] = list(out.attentions)
        if return_all_hidden:
            res["all_hidden"] = hidden[1:]  # the embedding output first, then each layer's
        return res

    # ------------------------------------------------------------------------------------------------ export
    def save_pretrained(self, directory: str, state_dict: dict | None = None, **kwargs) -> None:
        """The HF model in its own ``save_pretrained`` form (the Auto classes load it), with the flag in its
        config.json. Under LoRA the adapters are merged into a copy first (the trained model is left as it is, so
        a resume stays exact). ``state_dict`` (the wrapper's keys, gathered under ZeRO-3) is saved when given."""
        a = Adaptation(**asdict(self.adaptation))
        model = self.hf
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
            a.lora_merged, state_dict = True, None
        if state_dict is not None:
            state_dict = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
        setattr(model.config, FLAG, asdict(a))
        try:
            model.save_pretrained(directory, state_dict=state_dict, **kwargs)
        finally:
            delattr(model.config, FLAG)


# ---------------------------------------------------------------------------------------------------- loading
def _auto_config(path: str, trust_remote_code: bool, key: str = "model.pretrained"):
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if Path(path).exists() and not config_file.is_file():
        raise ConfigError(f"{key}: {path} holds no model (no config.json)")
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        if raw.get("model_type") == "tdlm":  # tdlm's own model/: its config class is not registered with AutoConfig
            from tdlm.model import TdlmConfig

            return TdlmConfig.from_pretrained(path)
        if raw.get("auto_map") and not trust_remote_code:
            raise ConfigError(f"{key}: {path} ships its own modelling code ({', '.join(raw['auto_map'].values())}); "
                              f"set model.trust_remote_code=true to run it")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - many loader errors; one clear line for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}: cannot load a model config from {path}: {reason}") from None


def family_of(config) -> str:
    """tdlm | masked | causal | timesteps | logits, from a config (remote code by its ``auto_map``)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if config.model_type == "tdlm":
        return "tdlm"
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map:
        if config.model_type == "bd3lm":
            raise ConfigError("model.pretrained: BD3-LM block-diffusion checkpoints are not supported: their forward "
                              "scores x_t with x_0 (2L tokens, block-causal), not the full-sequence NELBO tdlm computes")
        if getattr(config, "time_conditioning", False):
            raise ConfigError("model.pretrained: a time-conditioned remote-code checkpoint is not supported (tdlm's "
                              "estimators and samplers call the denoiser without t)")
        return "remote"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    raise ConfigError(f"model.pretrained: {archs} is neither a masked LM nor a causal LM (model_type "
                      f"{config.model_type!r})")


def _load_hf(path: str, family: str, config, trust_remote_code: bool):
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    transformers.utils.logging.disable_progress_bar()
    if family == "remote":
        auto_map = config.auto_map
        name = next((n for n in ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel") if n in auto_map), None)
        if name is None:
            raise ConfigError(f"model.pretrained: {path}'s auto_map names no model class ({', '.join(auto_map)})")
        cls = {"AutoModelForMaskedLM": AutoModelForMaskedLM, "AutoModelForCausalLM": AutoModelForCausalLM,
               "AutoModel": AutoModel}[name]
    else:
        cls = AutoModelForMaskedLM if family == "masked" else AutoModelForCausalLM
    try:
        return cls.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.pretrained: cannot load {path}: {str(exc).splitlines()[0]}") from None


def _interface_of(hf_model) -> str:
    params = inspect.signature(hf_model.forward).parameters
    return "timesteps" if "timesteps" in params else "logits"


def _resolve_shift(setting, interface: str, model_type: str) -> bool:
    if setting == "auto":
        return interface == "causal" or (interface == "logits" and model_type in SHIFTED_REMOTE)
    if setting is True and interface == "masked":
        raise ConfigError(f"model.shift_logits: true on a masked LM ({model_type}), whose position i predicts "
                          f"token i; use auto or false")
    return bool(setting)


def fit_vocabulary(hf_model, tokenizer, log=print) -> None:
    """Tokenizer and model must share a vocabulary: a tokenizer whose own vocabulary is larger than the model's
    embedding is another model's (one clear error); special tokens tdlm added ([MASK], [PAD]) grow the embedding
    (logged once). New rows start at the mean of the old ones (``resize_token_embeddings``)."""
    rows = hf_model.get_input_embeddings().num_embeddings
    base = tokenizer.vocab_size
    if base > rows:
        raise ConfigError(f"data.tokenizer: the tokenizer has {base} tokens, the model's embedding only {rows}: "
                          f"they belong to different models")
    if len(tokenizer) > rows:
        added = [t for t in tokenizer.all_special_tokens if tokenizer.convert_tokens_to_ids(t) >= rows]
        hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        log(f"model.pretrained: embedding grown from {rows} to {len(tokenizer)} rows for {', '.join(added)} "
            f"(mask token id {tokenizer.mask_token_id})")


def build_pretrained(model_section, diffusion_section, tokenizer, seq_len: int, log=print) -> nn.Module:
    """The training backbone of ``model.pretrained``: tdlm's own model continued, or an HF model adapted."""
    m, d = model_section, diffusion_section
    config = _auto_config(m.pretrained, m.trust_remote_code)
    family = family_of(config)
    if family == "tdlm":
        return _continue_tdlm(m, d, tokenizer, seq_len)
    hf = _load_hf(m.pretrained, family, config, m.trust_remote_code)
    interface = family if family != "remote" else _interface_of(hf)
    if m.causal and interface != "causal":
        raise ConfigError(f"model.causal: {config.model_type} is not a causal LM; the AR objective needs one")
    shift = _resolve_shift(m.shift_logits, interface, config.model_type) and not m.causal
    if m.attention_anneal_steps and (interface != "causal" or m.causal):
        raise ConfigError("model.attention_anneal_steps: applies to a causal LM adapted to diffusion only")
    if interface in ("masked", "causal"):
        fit_vocabulary(hf, tokenizer, log)
    elif len(tokenizer) > hf.config.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens, but the remote-code model has "
                          f"{hf.config.vocab_size} logits (its embedding cannot be grown here)")
    backbone_len = BackboneConfig(hf.config, Adaptation(interface, False, False, 0, None), 1).max_seq_len
    if seq_len > backbone_len:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds the model's {backbone_len} positions ({m.pretrained})")
    hf.config.pad_token_id = tokenizer.pad_token_id
    if d.block_size and (interface not in ("masked", "causal") or shift):
        why = ("its logits are shifted (set model.shift_logits=false)" if shift else
               f"the {interface} remote-code interface takes no attention mask or positions")
        raise ConfigError(f"diffusion.block_size: {d.block_size} needs the block-causal mask through the model's "
                          f"attention-mask interface, but {m.pretrained}: {why}")
    a = Adaptation(interface, m.causal, shift, tokenizer.mask_token_id, tokenizer.pad_token_id,
                   d.schedule, d.t_min, d.loglinear_eps, block_size=d.block_size)
    if m.gradient_checkpointing:
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing: {config.model_type} does not support it")
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora:
        hf = apply_lora(hf, m.lora)
    if interface in ("masked", "causal"):
        hf.train()
    return HFBackbone(hf, a)


def _continue_tdlm(m, d, tokenizer, seq_len: int):
    """tdlm's own checkpoint ``model/`` as the starting point; its shape is the checkpoint's, the objective and
    noise schedule this run's."""
    from tdlm.model import TdlmForMaskedOrCausalLM

    if m.lora or m.attention_anneal_steps or m.shift_logits is True:
        key = "lora" if m.lora else "attention_anneal_steps" if m.attention_anneal_steps else "shift_logits"
        raise ConfigError(f"model.{key}: not for tdlm's own model (model.pretrained={m.pretrained})")
    model = TdlmForMaskedOrCausalLM.from_pretrained(m.pretrained)
    c = model.config
    if bool(c.causal) != m.causal:
        raise ConfigError(f"model.causal: {m.causal} differs from the checkpoint's {c.causal} ({m.pretrained}); "
                          f"tdlm's own attention is fixed by its config")
    if c.vocab_size < len(tokenizer) or c.mask_token_id != tokenizer.mask_token_id:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens (mask {tokenizer.mask_token_id}) do not match "
                          f"the checkpoint's vocabulary {c.vocab_size} (mask {c.mask_token_id})")
    if seq_len > c.max_seq_len:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds the checkpoint's max_seq_len {c.max_seq_len}")
    c.schedule, c.t_min, c.loglinear_eps = d.schedule, d.t_min, d.loglinear_eps
    c.block_size = d.block_size  # MDLM -> block diffusion fine-tuning (BD3-LM) records the new L'
    return model.train()


def apply_lora(hf_model, lora: dict):
    """LoRA adapters through ``peft``: only they train. Target modules that match nothing fail with one line."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.lora: needs the peft package (pip install peft)") from None
    targets = list(lora.get("target_modules") or [])
    names = {n.rsplit(".", 1)[-1] for n, _ in hf_model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing or not targets:
        raise ConfigError(f"model.lora.target_modules: {missing or targets} not found in the model "
                          f"(linear layers: {', '.join(sorted(_linear_names(hf_model)))})")
    cfg = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 16)),
                     lora_dropout=float(lora.get("dropout", 0.0)), target_modules=targets)
    return get_peft_model(hf_model, cfg)


def _linear_names(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, Conv1D))}


def is_hf_export(path: str | Path) -> bool:
    """Whether a saved ``model/`` directory is an HF backbone's export (its config.json carries the flag)."""
    config_file = Path(path) / "config.json"
    return config_file.is_file() and FLAG in json.loads(config_file.read_text())


def load_hf_export(path: str | Path, trust_remote_code: bool | None = None) -> HFBackbone:
    """An exported HF backbone, rebuilt as it was trained: interface, attention, shift and mask from the flag.
    Remote code runs only if the export says it is remote (it was opted into when training) or the caller allows."""
    path = str(path)
    raw = json.loads((Path(path) / "config.json").read_text())
    a = Adaptation(**raw[FLAG])
    remote = a.interface in ("timesteps", "logits")
    config = _auto_config(path, remote if trust_remote_code is None else trust_remote_code, key="--checkpoint")
    hf = _load_hf(path, "remote" if remote else a.interface, config, remote)
    for attr in (FLAG,):
        if hasattr(hf.config, attr):
            delattr(hf.config, attr)
    return HFBackbone(hf.eval(), a)
