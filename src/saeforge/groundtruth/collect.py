"""One LM pass over the labelled held-out windows, shared by every SAE probed at the same hooks.

``collect`` runs the LM once over the windows of ``groundtruth/windows.py`` (stopping once ``tokens``
labelled tokens are seen), capturing every requested hook in that one forward pass, and keeps per
batch: the kept tokens' activations at each hook (float32, on the CPU), their labels, their window
index (run.py splits by window: even/odd for reconstruction, every fifth for probe testing), and
which rows the probing sample draws. Each SAE's metrics then read these rows instead of rerunning
the LM (and the tokenizer and ``ast`` labelling) once per pass and per SAE.

Memory: tokens x d_model x 4 bytes per hook (50k tokens of a 576-wide residual: 115 MB) plus the
labels; batches stay separate so each SAE encodes exactly the rows it would have encoded batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch

from saeforge.config import EvalSetup
from saeforge.data import excluded_mask, iter_documents, split_documents
from saeforge.groundtruth.labels import NoPythonError
from saeforge.groundtruth.windows import LabelledWindow, WindowStats, labelled_windows
from saeforge.models import capture


@dataclass
class Collected:
    """The labelled rows of one LM pass; ``x[hook][b]`` lines up with ``y[b]``, ``valid[b]``, ``window[b]``."""

    x: dict[str, list[torch.Tensor]]  # hook name -> per batch x_ND (float32, CPU)
    y: list[torch.Tensor] = field(default_factory=list)  # per batch y_NP (bool)
    valid: list[torch.Tensor] = field(default_factory=list)  # per batch valid_NP (bool)
    window: list[torch.Tensor] = field(default_factory=list)  # per batch window index of each row (long)
    pick: list[torch.Tensor] = field(default_factory=list)  # per batch: row drawn into the probing sample
    stats: WindowStats = field(default_factory=WindowStats)
    n_windows: int = 0
    probe_tokens: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(y) for y in self.y)

    def sample(self, hook: str) -> tuple[torch.Tensor, ...]:
        """(x_ND, y_NP, valid_NP, test_N) of the probing sample: the drawn rows in stream order, at most
        ``probe_tokens``; every fifth window tests. Fresh tensors (inference-mode ones refuse autograd)."""
        pick = torch.cat(self.pick)
        x = torch.cat(self.x[hook])[pick][: self.probe_tokens].clone()
        y = torch.cat(self.y)[pick][: self.probe_tokens].clone()
        v = torch.cat(self.valid)[pick][: self.probe_tokens].clone()
        test = (torch.cat(self.window)[pick][: self.probe_tokens] % 5 == 4).clone()
        return x, y, v, test


def _windows(lm, cfg: EvalSetup, tokens: int, stats: WindowStats) -> Iterator[LabelledWindow]:
    docs = split_documents(iter_documents(cfg.data), cfg.data, "heldout")
    seen = 0
    for w in labelled_windows(docs, lm.tokenizer, cfg.data, stats, cfg.model.name):
        if seen >= tokens:
            return
        seen += int(w.valid_TP.any(-1).sum())
        yield w


def collect(lm, hooks: list, cfg: EvalSetup, tokens: int, probe_tokens: int, progress: bool = False) -> Collected:
    """Run the LM once over the labelled held-out windows of ``cfg``'s corpus, capturing every hook of ``hooks``."""
    from tqdm.auto import tqdm

    out = Collected({h.name: [] for h in hooks}, probe_tokens=probe_tokens)
    # a seeded Bernoulli draw spreads the probing sample over the whole budget
    gen = torch.Generator().manual_seed(0)
    rate = min(1.0, 1.1 * probe_tokens / tokens)
    it = _windows(lm, cfg, tokens, out.stats)
    bar = tqdm(desc="groundtruth LM pass", unit="batch", disable=None if progress else True)
    i = 0
    with torch.inference_mode():
        while chunk := list(islice(it, cfg.eval.batch_size)):
            tokens_ST = torch.stack([w.tokens_T for w in chunk])
            y_STP = torch.stack([w.labels_TP for w in chunk])
            v_STP = torch.stack([w.valid_TP for w in chunk])
            keep_ST = v_STP.any(-1) & ~excluded_mask(tokens_ST, lm.tokenizer, cfg.data)
            acts = capture(lm.model, hooks, tokens_ST)
            for h in hooks:
                x_STD = acts[h.name]
                out.x[h.name].append(x_STD[keep_ST.to(x_STD.device)].float().cpu())
            S, T = keep_ST.shape
            window_ST = (i + torch.arange(S))[:, None].expand(S, T)
            draw_ST = torch.rand(keep_ST.shape, generator=gen) < rate
            out.y.append(y_STP[keep_ST])
            out.valid.append(v_STP[keep_ST])
            out.window.append(window_ST[keep_ST])
            out.pick.append(draw_ST[keep_ST])
            i += S
            out.n_windows = i
            bar.update()
    bar.close()
    if out.stats.n_code == 0 or out.n_tokens == 0:
        s = out.stats
        raise NoPythonError(
            f"no held-out document of {cfg.data.corpus!r} parses as Python ({s.n_prose} prose, "
            f"{s.n_unparseable} unparseable, e.g. {s.unparseable_ids[:3]}). Pass a corpus of Python "
            "source: --data.corpus python-stdlib, or a folder of .py files (or .jsonl, one module per line)."
        )
    return out
