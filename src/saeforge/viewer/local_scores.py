"""Explanation and scores through the in-process LM (llm_local.py): answers read, never parsed from free text.

- explanation: llm.py's explain prompt, the assistant's turn prefilled with ``EXPLANATION:``; the model
  writes the rest of that line (``LocalChat.complete``).
- detection: one prompt per held-out context (the explanation, the context as a JSON string, "does the
  feature fire in it? Answer yes or no"), prefilled ``Answer:``; "fires" when p(yes) > p(no).
  Balanced accuracy against "its true maximum is > 0" (SPECS "Explanations"), and ``detection_auc``: the
  AUROC of p(yes) / (p(yes) + p(no)) against the same truth.
- fuzzing: llm.py's ``fuzz_items`` (each firing held-out context with correct and with misplaced
  highlights), one prompt each, "are the marks on tokens the explanation describes?", scored like
  detection (``fuzzing``, ``fuzzing_auc``).
- simulation: per held-out context, the assistant's turn lists its tokens as ``"token"<TAB>?`` lines; the
  prediction at a token is the expected digit 0-9 the model gives after its TAB (``LocalChat.digit_means``);
  score: Pearson correlation with the true activations over all held-out tokens, as for the other backends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from saeforge.viewer.explain import Context, balanced_accuracy, simulation_score
from saeforge.viewer.llm import SYSTEM, explain_messages, fuzz_items
from saeforge.viewer.llm_local import LocalChat

YES_NO = (" yes", " no")
EXPLAIN_PREFIX = "EXPLANATION:"
ANSWER_PREFIX = "Answer:"
SIM_HEAD = "token\tactivation\n"


def detect_one_messages(explanation: str, text: str) -> list[dict]:
    ask = (
        f"A feature is explained as: {explanation}\nDoes this text (a JSON string) contain a token where the "
        f"feature fires? Answer yes or no.\n\nText: {json.dumps(text)}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]


def fuzz_one_messages(explanation: str, text: str) -> list[dict]:
    ask = (
        f"A feature is explained as: {explanation}\nIn this text (a JSON string) some tokens are marked <<like "
        "this>>. Are the marks exactly on tokens the explanation describes? Answer yes or no.\n\n"
        f"Text: {json.dumps(text)}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]


def simulate_one_messages(explanation: str) -> list[dict]:
    ask = (
        f"A feature is explained as: {explanation}\nFor each token of a text (a JSON string per line), write "
        "the feature's activation on it after a tab, as one digit from 0 (none) to 9 (strongest)."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]


def auroc(truth: Sequence[bool], score: Sequence[float]) -> float | None:
    """P(score of a random positive > that of a random negative), ties counting 1/2; None with one class."""
    pos = [s for t, s in zip(truth, score) if t]
    neg = [s for t, s in zip(truth, score) if not t]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def yes_no(chat: LocalChat, prompts: list[list[dict]]) -> tuple[list[bool], list[float]]:
    """(said yes: p(yes) > p(no), p(yes) / (p(yes) + p(no))) of each prompt, prefilled ``Answer:``."""
    probs = chat.choice_probs([(m, ANSWER_PREFIX) for m in prompts], YES_NO)
    return [y > n for y, n in probs], [y / (y + n) if y + n > 0 else 0.5 for y, n in probs]


def local_feature(chat: LocalChat, explain_ctx: list[Context], held: list[Context], seed: int) -> tuple[str, dict]:
    """(explanation, scores) of one feature: the prefilled explanation, then ``local_scores``."""
    text = chat.complete(explain_messages([c for c in explain_ctx if c.fires]), EXPLAIN_PREFIX)
    return text, local_scores(chat, text, held, seed)


def local_scores(chat: LocalChat, text: str, held: list[Context], seed: int) -> dict[str, Any]:
    """{simulation, detection, detection_auc, fuzzing, fuzzing_auc} of explanation ``text`` on the held-out
    contexts. Contexts are scored one prompt each, so their order does not matter; fuzzing items are drawn
    with ``seed`` as for the llm backend."""
    preds = chat.digit_means([(simulate_one_messages(text), SIM_HEAD, [json.dumps(t) for t in c.tokens]) for c in held])
    truth = [c.fires for c in held]
    said, p_yes = yes_no(chat, [detect_one_messages(text, "".join(c.tokens)) for c in held])
    items = fuzz_items(held, seed)
    out: dict[str, Any] = {
        "simulation": simulation_score(preds, held),
        "detection": balanced_accuracy(truth, said),
        "detection_auc": auroc(truth, p_yes),
        "fuzzing": None,
        "fuzzing_auc": None,
    }
    if items:
        fits, p_fit = yes_no(chat, [fuzz_one_messages(text, t) for t, _ in items])
        ok = [o for _, o in items]
        out["fuzzing"], out["fuzzing_auc"] = balanced_accuracy(ok, fits), auroc(ok, p_fit)
    return out
