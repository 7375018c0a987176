"""Helpers of the explanation tests: a feature database whose latents are exact Python-syntax properties,
and a loopback server that speaks the OpenAI chat-completions protocol with scripted answers."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import threading
import time
import tokenize
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from saeforge.viewer import db

NAMES = "alpha beta gamma delta omega sigma kappa theta zeta lambda_ rho tau phi chi psi eta iota nu xi mu".split()
WORDS = "hello world spam eggs foo bar baz qux".split()
WINDOW, LEFT, RIGHT, TOP_K, PER_Q = 24, 8, 3, 8, 4
FEATURES = ("def name", "string literal", "number", "return")


def python_source(n_funcs: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_funcs):
        name = f"{rng.choice(NAMES)}_{i}"
        s = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
        # strings in one function of 6: a sparse latent whose kept contexts cover every window it fires in,
        # so the negatives (other features' windows, taken as 0) are truly 0 for it
        show = f'    print("{s}")\n' if i % 6 == 0 else ""
        out.append(f"def {name}(x, y):\n    z = x * {rng.randint(2, 99)} + y\n{show}    return z\n\n")
    return "".join(out)


def lm_tokens(source: str) -> tuple[list[str], dict[str, list[float]]]:
    """Token texts (a Python token with the whitespace before it, like a BPE ' def') and, per property of
    FEATURES, its exact 0/1 latent from Python's tokenize."""
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    starts = [0] + [len(line) for line in source.splitlines(keepends=True)]
    for i in range(1, len(starts)):
        starts[i] += starts[i - 1]
    texts, acts = [], {k: [] for k in FEATURES}
    last, prev = 0, None
    for t in toks:
        if t.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER) or not t.string:
            continue
        end = starts[t.end[0] - 1] + t.end[1]
        texts.append(source[last:end])
        last = end
        acts["def name"].append(1.0 if t.type == tokenize.NAME and prev == "def" else 0.0)
        acts["string literal"].append(1.0 if t.type == tokenize.STRING else 0.0)
        acts["number"].append(1.0 if t.type == tokenize.NUMBER else 0.0)
        acts["return"].append(1.0 if t.string == "return" else 0.0)
        prev = t.string
    return texts, acts


def build_db(path: Path, source: str | None = None) -> Path:
    """A complete feature database over windows of the source, kept as `saeforge index` keeps contexts:
    the TOP_K windows by maximum (ties: earlier first), then a sample of other firing windows as quantiles."""
    texts, acts = lm_tokens(source or python_source())
    vocab = sorted(set(texts))
    ids = [vocab.index(t) for t in texts]
    n_win = len(ids) // WINDOW
    con = db.create(path)
    db.write_meta(
        con,
        {
            "format_version": db.FORMAT_VERSION,
            "model": "toy",
            "model_id": "toy",
            "sae_id": "py",
            "sae_dir": str(path.parent),
            "hook": "blocks.0.hook_resid_post",
            "architecture": "topk",
            "d_in": 8,
            "d_sae": len(FEATURES),
            "corpus": "python",
            "part": "train",
            "context_size": WINDOW,
            "n_tokens": n_win * WINDOW,
            "n_windows": n_win,
            "logit_lens": False,
        },
    )
    db.insert(con, "vocab", enumerate(vocab))
    feats, ctxs = [], []
    for f, name in enumerate(FEATURES):
        a = acts[name][: n_win * WINDOW]
        fire = sum(v > 0 for v in a)
        feats.append((f, fire, fire / len(a), max(a), 1.0, 1.0, json.dumps([0, fire])))
        firing = [w for w in range(n_win) if max(a[w * WINDOW : (w + 1) * WINDOW]) > 0]
        for kind, chosen in (("top", firing[:TOP_K]), ("quantile", firing[TOP_K : TOP_K + PER_Q])):
            for rank, w in enumerate(chosen):
                wa = a[w * WINDOW : (w + 1) * WINDOW]
                p = wa.index(max(wa))
                lo, hi = max(0, p - LEFT), min(WINDOW, p + RIGHT + 1)
                t = ids[w * WINDOW + lo : w * WINDOW + hi]
                interval = -1 if kind == "top" else rank * 2 // PER_Q
                ctxs.append(
                    (f, kind, rank, interval, w, wa[p], p - lo, t[p - lo], json.dumps(t), json.dumps(wa[lo:hi]))
                )
    db.insert(con, "features", feats)
    db.insert(con, "contexts", ctxs)
    db.finish(con)
    return path


# ---- a scripted OpenAI-compatible server ---------------------------------------------------
def scripted_llm(messages: list[dict]) -> str:
    """A stand-in for a competent LLM, by rules on the prompt: explains "string literals" or "numbers",
    simulates either explanation token by token, detects contexts that hold a quote / a digit."""
    user = messages[-1]["content"]
    if "EXPLANATION:" in user:
        marked = re.findall(r"<<(.*?)>>", user.rsplit("\n\n", 1)[0], re.S)  # not the instruction's example
        quoted = marked and all(m.strip()[:1] in ('"', "'") for m in marked)
        return "EXPLANATION: string literals" if quoted else "EXPLANATION: numbers"
    rule = (lambda s: s.strip()[:1] in ('"', "'")) if "string literals" in user else (lambda s: s.strip().isdigit())
    if "predict the feature's" in user:
        lines = [l.split("\t", 1) for l in user.split("\n\n", 1)[1].splitlines()]
        return "\n".join(f"{i}: {10 if rule(json.loads(t)) else 0}" for i, t in lines)
    if "some tokens are marked" in user:  # fuzzing: are all the marks on tokens the explanation describes?
        fits = []
        for line in user.split("\n\n", 1)[1].splitlines():
            num, text = line.split(". ", 1)
            if all(rule(m) for m in re.findall(r"<<(.*?)>>", json.loads(text), re.S)):
                fits.append(num)
        return ", ".join(fits) or "NONE"
    hits = []
    for line in user.split("\n\n", 1)[1].splitlines():
        num, text = line.split(". ", 1)
        if (
            "string literals" in user
            and re.search(r"[\"']", json.loads(text))
            or ("numbers" in user and re.search(r"\d", json.loads(text)))
        ):
            hits.append(num)
    return ", ".join(hits) or "NONE"


class ChatServer:
    """http.server on a loopback port. ``script`` is a list of per-request behaviours consumed in order
    (then ``default``): an int status, "malformed", ("sleep", seconds), or None for the scripted answer."""

    def __init__(self, script: list | None = None, default=None):
        self.script, self.default = list(script or []), default
        self.log: list[str] = []  # sha256 of each request's messages, in arrival order
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.log.append(hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest())
                    step = outer.script.pop(0) if outer.script else outer.default
                    outer.auth = self.headers.get("Authorization")
                if isinstance(step, tuple):
                    time.sleep(step[1])
                if isinstance(step, int):
                    self.send_response(step)
                    self.end_headers()
                    return
                content = "I cannot help with that.\nSorry." if step == "malformed" else scripted_llm(body["messages"])
                raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                try:
                    self.wfile.write(raw)
                except OSError:  # the client gave up (a timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
