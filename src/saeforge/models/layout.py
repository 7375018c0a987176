"""What saeforge knows of a model family's module layout, and how to get the HF module out of a LoadedModel."""

from __future__ import annotations

from typing import Any

from torch import nn

# family -> (path of the decoder layer list, attention submodule, MLP submodule)
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "self_attn", "mlp"),
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
}

# HF config.model_type -> layout family. These all keep model.model.layers[L] with .self_attn and .mlp.
MODEL_TYPE_FAMILY: dict[str, str] = {
    **{t: "llama" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "phi3")},
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}


def hf_model(model: Any) -> nn.Module:
    """The HF causal LM itself, given it or a ``LoadedModel`` (whose ``.model`` it is).

    An nn.Module comes back as is: an HF causal LM has a ``.model`` of its own (the decoder stack),
    so unwrapping on the attribute alone would go one level too deep.
    """
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if not isinstance(inner, nn.Module):
        raise TypeError(
            f"expected an HF causal LM (a torch.nn.Module) or a LoadedModel from saeforge.models.load_model, "
            f"got {type(model).__name__}"
        )
    return inner


def family_of(config: Any) -> str:
    """Layout family for an HF config: "llama", "gpt2", "gpt_neox", or the raw model_type if unknown."""
    model_type = getattr(config, "model_type", None) or "unknown"
    return MODEL_TYPE_FAMILY.get(model_type, model_type)


def n_layers_of(model: nn.Module) -> int:
    family = family_of(model.config)
    if family in LAYOUTS:
        return len(model.get_submodule(LAYOUTS[family][0]))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "num_hidden_layers", 0) or 0)
