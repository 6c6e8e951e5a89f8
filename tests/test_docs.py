"""The guide's code blocks run as one script."""
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


@pytest.mark.slow
def test_guide_runs():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 5
    ns: dict = {}
    exec(compile("\n".join(blocks), str(GUIDE), "exec"), ns)
    assert ns["sweep"].shape == (8, 3, 576)
    assert ns["model"].tokenizer.decode([ns["next_id"]]).strip() == "Paris"
