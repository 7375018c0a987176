"""SAE folders on the Hugging Face Hub: ``hf://OWNER/REPO[/PATH][@REVISION]`` and SAELens releases.

``local_sae_dir(spec)`` turns anything that names an SAE folder into a local folder:

- a plain path is returned as it is (nothing is checked here; the loaders say what is missing);
- ``hf://OWNER/REPO[/PATH][@REVISION]`` is fetched with ``huggingface_hub.snapshot_download`` into the
  HF cache (``HF_HUB_CACHE``, ``HF_HOME``), downloading only the SAE files of PATH (``SAE_FILES``: the
  SAELens, sparsify and dictionary_learning layouts and eval.json), never the rest of the repo;
  ``HF_HUB_OFFLINE=1`` reads the cache only;
- ``saelens://RELEASE/SAE_ID`` looks the release up in SAELens's pretrained registry (sae_lens must be
  importable; saeforge does not depend on it) and fetches that repo and path as above.

The returned folder lies in the HF cache, which is shared and not ours to write: ``output_dir(spec)``
names the local folder (``hf/OWNER/REPO[/PATH]`` under the working directory) where commands put what
they would otherwise write into the SAE folder (eval.json, report.html, features.db).

Hub failures become ``HubError`` (a UserError, so the CLI prints one line, exit 2) saying what to do.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from saeforge.config import UserError

HF_SCHEME = "hf://"
SAELENS_SCHEME = "saelens://"

# what an SAE folder may hold, in any layout saeforge reads (formats.py, interop.py), plus its eval
SAE_FILES = (
    "cfg.json",
    "sae_weights.safetensors",
    "sparsity.safetensors",
    "eval.json",
    "sae.safetensors",
    "ae.pt",
    "config.json",
)
# files whose presence makes a folder an SAE folder (sparsity and eval.json alone do not)
_MARKERS = ("cfg.json", "sae.safetensors", "ae.pt")
# the weights of each layout (SAELens, sparsify, dictionary_learning): one must be there
_WEIGHTS = ("sae_weights.safetensors", "sae.safetensors", "ae.pt")


class HubError(UserError, OSError):
    """An SAE on the Hub that cannot be had: a wrong repo, revision or path, or no network and no cached copy."""


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf://OWNER/REPO[/PATH][@REVISION]``; ``path`` is "" for the repo's root."""

    repo_id: str
    path: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo_id}{'/' + self.path if self.path else ''}{rev}"


_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_remote(spec: str | Path) -> bool:
    """True for an ``hf://`` or ``saelens://`` spec (a Path never is one)."""
    return isinstance(spec, str) and spec.startswith((HF_SCHEME, SAELENS_SCHEME))


def parse_hf(spec: str) -> HubSpec:
    """``hf://OWNER/REPO[/PATH][@REVISION]`` -> HubSpec; a malformed spec raises HubError showing the form."""
    form = "expected hf://OWNER/REPO[/PATH][@REVISION], e.g. hf://me/my-saes/blocks.3.hook_resid_post@main"
    if not spec.startswith(HF_SCHEME):
        raise HubError(f"{spec!r} is not an hf:// spec; {form}")
    rest, revision = spec[len(HF_SCHEME) :], None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise HubError(f"{spec!r}: empty revision after '@'; {form}")
    parts = [p for p in rest.strip("/").split("/") if p]
    if len(parts) < 2 or not all(_PART.match(p) for p in parts[:2]):
        raise HubError(f"{spec!r}: no OWNER/REPO; {form}")
    if any(p in (".", "..") for p in parts[2:]):
        raise HubError(f"{spec!r}: '.' and '..' are not allowed in the path inside the repo; {form}")
    return HubSpec("/".join(parts[:2]), "/".join(parts[2:]), revision)


def saelens_release(spec: str) -> HubSpec:
    """``saelens://RELEASE/SAE_ID`` -> the HubSpec of that SAE, from SAELens's pretrained registry."""
    body = spec[len(SAELENS_SCHEME) :] if spec.startswith(SAELENS_SCHEME) else spec
    release, sep, sae_id = body.partition("/")
    if not release or not sep or not sae_id:
        raise HubError(f"{spec!r}: expected saelens://RELEASE/SAE_ID (SAE_ID as SAELens names it)")
    directory = _saelens_directory()
    if release not in directory:
        near = sorted(r for r in directory if release.split("-")[0] in r)[:10]
        raise HubError(f"SAELens has no release {release!r}; similar releases: {near or 'none'}")
    lookup = directory[release]
    saes_map = dict(getattr(lookup, "saes_map", {}) or {})
    if sae_id not in saes_map:
        ids = sorted(saes_map)
        raise HubError(
            f"release {release!r} has no SAE {sae_id!r}; it has {len(ids)}: {ids[:10]}{' ...' if len(ids) > 10 else ''}"
        )
    return HubSpec(str(lookup.repo_id), str(saes_map[sae_id]).strip("/"), None)


def _saelens_directory() -> dict:
    """SAELens's release name -> PretrainedSAELookup (repo_id, saes_map), wherever this version keeps it."""
    for module in ("sae_lens.loading.pretrained_saes_directory", "sae_lens.toolkit.pretrained_saes_directory"):
        try:
            mod = __import__(module, fromlist=["get_pretrained_saes_directory"])
        except ImportError:
            continue
        return mod.get_pretrained_saes_directory()
    raise HubError(
        "saelens:// names a release in SAELens's registry, and sae_lens is not importable here: "
        "install sae-lens (pip install sae-lens) to load releases by name, or pass hf://REPO_ID/PATH "
        "(the repo and folder the release points at)"
    )


def hub_spec(spec: str) -> HubSpec:
    """The HubSpec of an ``hf://`` or ``saelens://`` spec."""
    return saelens_release(spec) if spec.startswith(SAELENS_SCHEME) else parse_hf(spec)


def local_sae_dir(spec: str | Path) -> Path:
    """A local folder for ``spec``: a plain path as is; a Hub spec downloaded (or found in the HF cache)."""
    if not is_remote(spec):
        return Path(spec)
    return _download(hub_spec(str(spec)))


def output_dir(spec: str | Path) -> Path:
    """Where to write what belongs beside the SAE: the folder itself, or ``hf/OWNER/REPO[/PATH][@REV]``
    under the working directory for a Hub spec (the HF cache is shared, and its files are links into blobs)."""
    if not is_remote(spec):
        return Path(spec)
    h = hub_spec(str(spec))
    out = Path("hf", *h.repo_id.split("/"), *([h.path] if h.path else []))
    return out.with_name(f"{out.name}@{h.revision}") if h.revision else out


@functools.lru_cache(maxsize=64)
def _download(h: HubSpec) -> Path:
    """snapshot_download of the SAE files of ``h``; cached per process so one command asks the Hub once."""
    from huggingface_hub import snapshot_download

    prefix = f"{h.path}/" if h.path else ""
    try:
        root = Path(
            snapshot_download(h.repo_id, revision=h.revision, allow_patterns=[prefix + name for name in SAE_FILES])
        )
    except Exception as e:
        raise _hub_error(e, h) from None
    folder = root / h.path if h.path else root
    if not any((folder / name).is_file() for name in _MARKERS):
        raise HubError(
            f"{h}: no SAE files at {h.path or 'the repo root'!r} of {h.repo_id} (looked for "
            f"{', '.join(_MARKERS)}); check the path inside the repo (the folder holding cfg.json)"
            + ("" if _online() else ", or, offline, that this path was downloaded before")
        )
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise HubError(
            f"{h}: {h.path or 'the repo root'!r} has cfg.json but no weights file ({', '.join(_WEIGHTS)}); the "
            "folder on the Hub is incomplete: push the SAE again (saeforge push) or pick the folder that has them"
        )
    return folder


def _online() -> bool:
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE  # what huggingface_hub's is_offline_mode() reads


def _hub_error(e: Exception, h: HubSpec) -> Exception:
    """The HubError that says what to do about a huggingface_hub exception (others pass through: bugs)."""
    from huggingface_hub import errors

    rev = h.revision or "main"
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(
            f"{h}: {h.repo_id} has no revision {rev!r}; pass an existing branch, tag or commit after '@' "
            "(or leave it out for main)"
        )
    if isinstance(e, errors.GatedRepoError):
        return HubError(
            f"{h}: {h.repo_id} is gated; accept its terms on the Hub and log in (hf auth login or HF_TOKEN)"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return HubError(
            f"{h}: repository {h.repo_id} not found (or private without a token); check OWNER/REPO, "
            "or log in (hf auth login or HF_TOKEN) for a private repo"
        )
    if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):  # huggingface_hub >= 1.x only
        return HubError(
            f"{h}: the cached copy is incomplete and the Hub cannot be reached; connect and run again to finish it"
        )
    if isinstance(e, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        if not _online():
            return HubError(
                f"{h}: not in the HF cache and HF_HUB_OFFLINE=1 forbids downloading; set HF_HUB_OFFLINE=0 "
                f"(with a network), or download it once where there is one (the revision {rev!r} must be cached)"
            )
        return HubError(
            f"{h}: the Hub cannot be reached and no cached copy of revision {rev!r} exists; check the network "
            "(and HF_ENDPOINT), or download it once where there is one"
        )
    if isinstance(e, errors.EntryNotFoundError):
        return HubError(f"{h}: a file is missing from the repo; check the path inside the repo")
    if isinstance(e, errors.HfHubHTTPError):
        return HubError(f"{h}: the Hub answered {e.__class__.__name__}: {str(e).splitlines()[0]}; try again later")
    return e
