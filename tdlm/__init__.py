"""tdlm: a trainer for discrete text-diffusion language models (masked diffusion with a true NELBO).

Modules: ``config`` (typed YAML config), ``model`` (bidirectional/causal transformer), ``diffusion`` (schedules,
masking, NELBO), ``data`` (corpora, tokenizer, packing), ``checkpoint``, ``sampling``, ``metrics`` and ``train``.
"""

import os
from importlib.util import find_spec

__version__ = "0.1.0"


def _name_cpu_for_deepspeed() -> None:
    """DeepSpeed, when installed, is imported by Accelerate on the first checkpoint and, finding no device, warns
    "Setting accelerator to CPU" on every run. Where torch sees no accelerator and no vendor plugin DeepSpeed
    would detect is installed, it picks the CPU anyway: name it (DS_ACCELERATOR) so it does not warn. Set here,
    not only in the Makefile, so ``python tdlm/train.py`` is quiet too; an explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" in os.environ or find_spec("deepspeed") is None:
        return
    if any(find_spec(m) for m in ("torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu", "torch_supa",
                                  "torch_xmlir", "intel_extension_for_pytorch")):
        return
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    found = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not found:
        os.environ["DS_ACCELERATOR"] = "cpu"


_name_cpu_for_deepspeed()
