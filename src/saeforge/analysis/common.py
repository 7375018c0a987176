"""Shared pieces of the analysis tools: loading an SAE with its model and hook, tokenising prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saeforge.config import ConfigError, UsageError
from saeforge.models import load_model
from saeforge.saes.formats import load_sae, read_cfg


def load_for_analysis(sae_dir: str | Path, model: str | None = None, device: str = "cpu", dtype: str = "float32"):
    """(lm, sae, hook_name) for a saved SAE: the model and hook default to those in its cfg.json.

    float32 by default: analysis runs few tokens, and bf16 would round edits on the residual stream.
    ``sae.hook_name`` is set so width errors can say where the SAE belongs.
    """
    meta = read_cfg(sae_dir).get("metadata") or {}
    model_name = model or meta.get("model_name")
    hook = meta.get("hook_name")
    if not model_name:
        raise ConfigError(f"{sae_dir}/cfg.json names no metadata.model_name; pass the model (--model NAME)")
    if not hook:
        raise UsageError(f"{sae_dir}/cfg.json names no metadata.hook_name; pass the hook (--hook NAME)")
    sae = load_sae(sae_dir, device=device)
    if sae.is_transcoder:  # its decoder writes another hook's space: splicing it at `hook` would be wrong
        raise UsageError(
            f"{sae_dir} is a transcoder ({hook} -> {meta.get('hook_name_out')}); the analysis tools "
            "splice an SAE at one hook and do not take transcoders yet (evaluate it with `saeforge eval`)"
        )
    sae.requires_grad_(False)
    sae.hook_name = hook
    lm = load_model(model_name, dtype=dtype, device=device)
    return lm, sae, hook


def prompt_ids(tokenizer: Any, prompt: str, prepend_bos: bool = True, device: torch.device | str = "cpu") -> Tensor:
    """Token ids [1, T] of ``prompt``, BOS first when the tokenizer has one (as in SAE training windows)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None:
        ids = [int(bos), *ids]
    if not ids:
        raise UsageError(f"prompt {prompt!r} tokenises to nothing; give some text")
    return torch.tensor([ids], dtype=torch.long, device=device)


def single_token(tokenizer: Any, text: str) -> int:
    """The id of ``text`` if it is exactly one token; otherwise a ValueError showing how it splits."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise UsageError(
            f"{text!r} is {len(ids)} tokens {pieces}, not one; pick a single-token completion "
            "(often with a leading space, e.g. ' Paris')"
        )
    return int(ids[0])
