"""``saeforge push SAE_DIR --repo OWNER/REPO``: an SAE folder and a generated model card to the Hub.

One commit holds cfg.json, sae_weights.safetensors, sparsity.safetensors and eval.json (those the
folder has) and README.md, the card: model, hook, architecture, width, training tokens, the eval table,
and how to load the SAE here (``hf://``) and in SAELens. With ``--path P`` the files go under P/ (several
SAEs in one repo) and so does the card (P/README.md), so one SAE's card never replaces another's; the
Hub shows only the root README.md as the repo's card.

The card lives in evals because its table is the eval table (evals/report.py ``metrics_rows``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saeforge.config import UsageError
from saeforge.evals.report import metrics_rows
from saeforge.saes.formats import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, MissingSAEError, architecture_of, read_cfg
from saeforge.saes.hub import HubError, is_remote

PUSHED_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, "eval.json")
CARD_FILE = "README.md"


def model_card(sae_dir: str | Path, repo_id: str, path: str = "", revision: str | None = None) -> str:
    """The README.md pushed with the SAE: YAML front matter, facts from cfg.json, eval.json's table, load snippets."""
    sae_dir = Path(sae_dir)
    cfg = read_cfg(sae_dir)
    meta = cfg.get("metadata") or {}
    arch = architecture_of(cfg)
    model, hook = meta.get("model_name") or "unknown model", meta.get("hook_name") or "unknown hook"
    spec = f"hf://{repo_id}{'/' + path if path else ''}{'@' + revision if revision else ''}"
    facts = [
        ("model", model),
        ("hook", hook + (f" -> {meta['hook_name_out']} (transcoder)" if meta.get("hook_name_out") else "")),
        ("architecture", f"{arch} (SAELens: {cfg.get('architecture')})"),
        ("d_in x d_sae", f"{cfg.get('d_in')} x {cfg.get('d_sae')}"),
    ]
    if cfg.get("k"):
        facts.append(("k", str(cfg["k"])))
    if meta.get("training_tokens"):
        facts.append(("training tokens", f"{int(meta['training_tokens']):,}"))
    if meta.get("dataset_path"):
        facts.append(("corpus", str(meta["dataset_path"])))
    if meta.get("context_size"):
        facts.append(("context size", str(meta["context_size"])))

    front = ["---", "library_name: saeforge", "tags:", "- saeforge", "- sae_lens", "- sparse-autoencoder"]
    if model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).exists():  # a hub id
        front.append(f"base_model: {model}")
    lines = [*front, "---", "", f"# {arch} SAE for {model} at `{hook}`", ""]
    lines += _table(("", "value"), facts)
    lines += ["", "## Evaluation", ""]
    evaluation = _read_eval(sae_dir)
    if evaluation is None:
        lines.append("No eval.json in the folder: run `saeforge eval SAE_DIR` before pushing to include it.")
    else:
        lines.append(
            "Held-out tokens of the training corpus, from `saeforge eval` (eval.json; metrics in saeforge's docs/evaluation.md)."
        )
        lines += ["", *_table(("metric", "value"), _eval_rows(evaluation))]
    lines += [
        "",
        "## Load it",
        "",
        "saeforge (downloads only this SAE's files into the Hugging Face cache):",
        "",
        "```python",
        "from saeforge.saes.formats import load_sae",
        f'sae = load_sae("{spec}")',
        "```",
        "",
        f"or `saeforge eval {spec}`, `saeforge index {spec}`, `saeforge steer --sae {spec} ...`.",
        "",
        "SAELens (the folder is SAELens v6 layout):",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from sae_lens import SAE",
        f'root = snapshot_download("{repo_id}"{f", revision={revision!r}" if revision else ""}'
        + (f', allow_patterns=["{path}/*"])' if path else ")"),
        f"sae = SAE.load_from_disk({f'root + {chr(34)}/{path}{chr(34)}' if path else 'root'})",
        "```",
        "",
    ]
    return "\n".join(lines)


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {cell(a)} | {cell(b)} |" for a, b in rows)]


def _read_eval(sae_dir: Path) -> dict[str, Any] | None:
    path = sae_dir / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _eval_rows(evaluation: dict[str, Any]) -> list[tuple[str, str]]:
    """The eval table's rows; a metric JSON wrote as null (undefined, e.g. NaN) is left out."""
    try:
        return metrics_rows({k: v for k, v in evaluation.items() if v is not None})
    except (TypeError, KeyError, ValueError):  # a row's formatter needs a value that is null: plain key = value rows
        return [(k, str(v)) for k, v in evaluation.items() if isinstance(v, str | int | float) and v is not None]


def push_sae(
    sae_dir: str | Path,
    repo_id: str,
    path: str = "",
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (and the branch ``revision``), commit the SAE files and the card; returns the
    commit's URL. Authentication is huggingface_hub's (``hf auth login`` or HF_TOKEN)."""
    from huggingface_hub import CommitOperationAdd, HfApi, errors

    if is_remote(sae_dir):
        raise UsageError(f"push takes a local SAE folder, not {sae_dir}; it is on the Hub already")
    sae_dir = Path(sae_dir)
    read_cfg(sae_dir)  # a missing or damaged cfg.json fails here, before anything is created on the Hub
    if not (sae_dir / WEIGHTS_FILE).is_file():
        raise MissingSAEError(f"{sae_dir / WEIGHTS_FILE} is missing: push a folder that `saeforge train` saved")
    path = path.strip("/")
    if any(p in (".", "..") for p in path.split("/")):
        raise UsageError(f"--path {path!r}: '.' and '..' are not allowed; give a folder inside the repo")
    if "/" not in repo_id.strip("/") or repo_id.count("/") != 1:
        raise UsageError(f"--repo {repo_id!r}: expected OWNER/REPO (your user or organisation, then the repo name)")
    prefix = f"{path}/" if path else ""
    ops = [
        CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(sae_dir / name))
        for name in PUSHED_FILES
        if (sae_dir / name).is_file()
    ]
    card = model_card(sae_dir, repo_id, path, revision).encode()
    ops.append(CommitOperationAdd(path_in_repo=prefix + CARD_FILE, path_or_fileobj=card))
    api = HfApi(token=token)
    meta = read_cfg(sae_dir).get("metadata") or {}
    message = (
        f"saeforge push: {architecture_of(read_cfg(sae_dir))} SAE, {meta.get('model_name')} {meta.get('hook_name')}"
    )
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision)
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubError(
                f"the Hub refused to write to {repo_id} ({status}): log in with a write token "
                "(hf auth login, or HF_TOKEN) that may write to that user or organisation"
            ) from None
        raise HubError(f"pushing to {repo_id} failed: {str(e).splitlines()[0]}") from None
    except errors.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE=1 forbids uploads: unset it (or set it to 0) to push") from None
    except Exception as e:
        if _is_connection_error(e):
            raise HubError(f"cannot reach the Hub ({e}); check the network (and HF_ENDPOINT) and push again") from None
        raise
    return str(info.commit_url)


def _is_connection_error(e: Exception) -> bool:
    """A refused or timed-out connection, whichever HTTP library this huggingface_hub uses (httpx or requests)."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "TimeoutException", "ConnectionError", "ConnectTimeout"})
