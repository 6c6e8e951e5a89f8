"""jfig.testing: tools for researchers' own tests of code built on jfig.

- Planted models with known interactions (`planted_model`, `PlantedTruth`, `PlantedEdge`) and
  `recovery`, which scores a built graph against their truth;
- tiny random models of each family (`tiny_model`, `tiny_config`);
- hypothesis strategies (`tiny_models`, `sites`, `saes`, `token_batches`, `positions`, `features`,
  `edits`, `setups`), which need hypothesis (`pip install hypothesis`, or jfig's `test` extra).

Nothing in jfig imports this package; import it from tests (docs/testing.md).
"""
from .models import FAMILIES, tiny_config, tiny_model
from .planted import PlantedEdge, PlantedTruth, identity_sae, planted_model, recovery, site_name

STRATEGIES = ("SAE_STAGES", "Setup", "edits", "features", "positions", "saes", "setups", "sites", "tiny_models",
              "token_batches")

try:
    from .strategies import (SAE_STAGES, Setup, edits, features, positions, saes, setups, sites, tiny_models,
                             token_batches)
except ImportError as err:
    if "hypothesis" not in str(err):
        raise
    MISSING_HYPOTHESIS = err

    def __getattr__(name: str):
        if name in STRATEGIES:
            raise ImportError(f"jfig.testing.{name} is a hypothesis strategy, and hypothesis is not installed: "
                              f"pip install hypothesis (or pip install 'jfig[test]')") from MISSING_HYPOTHESIS
        raise AttributeError(f"module 'jfig.testing' has no attribute {name!r}")

__all__ = ["FAMILIES", "PlantedEdge", "PlantedTruth", "identity_sae", "planted_model", "recovery", "site_name",
           "tiny_config", "tiny_model", *STRATEGIES]
