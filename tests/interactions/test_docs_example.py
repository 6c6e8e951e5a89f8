"""docs/interactions.md: its example runs and prints the shapes it says."""
import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[2] / "docs" / "interactions.md"


def test_the_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    ns: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    assert ns["neurons"].ratio.shape == (50, 32) and ns["neurons"].error.shape == (50,)
    assert ns["terms"].interaction.shape == (2, 4, 3, 2) and ns["overlap"].shape == (1, 4, 3, 3)
    assert ns["dominance"].explained.shape == (4,)
    assert ns["dist"].corr.shape == ns["dist"].mi_corrected.shape == (32, 32)
    assert np.isfinite(ns["neurons"].error[ns["neurons"].cooccurrence > 0]).all()
