"""SAE releases by name: (release, sae_id) -> (HF repo id, folder in the repo) -> files in the local cache.

The names are SAELens's (FORMATS.md section 3): its registry ``sae_lens/pretrained_saes.yaml`` maps a
release to a repo and each SAE id to a folder (canonical ids included). The file is read where the
sae-lens package is installed, without importing sae_lens (which imports torch); a registry file can
also be passed (``registry=``) or named by ``$JFIG_SAE_REGISTRY``. An unknown release containing "/"
is a repo id with ``sae_id`` as the folder, as in SAELens. Gemma Scope releases (FORMATS.md section 5)
resolve without the registry: ``gemma-scope-2b-pt-res`` is the repo ``google/gemma-scope-2b-pt-res``
and ``layer_3/width_16k/average_l0_71`` the folder holding ``params.npz``; only their ``-canonical``
ids need the registry. Files are then looked up in the local Hugging Face cache; nothing is downloaded.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from jfig.errors import FormatError
from jfig.models.hub_cache import DEFAULT_REVISION, NotInCacheError, find_snapshot, require_files

REGISTRY_ENV = "JFIG_SAE_REGISTRY"
REGISTRY_FILE = "pretrained_saes.yaml"
SAELENS_FORMAT = "saelens"
GEMMA_SCOPE_FORMAT = "gemma_scope"
# conversion_func in the registry -> the file format jfig reads it as; the others need SAELens.
CONVERSIONS = {None: SAELENS_FORMAT, "sae_lens": SAELENS_FORMAT, "gemma_2": GEMMA_SCOPE_FORMAT}
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
GEMMA_SCOPE_FILE = "params.npz"
GEMMA_SCOPE_RELEASE = re.compile(r"gemma-scope-(?:(?:2b|9b|27b)-pt-(?P<kind>res|mlp|att)|9b-it-(?P<it_kind>res))"
                                 r"(?P<canonical>-canonical)?")
GEMMA_SCOPE_WIDTHS = ("4k", "16k", "32k", "65k", "131k", "262k", "524k", "1m")
GEMMA_SCOPE_ID = re.compile(
    rf"(?:layer_(?P<layer>\d+)|(?P<embedding>embedding))/width_(?:{'|'.join(GEMMA_SCOPE_WIDTHS)})/average_l0_\d+")
GEMMA_SCOPE_SITES = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
                     "att": "blocks.{layer}.attn.hook_z"}


@dataclass(frozen=True)
class SAERelease:
    """One release of a SAELens registry: ``saes`` maps each SAE id to its folder in ``repo_id``."""
    name: str
    repo_id: str
    model: str | None
    conversion_func: str | None
    saes: Mapping[str, str]
    neuronpedia: Mapping[str, str] = field(default_factory=dict)
    norm_scaling_factor: Mapping[str, float] = field(default_factory=dict)
    config_overrides: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class SAESource:
    """Where an SAE of a release lives: ``repo_id`` and ``path`` (the folder in the repo), its file
    ``format`` ("saelens": ``{path}/cfg.json`` + ``{path}/sae_weights.safetensors``; "gemma_scope":
    ``{path}/params.npz``), the ``site`` when the release fixes it (Gemma Scope), and what the
    registry adds: Neuronpedia id, norm scaling factor, config overrides; ``note``: a caveat for
    messages (a Gemma Scope folder the registry does not list)."""
    release: str
    sae_id: str
    repo_id: str
    path: str
    format: str
    site: str | None = None
    neuronpedia_id: str | None = None
    norm_scaling_factor: float | None = None
    config_overrides: Mapping[str, Any] | None = None
    note: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        """The repo paths the loader reads."""
        names = SAELENS_FILES if self.format == SAELENS_FORMAT else (GEMMA_SCOPE_FILE,)
        return tuple(f"{self.path}/{name}" if self.path else name for name in names)


def sae_lens_registry_file() -> Path | None:
    """``sae_lens/pretrained_saes.yaml`` of the installed sae-lens package, found without importing it."""
    spec = importlib.util.find_spec("sae_lens")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / REGISTRY_FILE).is_file():
            return Path(folder) / REGISTRY_FILE
    try:
        found = Path(str(importlib.metadata.distribution("sae-lens").locate_file(f"sae_lens/{REGISTRY_FILE}")))
    except importlib.metadata.PackageNotFoundError:
        return None
    return found if found.is_file() else None


def registry_file(registry: str | os.PathLike | None = None) -> Path | None:
    """The registry to read: ``registry`` if given, else ``$JFIG_SAE_REGISTRY``, else sae-lens's own
    (None when none of these is there)."""
    given = registry if registry is not None else os.environ.get(REGISTRY_ENV) or None
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            source = "registry=" if registry is not None else f"${REGISTRY_ENV}"
            raise FormatError(f"{path}: no such SAE registry file ({source}; expected a SAELens pretrained_saes.yaml)")
        return path
    return sae_lens_registry_file()


def read_registry(path: str | os.PathLike) -> dict[str, SAERelease]:
    """The releases of a SAELens registry file (read once per file version)."""
    path = Path(path)
    stat = path.stat()
    return parse_registry(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def parse_registry(path: str, mtime_ns: int, size: int) -> dict[str, SAERelease]:
    """Parse a registry file; ``mtime_ns`` and ``size`` key the cache."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read the SAE registry ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a mapping of release names to releases, got {type(data).__name__}")
    releases = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or "repo_id" not in entry or not isinstance(entry.get("saes"), list):
            raise FormatError(f"{path}: release {name!r} needs 'repo_id' and a list 'saes'")
        saes, neuronpedia, factors = {}, {}, {}
        for i, sae in enumerate(entry["saes"]):
            if not isinstance(sae, dict) or "id" not in sae or "path" not in sae:
                raise FormatError(f"{path}: release {name!r} entry {i} of 'saes' needs 'id' and 'path'")
            sae_id = str(sae["id"])
            saes[sae_id] = str(sae["path"])
            if sae.get("neuronpedia"):
                neuronpedia[sae_id] = str(sae["neuronpedia"])
            if sae.get("norm_scaling_factor") is not None:
                factors[sae_id] = float(sae["norm_scaling_factor"])
        releases[str(name)] = SAERelease(str(name), str(entry["repo_id"]), entry.get("model"),
                                         entry.get("conversion_func"), saes, neuronpedia, factors,
                                         entry.get("config_overrides"))
    return releases


def gemma_scope_site(repo_or_release: str, path: str) -> str | None:
    """The site of a Gemma Scope SAE (FORMATS.md section 5) from its repo or release name and folder:
    res -> ``blocks.L.hook_resid_post`` (``embedding/...`` -> ``hook_embed``), mlp ->
    ``blocks.L.hook_mlp_out``, att -> ``blocks.L.attn.hook_z``; None if they do not say."""
    match = GEMMA_SCOPE_RELEASE.search(repo_or_release)
    layer = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", path)
    if match is None:
        return None
    kind = match.group("kind") or match.group("it_kind")
    if re.match(r"embedding(?:/|$)", path):
        return "hook_embed" if kind == "res" else None
    return GEMMA_SCOPE_SITES[kind].format(layer=layer.group(1)) if layer else None


def resolve_sae(release: str, sae_id: str, *, registry: str | os.PathLike | None = None) -> SAESource:
    """Where the SAE ``sae_id`` of ``release`` lives: a release of the SAELens registry, a Gemma Scope
    release (by its repo pattern, without the registry), or a repo id ("org/name", ``sae_id`` its
    folder). FormatError says what is unknown and what to do."""
    if not isinstance(release, str) or not release or not isinstance(sae_id, str):
        raise FormatError(f"an SAE release and sae_id are strings, got release={release!r}, sae_id={sae_id!r}")
    file = registry_file(registry)
    releases = read_registry(file) if file is not None else {}
    gemma = GEMMA_SCOPE_RELEASE.fullmatch(release)
    if release in releases:
        entry = releases[release]
        if sae_id in entry.saes or gemma is None or gemma.group("canonical"):
            return registry_source(entry, sae_id, file)
        # A Gemma Scope folder the registry does not list: the repo pattern still names it, and the
        # cache decides; the note goes into a not-in-cache message.
        source = gemma_scope_source(release, sae_id, gemma, file)
        close = difflib.get_close_matches(sae_id, list(entry.saes), n=3)
        note = (f"the SAELens registry {file} does not list {sae_id!r} in {release}"
                + (f"; closest ids there: {', '.join(close)}" if close else ""))
        return replace(source, note=note)
    if gemma is not None:
        return gemma_scope_source(release, sae_id, gemma, file)
    if "/" in release:
        return SAESource(release, sae_id, release, sae_id.strip("/"), SAELENS_FORMAT)
    where = (f"not in the SAELens registry {file}" if file is not None else
             "sae-lens is not installed, so its registry (sae_lens/pretrained_saes.yaml) cannot be read")
    close = difflib.get_close_matches(release, list(releases), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise FormatError(f"unknown SAE release {release!r}{hint}: {where}, and it is neither a Gemma Scope release "
                      f"(gemma-scope-{{2b,9b,27b}}-pt-{{res,mlp,att}}, gemma-scope-9b-it-res) nor a repo id "
                      f"(org/name, sae_id then being the folder); install sae-lens for its registry (jfig reads "
                      f"only its yaml file), pass registry= (or set ${REGISTRY_ENV}) to a pretrained_saes.yaml, or "
                      f"pass the SAE's folder or file to load_sae")


def registry_source(entry: SAERelease, sae_id: str, file: Path) -> SAESource:
    if sae_id not in entry.saes:
        ids = list(entry.saes)
        close = difflib.get_close_matches(sae_id, ids, n=3)
        shown = close or ids[:5]
        raise FormatError(f"SAE id {sae_id!r} is not in release {entry.name!r} of the SAELens registry {file} "
                          f"({len(ids)} ids; {'closest' if close else 'e.g.'}: {', '.join(shown)})")
    path = entry.saes[sae_id].strip("/")
    if entry.conversion_func not in CONVERSIONS:
        raise FormatError(f"release {entry.name!r} ({entry.repo_id}) is stored in a format SAELens converts with "
                          f"{entry.conversion_func!r}, which jfig does not read; convert it with SAELens "
                          f"(SAE.from_pretrained({entry.name!r}, {sae_id!r})[0].save_model(folder)) and pass that "
                          f"folder to load_sae")
    fmt = CONVERSIONS[entry.conversion_func]
    site = gemma_scope_site(entry.repo_id, path) if fmt == GEMMA_SCOPE_FORMAT else None
    return SAESource(entry.name, sae_id, entry.repo_id, path, fmt, site=site,
                     neuronpedia_id=entry.neuronpedia.get(sae_id),
                     norm_scaling_factor=entry.norm_scaling_factor.get(sae_id),
                     config_overrides=dict(entry.config_overrides) if entry.config_overrides else None)


def gemma_scope_source(release: str, sae_id: str, match: re.Match, file: Path | None) -> SAESource:
    repo = "google/" + release.removesuffix("-canonical")
    if match.group("canonical"):
        where = (f"release {release!r} is not in the SAELens registry {file}" if file is not None else
                 "sae-lens is not installed")
        raise FormatError(f"{release} / {sae_id}: canonical ids map to one average_l0_N folder through the SAELens "
                          f"registry, and {where}; install sae-lens (jfig reads only its yaml file), pass registry=, "
                          f"or name the folder itself with release={release.removesuffix('-canonical')!r} and "
                          f"sae_id='layer_L/width_W/average_l0_N'")
    path = sae_id.strip("/")
    ids = GEMMA_SCOPE_ID.fullmatch(path)
    kind = match.group("kind") or match.group("it_kind")
    if ids is None or (ids.group("embedding") and kind != "res"):
        raise FormatError(f"{release}: sae_id {sae_id!r} is not a Gemma Scope SAE folder; expected "
                          f"'layer_L/width_W/average_l0_N' (W one of {', '.join(GEMMA_SCOPE_WIDTHS)})"
                          + (" or 'embedding/width_4k/average_l0_N'" if kind == "res" else ""))
    return SAESource(release, sae_id, repo, path, GEMMA_SCOPE_FORMAT, site=gemma_scope_site(repo, path))


def locate_sae(release: str, sae_id: str, *, revision: str = DEFAULT_REVISION,
               registry: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> tuple[SAESource, Path]:
    """(source, cached file) of an SAE by release: the ``cfg.json`` of a SAELens folder (its weights
    beside it) or the ``params.npz`` of a Gemma Scope SAE, from the local Hugging Face cache at
    ``revision``. A repo-id release holding ``{sae_id}/params.npz`` instead of a SAELens folder is
    read as Gemma Scope. NotInCacheError names the files to fetch and the command."""
    source = resolve_sae(release, sae_id, registry=registry)
    subject = f"SAE {release} / {sae_id} ({source.repo_id}, folder {source.path or '.'})"
    if source.format == SAELENS_FORMAT and source.release == source.repo_id:
        try:
            snapshot = find_snapshot(source.repo_id, revision, cache_dir=cache_dir)
        except NotInCacheError:
            snapshot = None
        npz = f"{source.path}/{GEMMA_SCOPE_FILE}" if source.path else GEMMA_SCOPE_FILE
        if snapshot is not None and not snapshot.file(source.files[0]).is_file() and snapshot.file(npz).is_file():
            source = SAESource(release, sae_id, source.repo_id, source.path, GEMMA_SCOPE_FORMAT,
                               site=gemma_scope_site(source.repo_id, source.path))
            return source, snapshot.file(npz)
    try:
        files = require_files(source.repo_id, source.files, revision, cache_dir=cache_dir, subject=subject)
    except NotInCacheError as err:
        if not source.note:
            raise
        raise NotInCacheError(f"{err} (note: {source.note})", repo_id=err.repo_id, revision=err.revision,
                              folder=err.folder, missing=err.missing, commands=err.commands) from None
    return source, files[source.files[0]]
