"""`jfig behavior NAME --graph DIR` and `jfig steer`: the model and SAEs a saved graph was built with,
found in jfig's SAE cache by the fingerprints in the graph's manifest."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import JfigError
from ..saes import load_sae
from ..saes.defaults import cache_root, model_id
from .build import sae_fingerprint

log = logging.getLogger(__name__)


def cached_saes_for(model, manifest: dict) -> list:
    """The SAEs listed in a graph manifest (site + fingerprint), loaded from jfig's SAE cache for
    `model`; JfigError naming the missing sites when some are not there."""
    want = {s["site"]: s.get("fingerprint") for s in manifest.get("saes", [])}
    if not want:
        raise JfigError("the graph's manifest lists no SAEs; pass them with --sae PATH")
    root = cache_root() / "saes" / model_id(model)
    found = {}
    for folder in sorted(root.glob("*/*")) if root.exists() else []:
        site = folder.name
        if site in want and site not in found and folder.is_dir() and not folder.parent.name.startswith("."):
            sae = load_sae(folder)
            if want[site] is None or sae_fingerprint(sae) == want[site]:
                found[site] = sae
    missing = sorted(set(want) - set(found))
    if missing:
        raise JfigError(f"no cached SAE matches the graph's SAE(s) at {missing} (looked in {root}); pass the SAEs "
                        f"the graph was built with using --sae PATH")
    log.info("SAEs of the graph found in %s", root)
    return [found[s] for s in want]
