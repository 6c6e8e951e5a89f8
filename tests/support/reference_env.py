"""A separate Python environment holding the peer libraries that jfig is checked against.

circuit-tracer (its attribution) and SAELens need transformer-lens, nnsight and a transformers
release older than the one the rest of the suite uses (circuit-tracer pins transformers <= 4.57.3),
so they cannot share the test environment. `reference_python()` makes a virtual environment that
sees this interpreter's packages (torch, numpy, safetensors) and installs the pinned peers over
them from the package registry, once, under the cache folder; tests run reference scripts in it as
subprocesses and compare what they write. Where the environment cannot be made (no registry), the
test is skipped and says why.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from filelock import FileLock

# Pinned so the reference does not move under the suite; circuit-tracer 0.5.0 asks for
# transformers >= 4.56, <= 4.57.3 and huggingface-hub < 1.
REQUIREMENTS = ("transformers==4.57.3", "huggingface-hub<1.0", "transformer-lens==3.2.1", "nnsight==0.8.1",
                "circuit-tracer==0.5.0", "sae-lens==6.54.12")
CHECK = "import circuit_tracer, sae_lens, transformer_lens, nnsight"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jfig" / "reference-env"


def env_dir() -> Path:
    key = hashlib.sha256(json.dumps([sys.version, sys.executable, REQUIREMENTS]).encode()).hexdigest()[:12]
    return cache_root() / key


def python_in(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def build(folder: Path, log: Path) -> None:
    """Create the environment at `folder` (inheriting this interpreter's packages) and install the peers."""
    venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(folder)
    with open(log, "w") as out:
        subprocess.run([str(python_in(folder)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *REQUIREMENTS], check=True, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    subprocess.run([str(python_in(folder)), "-c", CHECK], check=True, capture_output=True, timeout=300)
    (folder / "ready").write_text("\n".join(REQUIREMENTS))


def reference_python() -> Path:
    """The reference environment's interpreter, built on first use; skips the test with the reason
    when it cannot be built."""
    folder = env_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / (folder.name + ".log")
    with FileLock(str(folder) + ".lock", timeout=1800):
        if not (folder / "ready").exists():
            try:
                build(folder, log)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                tail = log.read_text()[-800:] if log.exists() else ""
                pytest.skip(f"the reference environment ({', '.join(REQUIREMENTS)}) could not be installed "
                            f"from the package registry: {e}; {tail}")
    return python_in(folder)


def run_reference(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a reference script (its source text) in the reference environment; fail with its output."""
    py = reference_python()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(py), "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"reference script failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc
