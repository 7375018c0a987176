"""An in-process LM for explanations: a Hugging Face causal LM read directly, no server, no free-form answers.

A small model (the bundled SmolLM2-135M-Instruct) ignores answer formats when asked to generate freely, so
``LocalChat`` never lets it choose the format. It answers in three ways, the way delphi and Neuronpedia
score with small or log-prob models:

- ``complete(messages, prefix)``: the assistant's turn starts with ``prefix`` (e.g. ``EXPLANATION:``)
  already written; greedy decoding writes the rest, at most ``--local.max_new_tokens`` tokens, and stops at
  the first token containing a newline (or EOS). At the first step blank tokens (whitespace only, special
  tokens) are forbidden, so the answer is never empty. Returns the text up to the newline, stripped.
- ``choice_probs(prompts, choices)``: one forward per prompt (right-padded batches of ``--local.batch``),
  the next-token probabilities of the two answer words after a prefilled prefix. The words are compared at
  their first differing token: the prompt fed is the common part of ``prefix + choice`` tokenised for both
  choices (with SmolLM2 ``Answer:`` + `` yes`` / `` no``; a tokenizer splitting `` yes`` into `` `` + ``y``
  compares ``y`` with ``n`` after the space).
- ``digit_means(prompts)``: one forward per prompt over a prefilled listing of lines ``token<TAB>?``; at
  each TAB the probabilities of the digit tokens 0-9, renormalised, give the expected digit (Bills et al.
  2023's all-at-once simulator, with ``?`` as its ``unknown`` placeholder).

Right padding keeps every real token's positions and attention as in an unpadded forward (causal: no real
token sees a pad after it), so batched results equal one-by-one ones up to float rounding. Every result is
stored in the feature database's ``llm_cache`` under sha256(local:MODEL, method, its settings, the prompt),
committed at once, so a rerun runs the model for nothing it already answered. Decoding is greedy: the same
prompt always gets the same answer. Messages go through the tokenizer's chat template
(``add_generation_prompt=True``); a tokenizer without one gets a plain ``role: text`` transcript ending
in ``assistant:``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from saeforge.config import ConfigError, F, check
from saeforge.models import load_model
from saeforge.viewer.explain import cache_answers, cached_answers
from saeforge.viewer.llm import MalformedAnswer

DIGITS = tuple(str(d) for d in range(10))


@dataclass
class LocalConfig:
    model: str = F("smollm2-135m", "Causal LM answering in-process: built-in name, local folder, .gguf or hub id.")
    max_new_tokens: int = F(24, "Tokens generated for an explanation at most (it also stops at the first newline).")
    max_prompt_tokens: int = F(4096, "Longer prompts are not run: that feature counts as failed.")
    batch: int = F(8, "Prompts per forward pass when scoring (detection, fuzzing, simulation).")
    device: str = F("auto", "Device for the model: auto, cpu, cuda, cuda:N or mps.")
    dtype: str = F("float32", "Model dtype: float32, bfloat16 or float16.")

    def __post_init__(self) -> None:
        check(bool(self.model), "local.model must name a model (e.g. smollm2-135m)")
        check(self.max_new_tokens > 0, "local.max_new_tokens must be positive")
        check(self.max_prompt_tokens > 0, "local.max_prompt_tokens must be positive")
        check(self.batch > 0, "local.batch must be positive")


def transcript(messages: Sequence[dict]) -> str:
    """The prompt of a tokenizer without a chat template: one ``role: text`` block per message."""
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"


class LocalChat:
    """Prefilled generation and next-token probabilities of an in-process LM, cached in ``llm_cache``."""

    def __init__(self, cfg: LocalConfig, con: sqlite3.Connection, lm=None):
        self.local = cfg
        self.lm = lm if lm is not None else load_model(cfg.model, cfg.dtype, cfg.device)
        self.name = f"local:{cfg.model}"
        self.con = con
        self.lock = threading.Lock()  # guards the connection and the counter
        self.sent = 0  # model calls run: generations and forward batches (cached answers are free)
        self._blank: tuple[list[int], list[int]] | None = None

    # ---- prompts --------------------------------------------------------------------------
    def prompt_text(self, messages: Sequence[dict]) -> str:
        """The prompt up to the assistant's turn: chat template when the tokenizer has one, else ``transcript``."""
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return transcript(messages)

    def ids(self, text: str) -> list[int]:
        # the template already wrote BOS / role tokens itself; adding specials again would double them
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_len(self, n: int) -> None:
        if n > self.local.max_prompt_tokens:
            raise MalformedAnswer(f"prompt of {n} tokens > --local.max_prompt_tokens={self.local.max_prompt_tokens}")

    # ---- cache ----------------------------------------------------------------------------
    def _key(self, method: str, payload) -> str:
        blob = json.dumps([self.name, method, payload], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cached_many(self, method: str, payloads: list, compute: Callable[[list[int]], list]) -> list:
        """Cached values of ``payloads``; ``compute(indices)`` runs the model for the missing ones only."""
        keys = [self._key(method, p) for p in payloads]
        with self.lock:
            out = [None if a is None else json.loads(a) for a in cached_answers(self.con, keys)]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            for i, v in zip(todo, compute(todo)):
                out[i] = v
            with self.lock:
                cache_answers(self.con, [(keys[i], json.dumps(out[i])) for i in todo])
        return out

    # ---- prefilled generation -------------------------------------------------------------
    def blank_and_stop_ids(self) -> tuple[list[int], list[int]]:
        """(ids forbidden as the first answer token: whitespace-only or special; ids ending the answer: any
        token whose text holds a newline, and the special tokens)."""
        if self._blank is None:
            tok = self.lm.tokenizer
            special = set(tok.all_special_ids)
            texts = tok.batch_decode([[i] for i in range(len(tok))])
            newline = {i for i, t in enumerate(texts) if "\n" in t}
            blank = {i for i, t in enumerate(texts) if not t.strip()} | special | newline
            self._blank = (sorted(blank), sorted(newline | special))
        return self._blank

    def complete(self, messages: Sequence[dict], prefix: str) -> str:
        """Greedy continuation of the assistant's turn after ``prefix``, up to the first newline (stripped)."""
        payload = [list(messages), prefix, self.local.max_new_tokens]
        return self._cached_many("prefill", [payload], lambda _: [self._generate(messages, prefix)])[0]

    def _generate(self, messages: Sequence[dict], prefix: str) -> str:
        tok = self.lm.tokenizer
        ids = self.ids(self.prompt_text(messages) + prefix)
        self._check_len(len(ids))
        blank, stop = self.blank_and_stop_ids()
        with torch.inference_mode():
            ids_1T = torch.tensor([ids], device=self.lm.device)
            out_1N = self.lm.model.generate(
                ids_1T,
                attention_mask=torch.ones_like(ids_1T),
                max_new_tokens=self.local.max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                begin_suppress_tokens=blank,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0],
            )
        with self.lock:
            self.sent += 1
        return tok.decode(out_1N[0, len(ids) :], skip_special_tokens=True).split("\n")[0].strip()

    # ---- next-token probabilities ---------------------------------------------------------
    def choice_ids(self, head: str, choices: tuple[str, str]) -> tuple[list[int], int, int]:
        """(prompt ids: the common part of ``head + choice`` for both choices, id of choice 0, id of choice 1)."""
        a, b = self.ids(head + choices[0]), self.ids(head + choices[1])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        if n == min(len(a), len(b)):
            raise ConfigError(f"{self.name}'s tokenizer cannot tell the answers {choices} apart by a token")
        return a[:n], a[n], b[n]

    def choice_probs(
        self, prompts: Sequence[tuple[Sequence[dict], str]], choices: tuple[str, str]
    ) -> list[list[float]]:
        """[p(choice 0), p(choice 1)] of each (messages, prefix) prompt, from the next-token softmax."""
        payloads = [[list(m), prefix, list(choices)] for m, prefix in prompts]

        def compute(todo: list[int]) -> list[list[float]]:
            rows = [self.choice_ids(self.prompt_text(prompts[i][0]) + prompts[i][1], choices) for i in todo]
            probs = self._probs_at([r[0] for r in rows], [[len(r[0]) - 1] for r in rows])
            return [[p_PV[0, r[1]].item(), p_PV[0, r[2]].item()] for p_PV, r in zip(probs, rows)]

        return self._cached_many("choice", payloads, compute)

    def digit_means(self, prompts: Sequence[tuple[Sequence[dict], str, Sequence[str]]]) -> list[list[float]]:
        """Per (messages, head, lines) prompt: the expected digit 0-9 after each line's TAB, the assistant's
        turn being ``head`` then ``line<TAB>?\\n`` per line (one forward for all lines)."""
        digit_ids = [self.ids(d) for d in DIGITS]
        if any(len(i) != 1 for i in digit_ids):
            raise ConfigError(f"{self.name}'s tokenizer does not write each digit 0-9 as one token")
        d_ids = torch.tensor([i[0] for i in digit_ids])
        payloads = [[list(m), head, list(lines)] for m, head, lines in prompts]

        def compute(todo: list[int]) -> list[list[float]]:
            rows, spots = [], []
            for i in todo:
                messages, head, lines = prompts[i]
                ids, at = self.ids(self.prompt_text(messages) + head), []
                for line in lines:
                    ids += self.ids(line + "\t")  # chunk by chunk: the TAB is always a token of its own end
                    at.append(len(ids) - 1)
                    ids += self.ids("?\n")
                rows.append(ids)
                spots.append(at)
            out = []
            for p_PV in self._probs_at(rows, spots):
                p_PD = p_PV[:, d_ids].double()
                p_PD = p_PD / p_PD.sum(1, keepdim=True)
                out.append((p_PD @ torch.arange(10, dtype=torch.float64)).tolist())
            return out

        return self._cached_many("digits", payloads, compute)

    def _probs_at(self, rows: list[list[int]], spots: list[list[int]]) -> list[torch.Tensor]:
        """Next-token probabilities [len(spots[r]), V] (float32, CPU) at positions ``spots[r]`` of each row,
        rows forwarded ``--local.batch`` at a time, right-padded."""
        for r in rows:
            self._check_len(len(r))
        pad = self.lm.tokenizer.pad_token_id or 0
        out = []
        with torch.inference_mode():
            for s in range(0, len(rows), self.local.batch):
                chunk = rows[s : s + self.local.batch]
                T = max(map(len, chunk))
                ids_BT = torch.tensor([r + [pad] * (T - len(r)) for r in chunk], device=self.lm.device)
                mask_BT = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in chunk], device=self.lm.device)
                logits_BTV = self.lm.model(input_ids=ids_BT, attention_mask=mask_BT).logits
                with self.lock:
                    self.sent += 1
                for b, at in enumerate(spots[s : s + self.local.batch]):
                    out.append(torch.softmax(logits_BTV[b, at].float(), -1).cpu())
        return out
