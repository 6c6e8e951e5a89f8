"""docs/notebook.ipynb runs top to bottom in a real Jupyter kernel (nbclient), so it cannot rot."""
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.ipynb"


def test_notebook_runs():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install 'jfig[test]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install 'jfig[test]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "slope by hand 2.0000, edge weight 2.0000, planted 2.0000" in text
    shown = [o for c in nb.cells if c.cell_type == "code" and c.source.rstrip().endswith("\ngraph")
             for o in c.outputs if o.output_type == "execute_result"]
    assert shown and "treescope" in shown[0].data["text/html"], "the graph is shown by treescope"
    assert "InteractionGraph" in shown[0].data["text/plain"]
    assert any("image/png" in o.data for o in outputs if o.output_type == "display_data"), "the sweep is plotted"
