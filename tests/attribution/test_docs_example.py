"""docs/attribution.md: its Python example runs (the ```python blocks; ```py blocks need real files)."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "attribution.md"


def test_the_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    g = ns["g"]
    assert g.n_pos == 6 and g.n_errors == 12 and g.n_features > 0
    assert 0 < ns["replacement"] <= 1 and 0 < ns["completeness"] <= 1
    assert (tmp_path / "prompt.json").exists() and ns["nodes"].num_rows == g.n_nodes
