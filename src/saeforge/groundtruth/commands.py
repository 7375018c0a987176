"""``saeforge probe SAE_DIR``: ground-truth metrics on held-out Python (see cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse

from saeforge.config import UsageError, add_config_options, overrides
from saeforge.groundtruth.run import DEFAULT_PROBE_TOKENS, DEFAULT_TOKENS, format_groundtruth, probe_saved


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    p = sub.add_parser(
        "probe",
        help="ground truth on held-out Python: coverage, reconstruction, k-sparse probing of syntax properties",
        description="Labels every held-out token of the SAE's corpus with Python syntax properties (tokenize + "
        "ast; docs/groundtruth.md), then scores the SAE's latents against them. Prints a table and writes "
        "SAE_DIR/groundtruth.json (groundtruth.<corpus-slug>.json on another --data.corpus).",
    )
    p.add_argument("sae_dir", help="SAE folder (cfg.json + sae_weights.safetensors)")
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
    result, path = probe_saved(ns.sae_dir, overrides(ns), tokens, probe_tokens, progress=not ns.quiet)
    print(format_groundtruth(result))
    print(f"wrote {path}")
    return 0
