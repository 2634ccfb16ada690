"""tdlm: a trainer for discrete text-diffusion language models (masked diffusion with a true NELBO).

Modules: ``config`` (typed YAML config), ``model`` (bidirectional/causal transformer), ``diffusion`` (schedules,
masking, NELBO), ``data`` (corpora, tokenizer, packing), ``checkpoint``, ``sampling``, ``metrics`` and ``train``.
"""

__version__ = "0.1.0"
