"""`jfig build CONFIG.toml`: the TOML file that names a model, SAEs, a corpus, an output folder and options.

    model = "smollm2-135m"            # a name, a .gguf file or an HF folder
    saes = ["saes/l6", "saes/l10"]    # SAE folders / params.npz files, or "default"
    corpus = "texts/"                 # files, folders, JSONL or Parquet, or "default"
    out = "my-graph"
    [options]                         # BuildOptions fields
    top_k = 64
    [default_saes]                    # settings for default SAEs when saes = "default"
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from ..errors import FormatError, JfigError
from .options import BuildOptions

CONFIG_KEYS = {"model", "saes", "corpus", "out", "options", "default_saes"}


def load_config(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"config file {path} does not exist")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise JfigError(f"{path}: unknown key(s) {unknown}; expected {sorted(CONFIG_KEYS)}")
    if "model" not in cfg:
        raise JfigError(f"{path}: the config needs a 'model' (a name such as \"smollm2-135m\", a .gguf file or an HF folder)")
    base = path.parent

    def resolve(p):
        q = Path(p)
        return str(q if q.is_absolute() or not (base / q).exists() else base / q)

    cfg["model"] = cfg["model"] if not (base / cfg["model"]).exists() else str(base / cfg["model"])
    saes = cfg.get("saes", "default")
    cfg["saes"] = saes if saes == "default" else [resolve(s) for s in ([saes] if isinstance(saes, str) else saes)]
    corpus = cfg.get("corpus", "default")
    cfg["corpus"] = corpus if corpus == "default" else [resolve(c) for c in ([corpus] if isinstance(corpus, str) else corpus)]
    cfg["out"] = str(base / cfg.get("out", "jfig-graph"))
    if not isinstance(cfg.get("options", {}), dict) or not isinstance(cfg.get("default_saes", {}), dict):
        raise JfigError(f"{path}: [options] and [default_saes] must be tables")
    BuildOptions.from_dict(cfg.get("options", {}))   # unknown options fail before any work
    return cfg
