"""The code blocks of docs/testing.md run as one module, and every test they define passes."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def doc_namespace() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2
    namespace: dict = {"__name__": "docs_testing"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
    return namespace


NAMESPACE = doc_namespace()
TESTS = sorted(name for name, value in NAMESPACE.items() if name.startswith("test_") and callable(value))


def test_the_doc_defines_its_examples():
    assert TESTS == ["test_build_settings_recover_a_planted_graph", "test_scaling_a_feature_by_one_changes_nothing",
                     "test_scaling_a_feature_by_zero_is_ablation"]


@pytest.mark.parametrize("name", TESTS)
def test_doc_example(name):
    NAMESPACE[name]()
