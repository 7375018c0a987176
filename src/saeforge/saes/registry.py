"""The one table of SAE architectures: name -> (SAE class, config class).

The CLI's choices, the config loader (``RunConfig.from_dict``) and ``formats.load_sae`` all
look names up here. Built-in architectures are listed in ``_BUILTIN`` and imported on first
lookup, so importing this module is cheap and imports no architecture module until one is asked for.
Adding an architecture: one new file with its SAE and config classes, plus one line below
(or ``register(...)`` from outside the package).
"""

from __future__ import annotations

import importlib

from saeforge.config import ConfigError

# name -> (module, SAE class name, config class name)
_BUILTIN: dict[str, tuple[str, str, str]] = {
    "relu": ("saeforge.saes.relu", "ReLUSAE", "ReLUConfig"),
    "topk": ("saeforge.saes.topk", "TopKSAE", "TopKConfig"),
    "gated": ("saeforge.saes.gated", "GatedSAE", "GatedConfig"),
    "jumprelu": ("saeforge.saes.jumprelu", "JumpReLUSAE", "JumpReLUConfig"),
    "batchtopk": ("saeforge.saes.batchtopk", "BatchTopKSAE", "BatchTopKConfig"),
    "matryoshka": ("saeforge.saes.matryoshka", "MatryoshkaSAE", "MatryoshkaConfig"),
}

_REGISTERED: dict[str, tuple[type, type]] = {}


def register(name: str, sae_cls: type, cfg_cls: type) -> None:
    """Add an architecture. Its config class's ``architecture`` default must be ``name``."""
    own = cfg_cls.__dataclass_fields__["architecture"].default
    if own != name:
        raise ValueError(
            f"register({name!r}, ...): {cfg_cls.__name__}.architecture defaults to {own!r}; make it {name!r}"
        )
    known = _REGISTERED.get(name)
    if known is not None and known != (sae_cls, cfg_cls):
        raise ValueError(f"architecture {name!r} is already registered to {known[0].__name__}; pick another name")
    _REGISTERED[name] = (sae_cls, cfg_cls)


def names() -> list[str]:
    """All architecture names, sorted."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def _lookup(name: str) -> tuple[type, type]:
    if name not in _REGISTERED:
        if name not in _BUILTIN:
            raise ConfigError(f"unknown SAE architecture {name!r}; known architectures: {names()}")
        module, sae_name, cfg_name = _BUILTIN[name]
        mod = importlib.import_module(module)
        register(name, getattr(mod, sae_name), getattr(mod, cfg_name))
    return _REGISTERED[name]


def sae_class(name: str) -> type:
    """The ``saes.base.SAE`` subclass of architecture ``name``."""
    return _lookup(name)[0]


def config_class(name: str) -> type:
    """The ``saes.base.SAEConfig`` subclass of architecture ``name``."""
    return _lookup(name)[1]


def transcoder_architectures() -> list[str]:
    """Registry names whose SAE class can be a transcoder (for error messages and docs)."""
    return [n for n in names() if getattr(sae_class(n), "transcoder_ok", False)]
