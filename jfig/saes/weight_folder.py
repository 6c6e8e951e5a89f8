"""A folder of one JSON config and one safetensors file, written atomically: the format jfig's own
dictionaries beyond SAEs (crosscoders, NFMs) are saved in.

    write_weight_folder(path, cfg, tensors, config_file="x.json", weights_file="x.safetensors", what="...")
    cfg, tensors = read_weight_folder(path, config_file=..., weights_file=..., fmt="jfig-x", what="...")
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jfig.data.files import atomic_folder
from jfig.errors import FormatError


def write_weight_folder(path, cfg: dict, tensors: dict[str, np.ndarray], *, config_file: str, weights_file: str,
                        what: str) -> Path:
    """Write ``cfg`` (JSON) and ``tensors`` (safetensors) into the folder ``path``, atomically. An
    existing folder is replaced only if it holds nothing but these two files."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or {p.name for p in path.iterdir()} - {config_file, weights_file}):
        raise FormatError(f"{path}: exists and holds other files; {what} is written to a folder of its own")
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / weights_file))
        (tmp / config_file).write_text(json.dumps(cfg, indent=2, default=str))
    return path


def read_weight_folder(path, *, config_file: str, weights_file: str, fmt: str, what: str,
                       required=()) -> tuple[dict, dict[str, np.ndarray]]:
    """``(cfg, tensors)`` of a folder :func:`write_weight_folder` wrote, with ``cfg["format"] == fmt``
    and the ``required`` arrays present; FormatError names a missing, corrupt or foreign file."""
    path = Path(path)
    cfg_file, weights = path / config_file, path / weights_file
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FormatError(f"{path}: no {f.name}; expected {what} folder ({config_file} + {weights_file})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise FormatError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise FormatError(f"{cfg_file}: format {got!r}; expected {fmt!r}")
    try:
        with safe_open(str(weights), framework="numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types on truncated or corrupt files
        raise FormatError(f"{weights}: cannot read ({e})") from None
    missing = set(required) - set(tensors)
    if missing:
        raise FormatError(f"{weights}: missing arrays {sorted(missing)}")
    return cfg, tensors
