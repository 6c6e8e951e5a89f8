"""`jfig build CONFIG.toml`: the TOML file that names a model, SAEs, a corpus, an output folder and options.

    model = "smollm2-135m"            # a name, a .gguf file or an HF folder
    saes = ["saes/l6", "saes/l10"]    # SAE folders / params.npz files, or "default"
    corpus = "texts/"                 # files, folders, JSONL or Parquet, or "default"
    out = "my-graph"
    dtype = "bfloat16"                # model parameters (default "float32"); statistics stay float32
    [options]                         # flat option names (docs/options.md) ...
    top_k = 64
    [options.measure]                 # ... or one table per stage (atlas, candidates, measure,
    inputs_per_source = 16            #     significance, gating), or both
    [default_saes]                    # settings for default SAEs when saes = "default"

Relative paths are resolved against the config file's folder. Every error names the file, and for
a bad key or value the line that sets it ("build.toml:7: option alpha must be in (0, 1), got 5.0").
"""
from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from ..errors import FormatError, JfigError, OptionError
from ..models.registry import ALIASES, DTYPES
from .options import BuildOptions

CONFIG_KEYS = {"model", "saes", "corpus", "out", "options", "default_saes", "dtype"}
_HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _dotted(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", text))


def key_line(text: str, key: tuple[str, ...]) -> int | None:
    """The 1-based line of `text` (TOML) that sets the dotted `key`, e.g. ("options", "alpha"), found
    by scanning table headers and `name =` lines. When no line sets the key itself, the line of the
    innermost table holding it (a header, or an inline table); None if there is none."""
    table: tuple[str, ...] = ()
    best: tuple[int, int] | None = None      # (length of the matched prefix, line)
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        m = None if header else _KEY.match(line)
        if not header and not m:
            continue
        path = _dotted(header.group(1)) if header else table + _dotted(m.group(1))
        if header:
            table = path
        elif path == key:
            return number
        if key[: len(path)] == path and (best is None or len(path) > best[0]):
            best = (len(path), number)
    return best[1] if best else None


def config_error(path: Path, text: str, key: tuple[str, ...], message: str, kind: type = JfigError) -> JfigError:
    """`kind("FILE:LINE: message")` for the line that sets `key` ("FILE: message" if not found)."""
    line = key_line(text, key)
    return kind(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def _resolve(base: Path, value: Any, path: Path, text: str, key: str, *, allow: tuple[str, ...]) -> Any:
    """A path (or list of paths) from the config, relative to the config's folder; names in `allow`
    ("default", model names) are kept as they are."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise config_error(path, text, (key,), f"{key} must be a path string or a non-empty list of path strings, "
                                               f"got {value!r}")
    if isinstance(value, str) and value.lower() in allow:
        return value
    out = []
    for v in items:
        p = Path(v).expanduser()
        out.append(str(p if p.is_absolute() else base / p))
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """The config as a dict: model (a name or a resolved path), saes ("default" or a list of paths),
    corpus ("default" or a list of paths), out (resolved), options (every option, flat names, checked)
    and default_saes. Raises JfigError (OptionError for options) naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"{path}: not valid TOML: {e}") from None
    for key in cfg:
        if key not in CONFIG_KEYS:
            near = difflib.get_close_matches(key, sorted(CONFIG_KEYS), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"expected {', '.join(sorted(CONFIG_KEYS))}"
            raise config_error(path, text, (key,), f"unknown key {key!r}; {hint}")
    if "model" not in cfg:
        raise JfigError(f"{path}: the config needs a 'model' (a name such as \"smollm2-135m\", a .gguf file or an HF folder)")
    for key in ("options", "default_saes"):
        if not isinstance(cfg.get(key, {}), dict):
            raise config_error(path, text, (key,), f"[{key}] must be a table, got {cfg[key]!r}")
    if not isinstance(cfg.get("out", ""), str):
        raise config_error(path, text, ("out",), f"out must be a folder path string, got {cfg['out']!r}")
    if cfg.get("dtype", "float32") not in DTYPES:
        raise config_error(path, text, ("dtype",), f"dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    base = path.parent
    model = cfg["model"]
    if not isinstance(model, str):
        raise config_error(path, text, ("model",), f"model must be a name, a .gguf file or an HF folder (a string), "
                                                   f"got {model!r}")
    cfg["model"] = model if model.lower() in ALIASES else _resolve(base, model, path, text, "model", allow=())[0]
    cfg["saes"] = _resolve(base, cfg.get("saes", "default"), path, text, "saes", allow=("default",))
    cfg["corpus"] = _resolve(base, cfg.get("corpus", "default"), path, text, "corpus", allow=("default",))
    cfg["out"] = _resolve(base, cfg.get("out", "jfig-graph"), path, text, "out", allow=())[0]
    try:
        opts = BuildOptions.from_dict(cfg.get("options", {}))   # bad or unknown options fail before any work
    except OptionError as e:
        err = config_error(path, text, ("options", *e.key.split(".")), str(e), OptionError)
        err.key = e.key
        raise err from None
    cfg["options"] = opts.to_dict()
    cfg.setdefault("default_saes", {})
    return cfg
