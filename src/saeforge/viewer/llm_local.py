"""An in-process LLM for explanations: a Hugging Face causal LM answering chat messages, no server.

``LocalChat`` has ``LLMClient``'s interface (``chat(messages, parse)``, ``sent``, ``name``) and shares its
cache: an answer that ``parse`` accepts is stored in the feature database's ``llm_cache`` under
sha256(local:MODEL, max_new_tokens, messages), so a rerun generates nothing twice; a malformed answer
raises ``MalformedAnswer`` and is not cached. The prompts and parsers are those of llm.py.

Messages go through the tokenizer's chat template (``add_generation_prompt=True``); a tokenizer without
one (a base model) gets a plain ``role: text`` transcript ending in ``assistant:``. Decoding is greedy,
at most ``--local.max_new_tokens`` new tokens, so the same prompt always gets the same answer.

The default model is the bundled ``smollm2-135m`` (SmolLM2-135M-Instruct): it runs anywhere, offline,
but it is small. docs/benchmarks.md measures how well it explains; read that before trusting it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saeforge.config import F, check
from saeforge.models import load_model
from saeforge.viewer.llm import LLMClient, MalformedAnswer


@dataclass
class LocalConfig:
    model: str = F("smollm2-135m", "Causal LM answering in-process: built-in name, local folder, .gguf or hub id.")
    max_new_tokens: int = F(
        320, "Tokens generated per answer at most (a simulation answer needs ~4 per context token)."
    )
    max_prompt_tokens: int = F(4096, "Longer prompts are not run: that feature counts as failed.")
    device: str = F("auto", "Device for the model: auto, cpu, cuda, cuda:N or mps.")
    dtype: str = F("float32", "Model dtype: float32, bfloat16 or float16.")

    def __post_init__(self) -> None:
        check(bool(self.model), "local.model must name a model (e.g. smollm2-135m)")
        check(self.max_new_tokens > 0, "local.max_new_tokens must be positive")
        check(self.max_prompt_tokens > 0, "local.max_prompt_tokens must be positive")


def transcript(messages: Sequence[dict]) -> str:
    """The prompt of a tokenizer without a chat template: one ``role: text`` block per message."""
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"


class LocalChat(LLMClient):
    """LLMClient's chat + cache over an in-process model (only ``_key`` and ``_post`` differ)."""

    def __init__(self, cfg: LocalConfig, con: sqlite3.Connection, lm=None):
        self.local = cfg
        self.lm = lm if lm is not None else load_model(cfg.model, cfg.dtype, cfg.device)
        self.name = f"local:{cfg.model}"
        self.con = con
        self.lock = threading.Lock()  # guards the connection and the counter
        self.gen_lock = threading.Lock()  # one generation at a time: threads would only share the cores
        self.sent = 0  # generations run (cached answers are free)

    def _key(self, messages: Sequence[dict]) -> str:
        # the answer depends on the cap too: a longer one may parse where a truncated one did not
        blob = json.dumps([self.name, self.local.max_new_tokens, list(messages)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def prompt_ids(self, messages: Sequence[dict]) -> torch.Tensor:
        """Token ids [1, T] of the prompt: chat template when the tokenizer has one, else ``transcript``."""
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        else:
            text = transcript(messages)
        # the template already wrote BOS / role tokens itself; adding specials again would double them
        return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def _post(self, messages: Sequence[dict]) -> str:
        ids_1T = self.prompt_ids(messages)
        if ids_1T.shape[1] > self.local.max_prompt_tokens:
            raise MalformedAnswer(
                f"prompt of {ids_1T.shape[1]} tokens > --local.max_prompt_tokens={self.local.max_prompt_tokens}"
            )
        tok = self.lm.tokenizer
        with self.gen_lock, torch.inference_mode():
            ids_1T = ids_1T.to(self.lm.device)
            out_1N = self.lm.model.generate(
                ids_1T,
                attention_mask=torch.ones_like(ids_1T),
                max_new_tokens=self.local.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            with self.lock:
                self.sent += 1
        return tok.decode(out_1N[0, ids_1T.shape[1] :], skip_special_tokens=True)
