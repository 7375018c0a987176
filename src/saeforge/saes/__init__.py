"""Sparse autoencoders: the shared base, one file per architecture, the registry, and the SAELens format.

Look architectures up by name with ``registry.sae_class`` / ``registry.config_class``;
save and load with ``formats.save_sae`` / ``formats.load_sae``.
"""

from saeforge.saes.base import SAE, LossContext, SAEConfig, StepOutput
from saeforge.saes.registry import config_class, names, register, sae_class

__all__ = ["SAE", "SAEConfig", "LossContext", "StepOutput", "config_class", "sae_class", "names", "register"]
