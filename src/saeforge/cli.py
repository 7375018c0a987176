"""The ``saeforge`` command: one subcommand per job, each added by the stage that does it.

Every config field is an option ``--SECTION.FIELD VALUE`` whose help is the field's help text;
a few common ones have short forms (--model, --hook, --arch, --tokens, --corpus, --name).
Values are applied over ``--config FILE`` (JSON, same shape as a run's config.json) or the defaults.
Mistakes the user can fix (``config.UserError``) print one line and exit 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from saeforge.activations.ranks import world_size_from_env
from saeforge.config import SECTION_CLASSES, ConfigError, UserError, add_config_options, merged
from saeforge.models import list_hooks, load_model
from saeforge.saes.base import SAEConfig
from saeforge.saes.registry import config_class, names
from saeforge.training.config import RunConfig

# Each stage adds its own subcommands: ``add_commands(sub, arch)`` adds subparsers with
# ``set_defaults(func=...)``; ``func(ns, base_config_dict) -> exit code``. Listed in --help order.
COMMAND_MODULES = [
    "saeforge.training.commands",  # train, cache
    "saeforge.evals.commands",  # eval, compare, report
    "saeforge.analysis.commands",  # steer, attribute, ...
    "saeforge.groundtruth.commands",  # probe
    "saeforge.circuits.commands",  # transcoders, clt, graph
    "saeforge.circuits.sfc_commands",  # circuit, export-transcoders
    "saeforge.circuits.quality_commands",  # transcoder-eval
    "saeforge.viewer.commands",  # index, serve, export-neuronpedia, explain, map
    "saeforge.toy",  # toy
]


def _architecture(argv: Sequence[str]) -> tuple[str, dict]:
    """Pre-parse --config and --arch so the SAE options of that architecture can be offered."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # else `--sae DIR` reads as --sae.architecture
    pre.add_argument("--config")
    pre.add_argument("--arch", "--sae.architecture", dest="arch")
    ns, _ = pre.parse_known_args(argv)
    if not ns.config:
        return ns.arch or "topk", {}
    try:
        base = json.loads(Path(ns.config).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {ns.config}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {ns.config} is not valid JSON ({e})") from None
    return ns.arch or base.get("sae", {}).get("architecture", "topk"), base


def cmd_hooks(ns: argparse.Namespace, base: dict) -> int:
    lm = load_model(ns.model_name, dtype="float32", device="cpu")
    for name in list_hooks(lm.model):
        print(name)
    return 0


def cmd_config(ns: argparse.Namespace, base: dict) -> int:
    if ns.markdown:
        print(config_markdown())
        return 0
    print(json.dumps(RunConfig.from_dict(merged(base, ns)).to_dict(), indent=2))
    return 0


def config_markdown() -> str:
    """Every config field as a Markdown table (docs/config.md is this output)."""

    def rows(section: str, cls: type, skip: set[str] = frozenset()) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `--{section}.{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
        return out

    lines = ["| option | default | meaning |", "|---|---|---|"]
    for section, cls in SECTION_CLASSES.items():
        lines += rows(section, cls)
    lines += rows("sae", SAEConfig)
    base_fields = {f.name for f in dataclasses.fields(SAEConfig)}
    for arch in names():
        extra = rows("sae", config_class(arch), skip=base_fields)
        if extra:
            lines += [f"| *{arch} only* | | |", *extra]
    return "\n".join(lines)


def build_parser(arch: str = "topk") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saeforge", description="Sparse autoencoders for Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub, arch)

    h = sub.add_parser("hooks", help="list a model's hook points")
    h.add_argument("model_name", metavar="MODEL", help="hub id, local folder, .gguf file or built-in name")
    h.set_defaults(func=cmd_hooks)

    g = sub.add_parser("config", help="print the resolved config as JSON (a starting point for --config)")
    g.add_argument("--config", help="JSON config file")
    g.add_argument("--markdown", action="store_true", help="print every field as a Markdown table instead")
    add_config_options(g, ["model", "data", "activations", "train", "eval", "log"], config_class(arch))
    g.set_defaults(func=cmd_config)

    for sp in sub.choices.values():
        if not any(a.dest == "quiet" for a in sp._actions):
            sp.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        arch, base = _architecture(argv)
        ns = build_parser(arch).parse_args(argv)
        ns.argv = argv  # --nproc re-runs the same command under torchrun
        if getattr(ns, "quiet", False):
            import transformers

            transformers.utils.logging.disable_progress_bar()
        rc = ns.func(ns, base)
    except UserError as e:
        print(f"saeforge: error: {e}", file=sys.stderr)
        return 2
    if world_size_from_env() > 1:
        # A torchrun worker whose work is done and saved: leave without C++ static destructors, where a
        # gloo thread still joinable can abort the process ("terminate called without an active exception",
        # seen once after a finished data-parallel sweep) and turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
