"""An OpenAI-compatible chat client for explanations, and the LLM explainer / simulator / detector prompts.

``LLMClient.chat(messages, parse)`` POSTs {url}/chat/completions with urllib (no extra dependency), a
Bearer key read from the environment variable ``--llm.key_env`` when it is set. 429, 5xx, timeouts and
refused connections are retried after ``backoff * 2**i`` seconds; any other 4xx stops the run (a wrong
URL, model or key will not get better). Every HTTP attempt counts against ``--llm.max_requests``; at the
cap ``BudgetExhausted`` is raised and nothing more is sent. An answer that ``parse`` accepts is stored
in the feature database's ``llm_cache`` under sha256(model, messages, temperature), committed at once,
so a killed run asks nothing twice; an answer ``parse`` rejects (``MalformedAnswer``) is not cached.

Answer formats (asked for in the prompts, parsed leniently):
- explain: a line ``EXPLANATION: <text>`` (or a single non-empty line);
- simulate: one line per numbered token, ``<index>: <0-10>``; every index must be present;
- detect: the numbers of the contexts that fire, comma-separated, or ``NONE``;
- fuzz: the same, for the texts whose <<highlights>> fit the explanation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from saeforge.config import F, UserError, check
from saeforge.viewer.explain import (
    Context,
    balanced_accuracy,
    cache_answers,
    cached_answers,
    detection_score,
    simulation_score,
)

T = TypeVar("T")


@dataclass
class LLMConfig:
    url: str = F("", "Base URL of an OpenAI-compatible API; requests go to {url}/chat/completions.")
    model: str = F("", "Model name sent with every request.")
    key_env: str = F("OPENAI_API_KEY", "Environment variable holding the API key (unset: no Authorization header).")
    max_requests: int = F(1000, "Budget: HTTP requests this run may send, retries included (cached answers are free).")
    concurrency: int = F(4, "Features explained at once (threads).")
    retries: int = F(4, "Retries of a request after 429, 5xx, a timeout or a refused connection.")
    backoff: float = F(1.0, "Seconds before the first retry, doubled at each further one.")
    timeout: float = F(60.0, "Seconds to wait for one answer.")
    temperature: float = F(0.0, "Sampling temperature sent with every request.")

    def __post_init__(self) -> None:
        check(self.max_requests >= 0, "llm.max_requests must be >= 0")
        check(self.concurrency > 0, "llm.concurrency must be positive")
        check(
            self.retries >= 0 and self.backoff >= 0 and self.timeout > 0,
            "llm.retries/backoff must be >= 0, timeout > 0",
        )


class LLMError(UserError, RuntimeError):
    """The API refused a request in a way a retry will not fix (a wrong URL, model or key)."""


class BudgetExhausted(Exception):
    """--llm.max_requests requests were sent; the run stops and a rerun continues from the cache."""


class MalformedAnswer(Exception):
    """An answer that does not follow the asked format, or a request that failed after every retry."""


class LLMClient:
    def __init__(self, cfg: LLMConfig, con: sqlite3.Connection):
        if not cfg.url or not cfg.model:
            raise LLMError("the llm explainer needs --llm.url (e.g. http://127.0.0.1:8080/v1) and --llm.model")
        self.cfg = cfg
        self.name = f"llm:{cfg.model}"  # the explainer id: another model is another explainer
        self.con = con  # opened with check_same_thread=False; every use holds self.lock
        self.lock = threading.Lock()
        self.sent = 0
        self.key = os.environ.get(cfg.key_env, "")

    def _key(self, messages: Sequence[dict]) -> str:
        blob = json.dumps([self.cfg.model, list(messages), self.cfg.temperature], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def chat(self, messages: Sequence[dict], parse: Callable[[str], T]) -> T:
        key = self._key(messages)
        with self.lock:
            cached = cached_answers(self.con, [key])[0]
        if cached is not None:
            return parse(cached)
        answer = self._post(messages)
        value = parse(answer)  # MalformedAnswer propagates and the answer stays uncached
        with self.lock:
            cache_answers(self.con, [(key, answer)])
        return value

    def _post(self, messages: Sequence[dict]) -> str:
        body = json.dumps({"model": self.cfg.model, "messages": list(messages), "temperature": self.cfg.temperature})
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        url = self.cfg.url.rstrip("/") + "/chat/completions"
        last = ""
        for attempt in range(self.cfg.retries + 1):
            with self.lock:
                if self.sent >= self.cfg.max_requests:
                    raise BudgetExhausted(f"sent --llm.max_requests={self.cfg.max_requests} requests")
                self.sent += 1
            if attempt:
                time.sleep(self.cfg.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, body.encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as r:
                    return _content(r.read())
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise LLMError(f"{url} answered HTTP {e.code}: check --llm.url, --llm.model and the key") from e
                last = f"HTTP {e.code}"
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
        raise MalformedAnswer(f"no answer after {self.cfg.retries + 1} attempts (last: {last})")


def _content(raw: bytes) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise MalformedAnswer(f"not a chat-completions answer: {raw[:200]!r}") from e
    if not isinstance(content, str):
        raise MalformedAnswer(f"message content is {type(content).__name__}, not text")
    return content


# ---- prompts and parsers ------------------------------------------------------------------
SYSTEM = "You study features of a neural network that read text. Answer exactly in the format asked."


def _marked(ctx: Context) -> str:
    """A context with each firing token as <<token>>, followed by the firing tokens with activations 0-10."""
    top = max(ctx.acts, default=0.0) or 1.0
    text = "".join(f"<<{t}>>" if a > 0 else t for t, a in zip(ctx.tokens, ctx.acts))
    acts = ", ".join(f"{json.dumps(t)} {round(10 * a / top)}" for t, a in zip(ctx.tokens, ctx.acts) if a > 0)
    return f"{text}\nfiring tokens: {acts}"


def explain_messages(contexts: Sequence[Context]) -> list[dict]:
    shown = "\n\n".join(f"Example {i + 1}:\n{_marked(c)}" for i, c in enumerate(contexts))
    ask = (
        "Tokens where the feature fires are marked <<like this>>. Say in a short phrase what the feature "
        "detects. Reply with one line: EXPLANATION: <phrase>"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{shown}\n\n{ask}"}]


def parse_explanation(answer: str) -> str:
    lines = [l.strip() for l in answer.strip().splitlines() if l.strip()]
    tagged = [l.split(":", 1)[1].strip() for l in lines if l.upper().startswith("EXPLANATION:")]
    text = tagged[0] if tagged else (lines[0] if len(lines) == 1 else "")
    if not text or len(text) > 500:
        raise MalformedAnswer(f"no EXPLANATION line in {answer[:200]!r}")
    return text


def simulate_messages(explanation: str, ctx: Context) -> list[dict]:
    listing = "\n".join(f"{i}\t{json.dumps(t)}" for i, t in enumerate(ctx.tokens))
    ask = (
        f"A feature is explained as: {explanation}\nFor each numbered token below, predict the feature's "
        "activation from 0 (none) to 10 (strongest). Reply with one line per token, `<index>: <value>`, "
        f"for every index from 0 to {len(ctx.tokens) - 1}.\n\n{listing}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]


_PAIR = re.compile(r"^\s*(\d+)\s*[:=\t,]\s*(-?\d+(?:\.\d+)?)\s*$")


def parse_simulation(n: int) -> Callable[[str], list[float]]:
    def parse(answer: str) -> list[float]:
        got: dict[int, float] = {}
        for line in answer.splitlines():
            m = _PAIR.match(line)
            if m and int(m.group(1)) < n:
                got[int(m.group(1))] = min(10.0, max(0.0, float(m.group(2))))
        if len(got) != n:
            raise MalformedAnswer(f"predictions for {len(got)} of {n} tokens in {answer[:200]!r}")
        return [got[i] for i in range(n)]

    return parse


def detect_messages(explanation: str, contexts: Sequence[Context]) -> list[dict]:
    # each text as a JSON string: newlines inside a context must not break the numbered list
    listing = "\n".join(f"{i + 1}. {json.dumps(''.join(c.tokens))}" for i, c in enumerate(contexts))
    ask = (
        f"A feature is explained as: {explanation}\nWhich of these texts (JSON strings) contain a token where it fires? "
        f"Reply with their numbers, comma-separated, or NONE.\n\n{listing}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]


def parse_detection(n: int) -> Callable[[str], list[bool]]:
    def parse(answer: str) -> list[bool]:
        text = answer.strip()
        if text.upper().rstrip(".") == "NONE":
            return [False] * n
        if not re.fullmatch(r"[\d,\s]+", text):
            raise MalformedAnswer(f"expected numbers or NONE, got {answer[:200]!r}")
        picked = {int(x) for x in re.findall(r"\d+", text)}
        if not picked or min(picked) < 1 or max(picked) > n:
            raise MalformedAnswer(f"context numbers must be within 1..{n}: {answer[:200]!r}")
        return [i + 1 in picked for i in range(n)]

    return parse


def fuzz_items(held: Sequence[Context], seed: int) -> list[tuple[str, bool]]:
    """(highlighted text, highlights correct?) pairs, shuffled: each firing held-out context once with its
    firing tokens marked, once with as many marks on tokens that do not fire (when it has enough of them)."""
    rng = random.Random(seed)
    items = []
    for c in held:
        on = [i for i, a in enumerate(c.acts) if a > 0]
        off = [i for i, a in enumerate(c.acts) if a <= 0]
        if not on:
            continue
        items.append((_highlight(c.tokens, set(on)), True))
        if len(off) >= len(on):
            items.append((_highlight(c.tokens, set(rng.sample(off, len(on)))), False))
    rng.shuffle(items)
    return items


def _highlight(tokens: Sequence[str], marked: set[int]) -> str:
    return "".join(f"<<{t}>>" if i in marked else t for i, t in enumerate(tokens))


def fuzz_messages(explanation: str, texts: Sequence[str]) -> list[dict]:
    listing = "\n".join(f"{i + 1}. {json.dumps(t)}" for i, t in enumerate(texts))
    ask = (
        f"A feature is explained as: {explanation}\nIn each text below (JSON strings) some tokens are marked "
        "<<like this>>. Which texts have their marks exactly on tokens the explanation describes? Reply with "
        f"their numbers, comma-separated, or NONE.\n\n{listing}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]


def llm_feature(client: LLMClient, explain_ctx: list[Context], held: list[Context], seed: int) -> tuple[str, dict]:
    """(explanation, {simulation, detection, fuzzing}) for one feature through the LLM: one explain request,
    then ``llm_scores``."""
    text = client.chat(explain_messages([c for c in explain_ctx if c.fires]), parse_explanation)
    return text, llm_scores(client, text, held, seed)


def llm_scores(client: LLMClient, text: str, held: list[Context], seed: int) -> dict[str, Any]:
    """{simulation, detection, fuzzing} of explanation ``text`` on the held-out contexts: one simulate request
    per context, one detect and one fuzz request. Detection contexts and fuzzing items are shuffled with
    ``seed`` so the firing / correct ones are not all first."""
    preds = [client.chat(simulate_messages(text, c), parse_simulation(len(c.tokens))) for c in held]
    order = list(range(len(held)))
    random.Random(seed).shuffle(order)
    shuffled = [held[i] for i in order]
    said = client.chat(detect_messages(text, shuffled), parse_detection(len(shuffled)))
    items = fuzz_items(held, seed)
    fits = client.chat(fuzz_messages(text, [t for t, _ in items]), parse_detection(len(items))) if items else []
    return {
        "simulation": simulation_score(preds, held),
        "detection": detection_score(said, shuffled),
        "fuzzing": balanced_accuracy([ok for _, ok in items], fits) if items else None,
    }
