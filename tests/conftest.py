"""Shared fixtures: PRNG keys, tiny random models of each family, planted models, and a trace counter.

Helpers that tests import as functions live in tests/support/ (tiny models, the HF reference, the
planted models). Tests on the real default model are marked `slow`; `pytest -m "not slow"` is the
fast set.
"""
import contextlib
import gc

import jax
import pytest

from tests.support import planted_graph
from tests.support.tiny_models import tiny_model as make_tiny_model

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_TRACES = [0]


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == TRACE_EVENT:
        _TRACES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module. Every CPU executable holds memory
    mappings; one test process compiling a few thousand of them reached the kernel's limit of 65,530
    mappings per process (vm.max_map_count), and XLA then crashed while compiling (measured: one
    module took a process from 10,600 to 39,000 mappings; after clearing, each module starts near 1,300)."""
    yield
    jax.clear_caches()
    gc.collect()


class TraceCounter:
    """Counts JAX traces (any jitted function) inside `with counter:` blocks; `.count` after the block."""

    def __init__(self):
        self.count = 0

    @contextlib.contextmanager
    def __call__(self):
        start = _TRACES[0]
        try:
            yield self
        finally:
            self.count = _TRACES[0] - start


@pytest.fixture
def count_traces():
    """`with count_traces() as c: ...` then `c.count` is the number of traces the block caused."""
    return TraceCounter()


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture(params=["llama", "gpt2", "gemma2"])
def tiny_model_any(request):
    """A tiny random model of each family in turn (4 layers, 16 wide)."""
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def planted_recovery():
    """(model, saes) of the planted recovery graph (tests/support/planted_graph.py)."""
    return planted_graph.recovery_model()
