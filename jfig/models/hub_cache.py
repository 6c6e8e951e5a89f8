"""The local Hugging Face hub cache, read offline (FORMATS.md section 4); nothing is downloaded.

The lookup is huggingface_hub's ``try_to_load_from_cache``: the cache folder from ``HF_HUB_CACHE``,
else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, with ``HF_HOME`` from ``HF_HOME``, else
``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``; the repo folder
``models--{org}--{name}``; ``refs/<revision>`` holding a commit sha (a revision that is itself a
sha names its snapshot directly); files at ``snapshots/<sha>/<path>``, relative links into
``blobs/`` or plain copies. When something is missing, :class:`NotInCacheError` says which files
to fetch, the command that fetches them on a machine with network access, and where they go.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError

CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
DEFAULT_REVISION = "main"
# huggingface_hub's validate_repo_id: "name" or "org/name", word characters, "-" and ".".
REPO_ID = re.compile(r"(?:[\w\-.]+/)?[\w\-.]+")
INDEX_FILE = "model.safetensors.index.json"
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHTS_PATTERN = "*.safetensors"


class NotInCacheError(FormatError):
    """Files a name needs are not in the local Hugging Face cache.

    ``repo_id`` and ``revision`` name what was looked up, ``folder`` is where (the repo folder or
    snapshot), ``missing`` the repo paths that are absent (empty when the whole repo or revision
    is), and ``commands`` the ``hf download`` commands that fetch them."""

    def __init__(self, message: str, *, repo_id: str, revision: str, folder: Path,
                 missing: Sequence[str] = (), commands: Sequence[str] = ()):
        super().__init__(message)
        self.repo_id, self.revision, self.folder = repo_id, revision, Path(folder)
        self.missing, self.commands = tuple(missing), tuple(commands)


@dataclass(frozen=True)
class Snapshot:
    """One revision of a repo in the cache: ``folder`` is ``snapshots/<commit>``."""
    repo_id: str
    revision: str
    commit: str
    repo_folder: Path
    folder: Path

    def file(self, path: str) -> Path:
        return self.folder / path


def hub_cache_dir() -> Path:
    """The hub cache folder, resolved from the environment as huggingface_hub does."""
    xdg = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = os.getenv("HF_HOME", os.path.join(xdg, "huggingface"))
    home = os.path.expandvars(os.path.expanduser(home))
    hub = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def is_repo_id(name: str) -> bool:
    """Whether ``name`` can be a Hugging Face repo id (``name`` or ``org/name``)."""
    return (isinstance(name, str) and len(name) <= 96 and bool(REPO_ID.fullmatch(name)) and "--" not in name
            and ".." not in name and not name.endswith(".git") and not name.startswith((".", "-"))
            and not name.endswith((".", "-")))


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """``models--org--name``: the repo's folder in the cache."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def download_command(repo_id: str, files: Iterable[str] = (), *, revision: str = DEFAULT_REVISION,
                     include: str | None = None) -> str:
    """The ``hf download`` command that fetches ``files`` (or the files matching ``include``)."""
    parts = ["hf", "download", repo_id, *files]
    if include is not None:
        parts += ["--include", f'"{include}"']
    if revision != DEFAULT_REVISION:
        parts += ["--revision", revision]
    return " ".join(parts)


def model_download_commands(repo_id: str, revision: str = DEFAULT_REVISION) -> tuple[str, ...]:
    """The commands that fetch what a model needs: config, tokenizer and safetensors weights
    (``*.safetensors`` fetches a single ``model.safetensors`` or every shard)."""
    return (download_command(repo_id, MODEL_FILES, revision=revision),
            download_command(repo_id, include=WEIGHTS_PATTERN, revision=revision))


def fetch_advice(commands: Sequence[str], repo_folder: str, cache: Path, subject: str = "it") -> str:
    """The sentence telling how to fetch files and where to put them."""
    run = " and ".join(f"`{c}`" for c in commands)
    older = "on huggingface_hub older than 1.0: `huggingface-cli download` with the same arguments"
    return (f"fetch {subject} on a machine with network access with {run} ({older}), then copy the folder "
            f"{repo_folder} from that machine's hub cache (~/.cache/huggingface/hub unless HF_HUB_CACHE or HF_HOME "
            f"is set there) into {cache} here (or point HF_HUB_CACHE at a copy of that cache), or pass a local "
            f"folder path; jfig never downloads")


def check_revision(revision: str) -> str:
    if not isinstance(revision, str) or not revision or revision.startswith("/") or ".." in revision.split("/"):
        raise FormatError(f"revision must be a branch, tag or commit sha (e.g. 'main'), got {revision!r}")
    return revision


def find_snapshot(repo_id: str, revision: str = DEFAULT_REVISION, *, cache_dir: str | os.PathLike | None = None,
                  commands: Sequence[str] | None = None, subject: str | None = None) -> Snapshot:
    """The snapshot folder of ``repo_id`` at ``revision`` (a branch or tag in ``refs/``, or a commit sha).

    Raises :class:`NotInCacheError` when the repo folder is absent, the revision is unknown, or its
    ref names a snapshot that is not there. ``commands`` (default: the model commands) and
    ``subject`` (default: ``repo_id``) shape the message."""
    revision = check_revision(revision)
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo = cache / repo_folder_name(repo_id)
    subject = subject or repo_id
    commands = tuple(commands) if commands is not None else model_download_commands(repo_id, revision)
    advice = fetch_advice(commands, repo.name, cache)
    at = "" if revision == DEFAULT_REVISION else f" at revision {revision!r}"
    if not repo.is_dir():
        raise NotInCacheError(f"{subject} is not in the local Hugging Face cache (looked in {repo}): {advice}",
                              repo_id=repo_id, revision=revision, folder=repo, commands=commands)
    commit = revision
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        present = sorted(p.name for p in (repo / "snapshots").iterdir()) if (repo / "snapshots").is_dir() else []
        have = f"snapshots there: {', '.join(present)}" if present else "no snapshots there"
        if ref.is_file():
            problem = (f"{subject}{at} is not complete in the local Hugging Face cache: {ref} names snapshot "
                       f"{commit}, and {snapshot} does not exist ({have})")
        else:
            problem = (f"{subject}{at} is not in the local Hugging Face cache: {repo} has no refs/{revision} "
                       f"and no snapshots/{revision} ({have})")
        raise NotInCacheError(f"{problem}: {advice}", repo_id=repo_id, revision=revision, folder=repo,
                              commands=commands)
    return Snapshot(repo_id, revision, commit, repo, snapshot)


def cached_file(repo_id: str, filename: str, revision: str = DEFAULT_REVISION, *,
                cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached path of one repo file, or None (huggingface_hub's ``try_to_load_from_cache``,
    with a recorded non-existence also answered None)."""
    try:
        snapshot = find_snapshot(repo_id, revision, cache_dir=cache_dir)
    except NotInCacheError:
        return None
    path = snapshot.file(filename)
    return path if path.is_file() and not is_known_absent(snapshot, filename) else None


def is_known_absent(snapshot: Snapshot, filename: str) -> bool:
    """Whether huggingface_hub recorded that ``filename`` does not exist at this commit (``.no_exist``)."""
    return (snapshot.repo_folder / ".no_exist" / snapshot.commit / filename).is_file()


def describe_missing(snapshot: Snapshot, filename: str) -> str:
    """``filename`` with why it is missing: a link to an absent blob, or a recorded non-existence."""
    path = snapshot.file(filename)
    if is_known_absent(snapshot, filename):
        return f"{filename} (the repo has no such file at commit {snapshot.commit}: .no_exist records it)"
    if path.is_symlink() and not path.exists():
        return f"{filename} (a link to {os.readlink(path)}, which is not there)"
    return filename


def require_files(repo_id: str, filenames: Sequence[str], revision: str = DEFAULT_REVISION, *,
                  cache_dir: str | os.PathLike | None = None, subject: str | None = None) -> dict[str, Path]:
    """``{repo path: cached path}`` for every file in ``filenames``; NotInCacheError names the missing
    ones and the command that fetches exactly them."""
    commands = (download_command(repo_id, filenames, revision=revision),)
    snapshot = find_snapshot(repo_id, revision, cache_dir=cache_dir, commands=commands, subject=subject)
    missing = [f for f in filenames if not snapshot.file(f).is_file()]
    if missing:
        raise missing_files_error(snapshot, missing, subject=subject, cache_dir=cache_dir)
    return {f: snapshot.file(f) for f in filenames}


def missing_files_error(snapshot: Snapshot, missing: Sequence[str], *, subject: str | None = None,
                        cache_dir: str | os.PathLike | None = None, include: str | None = None,
                        reasons: dict[str, str] | None = None, note: str = "") -> NotInCacheError:
    """NotInCacheError for files absent from a snapshot: the message lists them (each with its entry
    in ``reasons``), then ``include`` (a pattern for files whose names are not known) and ``note``,
    and the command that fetches them."""
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    reasons = reasons or {}
    commands = []
    if missing:
        commands.append(download_command(snapshot.repo_id, missing, revision=snapshot.revision))
    if include is not None:
        commands.append(download_command(snapshot.repo_id, include=include, revision=snapshot.revision))
    names = [describe_missing(snapshot, f) + (f" ({reasons[f]})" if f in reasons else "") for f in missing]
    names += [f"files matching {include}"] if include else []
    them = "it" if len(names) == 1 else "them"
    subject = (subject or snapshot.repo_id) + ("" if snapshot.revision == DEFAULT_REVISION
                                               else f" at revision {snapshot.revision!r}")
    message = (f"{subject} is not complete in the local Hugging Face cache: {snapshot.folder} lacks "
               f"{', '.join(names)}{note}: {fetch_advice(commands, snapshot.repo_folder.name, cache, them)}")
    return NotInCacheError(message, repo_id=snapshot.repo_id, revision=snapshot.revision, folder=snapshot.folder,
                           missing=missing, commands=commands)


def check_model_snapshot(snapshot: Snapshot, *, subject: str | None = None,
                         cache_dir: str | os.PathLike | None = None) -> NotInCacheError | None:
    """What keeps the HF-folder loader from reading a snapshot (None if nothing): ``config.json`` and
    safetensors weights (one ``model.safetensors``, every shard its index names, or other
    ``*.safetensors`` files) must be there."""
    missing = [] if snapshot.file("config.json").is_file() else ["config.json"]
    include, note, reasons = None, "", {}
    index = snapshot.file(INDEX_FILE)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: not a valid safetensors index (expected a 'weight_map'): {e}") from None
        for shard in shards:
            if not snapshot.file(shard).is_file():
                missing.append(shard)
                reasons[shard] = f"a shard named by {INDEX_FILE}"
    elif not any(p.is_file() for p in snapshot.folder.glob(WEIGHTS_PATTERN)):
        links = [f for f in (INDEX_FILE, "model.safetensors") if snapshot.file(f).is_symlink()]
        missing += links
        if not links or INDEX_FILE in links:
            include = WEIGHTS_PATTERN
        other = sorted(p.name for p in snapshot.folder.iterdir() if p.suffix in (".bin", ".pt", ".h5", ".msgpack"))
        note = (f" (no weights: no model.safetensors, {INDEX_FILE} or other *.safetensors file"
                + (f"; {', '.join(other)} {'is' if len(other) == 1 else 'are'} there, but jfig reads safetensors "
                   f"weights only" if other else "") + ")")
    if missing or include:
        return missing_files_error(snapshot, missing, subject=subject, cache_dir=cache_dir, include=include,
                                   reasons=reasons, note=note)
    return None


def model_snapshot(repo_ids: str | Sequence[str], revision: str = DEFAULT_REVISION, *,
                   cache_dir: str | os.PathLike | None = None, name: str | None = None,
                   fetch_id: str | None = None) -> Path:
    """The snapshot folder of an HF model checkpoint, checked for what the HF-folder loader reads.

    ``repo_ids``: the ids the checkpoint may be cached under, in order (``gpt2`` and
    ``openai-community/gpt2`` are one repo, cached under the id it was fetched by); the first
    complete snapshot at ``revision`` is used. ``name`` is how messages call it (default: the first
    id) and ``fetch_id`` the id fetch commands name (default: the first id). The snapshot must hold
    ``config.json`` and safetensors weights; ``tokenizer.json`` is optional, as for a folder.
    Raises NotInCacheError naming each missing file (for the first id whose folder exists)."""
    repo_ids = (repo_ids,) if isinstance(repo_ids, str) else tuple(repo_ids)
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    fetch_id = fetch_id or repo_ids[0]
    subject = name or repo_ids[0]
    errors = []
    for repo_id in repo_ids:
        try:   # a folder that is there is completed by fetching under its own id
            snapshot = find_snapshot(repo_id, revision, cache_dir=cache, subject=subject)
        except NotInCacheError as err:
            errors.append(err)
            continue
        problem = check_model_snapshot(snapshot, subject=subject, cache_dir=cache)
        if problem is None:
            return snapshot.folder
        errors.append(problem)
    present = [e for e in errors if e.folder.exists()]
    if present:
        raise present[0]
    if len(errors) == 1:
        raise errors[0]
    looked = " and ".join(str(e.folder) for e in errors)
    commands = model_download_commands(fetch_id, revision)
    advice = fetch_advice(commands, repo_folder_name(fetch_id), cache)
    raise NotInCacheError(f"{subject} is not in the local Hugging Face cache (looked in {looked}): {advice}",
                          repo_id=fetch_id, revision=revision, folder=errors[0].folder, commands=commands)
