"""``saeforge transcoder-eval``: per-layer EV / L0 and the full replacement model's CE / KL of a transcoder set.

The corpus split and budgets: a per-layer set's first transcoder carries its run config (as for `saeforge eval`);
a CLT folder records its data section in cfg.json; circuit-tracer folders (config.yaml) and CLT folders written
before that take the DataConfig defaults unless --data.* says otherwise. --data.* / --eval.* override either.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saeforge.config import EvalSetup, UsageError, add_config_options, overrides


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    q = sub.add_parser(
        "transcoder-eval",
        help="a transcoder set as a whole: per-layer EV and L0, CE/KL/CE score of the full replacement model",
        description="Every MLP output replaced at once by its transcoder's prediction (no error terms) on held-out "
        "text; writes DIR/replacement.json. See docs/circuits.md.",
    )
    q.add_argument(
        "--transcoders",
        required=True,
        metavar="DIR",
        help="a folder made by `saeforge transcoders` or `saeforge clt`, or a circuit-tracer folder (config.yaml)",
    )
    q.add_argument(
        "--out", help="JSON file to write (default: DIR/replacement.json); never overwritten without --force"
    )
    q.add_argument("--force", action="store_true", help="replace an existing result file")
    q.add_argument(
        "--no-layers-alone",
        dest="layers_alone",
        action="store_false",
        help="skip the per-layer CE/KL with one layer replaced at a time (saves 2 forwards per layer and batch)",
    )
    q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    q.add_argument("--dtype", default="float32", help="dtype of the LM (default: float32)")
    add_config_options(q, ["data", "eval"], None)
    q.set_defaults(func=cmd_transcoder_eval)


def cmd_transcoder_eval(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.circuits.formats import load_transcoder_folder
    from saeforge.circuits.quality import RESULT, format_quality, transcoder_quality
    from saeforge.io import atomic_write_text
    from saeforge.models import load_model

    out = Path(ns.out) if ns.out else Path(ns.transcoders) / RESULT
    if out.exists() and not ns.force:
        raise UsageError(f"{out} exists: give another --out, or --force to replace it")
    transcoders, model_name, data = load_transcoder_folder(ns.transcoders)
    given = overrides(ns)
    setup = EvalSetup.from_dict(
        {
            "model": {"name": model_name},
            "data": {**(data or {}), **given.get("data", {})},
            "eval": given.get("eval", {}),
        }
    )
    lm = load_model(model_name, dtype=ns.dtype, device=ns.device)
    result = transcoder_quality(lm, transcoders, setup.data, setup.eval, layers_alone=ns.layers_alone)
    result["transcoders"] = str(ns.transcoders)
    print(format_quality(result))
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")
    return 0
