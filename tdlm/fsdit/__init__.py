"""FSDiT: few-shot image generation with a DiT trained by flow matching, conditioned on a pooled SigLIP embedding
of a support set of images of the same class (the image sibling of tdlm).

Modules, one idea each: ``model`` (the DiT backbone and its config), ``flow`` (path, loss, CFG, samplers, EMA),
``siglip`` (frozen offline SigLIP encoder and embedding caches), ``data`` (CIFAR-100 pickle layout, synthetic
stand-in, few-shot episodes). FID/KID live in ``eval/fid.py``. ``siglip`` imports transformers, so it is not
imported here; ``from tdlm.fsdit.siglip import ...`` when needed.
"""

from tdlm.fsdit.flow import flow_loss, guided_velocity, sample
from tdlm.fsdit.model import FSDiT, FSDiTConfig, count_parameters

__all__ = ["FSDiT", "FSDiTConfig", "count_parameters", "flow_loss", "guided_velocity", "sample"]
