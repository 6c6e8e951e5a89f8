"""Shared fixtures of the command-line tests."""
import pytest

from tests.support.tiny_project import make_project


@pytest.fixture(scope="package")
def project(tmp_path_factory):
    """A tiny Llama HF folder with a byte-level tokenizer.json, two SAEs and a text corpus."""
    return make_project(tmp_path_factory.mktemp("proj"))
