"""``saeforge probe DIR ...``: ground-truth metrics on held-out Python (see cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
from pathlib import Path

from saeforge.config import UsageError, add_config_options, overrides
from saeforge.evals.setup import eval_setup_for
from saeforge.groundtruth.folders import expand, write_summary
from saeforge.groundtruth.run import (
    DEFAULT_PROBE_TOKENS,
    DEFAULT_TOKENS,
    format_groundtruth,
    format_summary,
    models_in_turn,
    probe_saved_many,
)


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    p = sub.add_parser(
        "probe",
        help="ground truth on held-out Python: coverage, reconstruction, k-sparse probing of syntax properties",
        description="Labels every held-out token of the SAE's corpus with Python syntax properties (tokenize + "
        "ast; docs/groundtruth.md), then scores the SAE's latents against them. Prints a table and writes "
        "SAE_DIR/groundtruth.json (groundtruth.<corpus-slug>.json on another --data.corpus). A sweep or "
        "transcoders folder probes every SAE in it and also writes groundtruth_summary.json there.",
    )
    p.add_argument(
        "sae_dirs",
        nargs="+",
        metavar="DIR",
        help="SAE or transcoder folders (cfg.json + sae_weights.safetensors), run folders, sweep folders "
        "(`saeforge train --sweep`) or transcoders folders (`saeforge transcoders`); SAEs of one model share "
        "one loaded copy of it and one LM pass",
    )
    p.add_argument(
        "--tokens", type=float, default=DEFAULT_TOKENS, help="labelled held-out tokens to score (default %(default)s)"
    )
    p.add_argument(
        "--probe-tokens",
        type=float,
        default=DEFAULT_PROBE_TOKENS,
        help="of those, about how many (drawn at random) the probes are fitted on (4 windows in 5) and tested on (the fifth) (default %(default)s)",
    )
    add_config_options(p, ["model", "data", "eval"], None)
    p.set_defaults(func=cmd_probe)


def cmd_probe(ns: argparse.Namespace, base: dict) -> int:
    tokens, probe_tokens = int(ns.tokens), int(ns.probe_tokens)
    if tokens < 1 or probe_tokens < 10:
        raise UsageError(f"--tokens {tokens} / --probe-tokens {probe_tokens}: need at least 1 and 10 tokens")
    folders = [expand(d) for d in ns.sae_dirs]  # every argument checked before any work
    sae_dirs = [s for saes, _ in folders for s in saes]
    # SAEs of one model run together: one load, one LM pass per corpus setup (groundtruth/run.py)
    written: dict[int, tuple] = {}
    for lm, idx in models_in_turn([eval_setup_for(d, overrides(ns)) for d in sae_dirs]):
        done = probe_saved_many([sae_dirs[i] for i in idx], overrides(ns), tokens, probe_tokens, not ns.quiet, lm)
        written.update(zip(idx, done))
        del lm  # one model in memory at a time
    for i, sae_dir in enumerate(sae_dirs):
        result, path = written[i]
        if len(sae_dirs) > 1:
            print(f"== {sae_dir} ({result['hook']})")
        print(format_groundtruth(result))
        print(f"wrote {path}")
    if len(sae_dirs) > 1:
        print(format_summary([written[i][0] for i in range(len(sae_dirs))]))
    start = 0
    for (saes, summarise), folder in zip(folders, ns.sae_dirs):
        if summarise:
            rows = [written[start + j] for j in range(len(saes))]
            print(f"wrote {write_summary(Path(folder), rows, tokens, probe_tokens)}")
        start += len(saes)
    return 0
