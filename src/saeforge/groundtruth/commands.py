"""``saeforge probe SAE_DIR``: ground-truth metrics on held-out Python (see cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse

from saeforge.config import UsageError, add_config_options, overrides
from saeforge.evals.setup import eval_setup_for
from saeforge.groundtruth.run import (
    DEFAULT_PROBE_TOKENS,
    DEFAULT_TOKENS,
    format_groundtruth,
    format_summary,
    probe_saved,
)
from saeforge.models import load_model


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    p = sub.add_parser(
        "probe",
        help="ground truth on held-out Python: coverage, reconstruction, k-sparse probing of syntax properties",
        description="Labels every held-out token of the SAE's corpus with Python syntax properties (tokenize + "
        "ast; docs/groundtruth.md), then scores the SAE's latents against them. Prints a table and writes "
        "SAE_DIR/groundtruth.json (groundtruth.<corpus-slug>.json on another --data.corpus).",
    )
    p.add_argument(
        "sae_dirs",
        nargs="+",
        metavar="SAE_DIR",
        help="SAE or transcoder folders (cfg.json + sae_weights.safetensors), e.g. every point of a sweep; "
        "SAEs of one model share one loaded copy of it",
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
    models: dict[tuple, object] = {}
    results = []
    for sae_dir in ns.sae_dirs:
        cfg = eval_setup_for(sae_dir, overrides(ns))
        key = (cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.random_init)
        if key not in models:
            models.clear()  # one model in memory at a time
            models[key] = load_model(
                cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, random_init=cfg.model.random_init
            )
        result, path = probe_saved(sae_dir, overrides(ns), tokens, probe_tokens, progress=not ns.quiet, lm=models[key])
        if len(ns.sae_dirs) > 1:
            print(f"== {sae_dir} ({cfg.model.hook})")
        print(format_groundtruth(result))
        print(f"wrote {path}")
        results.append(result)
    if len(results) > 1:
        print(format_summary(results))
    return 0
