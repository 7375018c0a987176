"""``saeforge eval SAE_DIR``, ``saeforge compare SAE_A SAE_B ...``, ``saeforge report RUN_DIR`` and
``saeforge push SAE_DIR --repo OWNER/REPO`` (see cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import json

from saeforge.config import add_config_options, overrides
from saeforge.evals.compare import compare_saved, format_compare_table, trained_context
from saeforge.evals.curves import TRAINING_PAGE, write_training_report
from saeforge.evals.html import render_compare, write_html
from saeforge.evals.push import push_sae
from saeforge.evals.report import _json_safe, format_table
from saeforge.evals.saved import evaluate_saved, groundtruth_summary
from saeforge.evals.setup import eval_setup_for
from saeforge.io import atomic_write_text


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a saved SAE on held-out text; prints a table, writes eval.json",
        description="On the SAE's own corpus the result is SAE_DIR/eval.json (what training wrote); "
        "on another --data.corpus it is SAE_DIR/eval.<corpus-slug>.json, so each corpus "
        "keeps its own result.",
    )
    e.add_argument(
        "sae_dir",
        help="SAE folder (cfg.json + sae_weights.safetensors), or hf://OWNER/REPO[/PATH][@REVISION] "
        "(results then go to hf/OWNER/REPO/PATH/ here)",
    )
    e.add_argument(
        "--report",
        action="store_true",
        help="also write SAE_DIR/report.html (report.<corpus-slug>.html "
        "on another corpus; beside --out FILE with its stem): a self-contained page with plots",
    )
    e.add_argument("--out", metavar="FILE", help="write the eval JSON here instead of into SAE_DIR")
    e.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="OTHER_SAE_DIR",
        help="score these SAEs on the same tokens and show where this one sits among them",
    )
    add_config_options(e, ["model", "data", "eval"], None)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser(
        "compare",
        help="score several SAEs on the same held-out tokens; table + Pareto plots (HTML)",
        description="The first SAE's run config picks model, corpus and token budgets; every SAE is "
        "scored on the same windows. Pairs on one hook also get MMCS, and pairs of "
        "different widths the stitching split of the wider one.",
    )
    c.add_argument(
        "sae_dirs", nargs="+", metavar="SAE_DIR", help="SAE folders (cfg.json + sae_weights.safetensors) or hf:// specs"
    )
    c.add_argument("--out", default="compare.html", help="HTML file to write; a .json with the numbers goes beside it")
    c.add_argument(
        "--threshold",
        type=float,
        default=0.7,
        help="max decoder cosine at or above which a wider SAE's latent counts as reconstruction-like",
    )
    add_config_options(c, ["model", "data", "eval"], None)
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser(
        "report",
        help="training curves of a run (or of every point of a sweep) from metrics.jsonl: a self-contained HTML page",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="run folder (runs/NAME, holding metrics.jsonl) or sweep folder")
    r.add_argument("--out", default=None, help=f"HTML file to write (default RUN_DIR/{TRAINING_PAGE})")
    r.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "push",
        help="upload an SAE folder (cfg.json, weights, sparsity, eval.json) and a generated model card to the Hub",
        description="One commit to OWNER/REPO (created if missing): the SAE's files and README.md, a card with "
        "the model, hook, architecture, tokens, eval table and how to load it in saeforge and SAELens. "
        "Log in first (hf auth login, or HF_TOKEN).",
    )
    p.add_argument("sae_dir", metavar="SAE_DIR", help="local SAE folder (runs/NAME/sae)")
    p.add_argument("--repo", required=True, metavar="OWNER/REPO", help="model repo to push to")
    p.add_argument("--path", default="", help="folder inside the repo (default: the root); the card goes there too")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its setting)"
    )
    p.set_defaults(func=cmd_push)


def cmd_eval(ns: argparse.Namespace, base: dict) -> int:
    metrics, written = evaluate_saved(
        ns.sae_dir, overrides(ns), progress=not ns.quiet, report=ns.report, compare=ns.compare, out=ns.out
    )
    print(format_table(metrics))
    print("wrote " + " and ".join(map(str, written)))
    return 0


def cmd_compare(ns: argparse.Namespace, base: dict) -> int:
    entries, pairs = compare_saved(ns.sae_dirs, overrides(ns), progress=not ns.quiet, threshold=ns.threshold)
    corpus = eval_setup_for(ns.sae_dirs[0], overrides(ns)).data.corpus
    for (_, m), d in zip(entries, ns.sae_dirs):  # `saeforge probe` results, where it has run
        gt = groundtruth_summary(d, corpus)
        if gt is not None:
            m["groundtruth"] = gt
    print(format_compare_table(entries))
    for p in pairs:
        line = f"MMCS {p['a']} -> {p['b']}: {p['mmcs_a_to_b']:.4f}, back: {p['mmcs_b_to_a']:.4f}"
        if "stitching" in p:
            s = p["stitching"]
            line += (
                f"; {s['wide']}: {s['n_reconstruction']} reconstruction-like / {s['n_novel']} novel latents, "
                f"MSE {s['mse_narrow']:.4g} -> +recon {s['mse_plus_reconstruction']:.4g}, "
                f"+novel {s['mse_plus_novel']:.4g}"
            )
        print(line)
    out = write_html(render_compare(entries, pairs, trained_context(ns.sae_dirs[0])), ns.out)
    numbers = {
        "saes": [
            {"label": n, "dir": str(d), **{k: _json_safe(v) for k, v in m.items() if k != "feature_freq"}}
            for (n, m), d in zip(entries, ns.sae_dirs)
        ],
        "pairs": _json_safe(pairs),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(numbers, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def cmd_push(ns: argparse.Namespace, base: dict) -> int:
    url = push_sae(ns.sae_dir, ns.repo, path=ns.path, revision=ns.revision, private=ns.private)
    spec = f"hf://{ns.repo}{'/' + ns.path.strip('/') if ns.path.strip('/') else ''}"
    print(f"pushed {ns.sae_dir} to {url}; load it with load_sae({spec!r})")
    return 0


def cmd_report(ns: argparse.Namespace, base: dict) -> int:
    print(f"wrote {write_training_report(ns.run_dir, ns.out)}")
    return 0
