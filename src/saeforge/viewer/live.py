"""The live box: run a text through each SAE's model and SAE, per-token feature activations.

Models and SAEs are loaded on first use (a model is shared by the SAEs that read it) from what the
database's meta says (model name, SAE folder, hook): nothing a request sends names a file. Forward
passes are serialised by one lock: two CPU cores gain nothing from running them in parallel, and
hook-based splices (steering) must not see another request's forward on the same shared model.
The LM runs in the dtype the index ran it in (meta ``model_dtype``: bf16 where ``model.dtype=auto`` chose
it), as the stored contexts did; the SAE encodes in its own dtype (float32 as saeforge trains it). So live
values match the database's activations, and differ from a float32 forward by bf16 rounding (~2^-8
relative) when the LM is bf16.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from saeforge.config import DataConfig, UserError, from_dict
from saeforge.data import excluded_mask
from saeforge.data.packing import _bos_id
from saeforge.models import load_model, resolve_hook
from saeforge.models.hooks import capture
from saeforge.saes.formats import load_sae

MAX_TOKENS = 256  # the live box is for a sentence or a paragraph, not a document


class LiveError(UserError, RuntimeError):
    """The model or SAE behind a database could not be loaded; the message says which and why."""


@dataclass
class Loaded:
    """One database's model (shared with other SAEs on it), SAE, resolved hook point and data config."""

    lm: Any  # saeforge.models.LoadedModel
    sae: Any
    hook: Any  # saeforge.models.hooks.HookPoint
    data_cfg: Any  # saeforge.config.DataConfig the index was built with (BOS, excluded tokens)


class LiveRunner:
    def __init__(self, max_tokens: int = MAX_TOKENS):
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}
        self._saes: dict[str, Loaded] = {}

    @contextmanager
    def loaded(self, key: str, meta: dict[str, Any]) -> Iterator[Loaded]:
        """The model and SAE of database ``key`` (loaded on first use), with the runner's lock held.

        Use them only inside the ``with``: the lock is what keeps two requests' forward passes (and a
        steering splice's hooks) off the shared model at once. Raises ``LiveError`` if loading fails.
        """
        with self._lock:
            yield self._load(key, meta)

    def _load(self, key: str, meta: dict[str, Any]) -> Loaded:
        if key not in self._saes:
            try:
                name = meta["model"]
                if name not in self._models:
                    self._models[name] = load_model(name, dtype=meta.get("model_dtype", "float32"), device="cpu")
                lm = self._models[name]
                sae = load_sae(meta["sae_dir"], device=str(lm.device))
                hook = resolve_hook(lm.model, meta["hook"])
            except (OSError, ValueError, KeyError) as e:
                raise LiveError(
                    f"cannot load the model/SAE of {key} ({e}); the database points at "
                    f"{meta.get('model')!r} and {meta.get('sae_dir')!r}"
                ) from e
            self._saes[key] = Loaded(lm, sae, hook, from_dict(DataConfig, meta["data_config"], "data"))
        return self._saes[key]

    def tokenize(self, loaded: Loaded, text: str) -> torch.Tensor:
        ids = loaded.lm.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens - 1]
        bos = _bos_id(loaded.lm.tokenizer) if loaded.data_cfg.prepend_bos else None
        return torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long)[None]

    @torch.no_grad()
    def latents(self, key: str, meta: dict[str, Any], text: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(token ids, f_TF latents, keep_T) for ``text`` under the SAE ``key``; special positions are zeroed."""
        with self.loaded(key, meta) as loaded:
            tokens_ST = self.tokenize(loaded, text)
            acts = capture(loaded.lm.model, [loaded.hook], tokens_ST.to(loaded.lm.device))[loaded.hook.name][0]
            f_TF = loaded.sae.encode(acts.to(loaded.sae.W_enc.dtype)).float().cpu()
        keep_T = ~excluded_mask(tokens_ST, loaded.lm.tokenizer, loaded.data_cfg)[0]
        return tokens_ST[0].tolist(), f_TF * keep_T[:, None], keep_T

    def top_features(self, key: str, meta: dict[str, Any], text: str, top: int) -> dict[str, Any]:
        ids, f_TF, keep_T = self.latents(key, meta, text)
        vals, idx = f_TF.topk(min(top, f_TF.shape[1]), dim=1)
        per_token = [
            [{"index": int(i), "value": float(v)} for v, i in zip(vr, ir) if v > 0]
            for vr, ir in zip(vals.tolist(), idx.tolist())
        ]
        return {"token_ids": ids, "features": per_token, "excluded": [not k for k in keep_T.tolist()]}
