"""Feature labels from files: a CSV (site, feature, label) or a Neuronpedia explanation export, as
{(site, feature): label}, for `InteractionGraph.with_labels` and the explorer."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import FormatError, JfigError


def load_labels(path, neuronpedia: dict[str, str] | None = None) -> dict[tuple[str, int], str]:
    """{(site, feature): label} from a CSV with a header (columns `site`, `feature`, `label`, or
    `feature` written SITE#ID and `label`), or from a Neuronpedia explanation export (.json: a list of
    {modelId, layer, index, description, ...}), whose sources map to sites through `neuronpedia`
    ({"gpt2-small/6-res-jb": site}, from the SAEs' neuronpedia ids). FormatError naming the line or
    item for anything else."""
    path = Path(path)
    if not path.is_file():
        raise JfigError(f"labels file {path} does not exist; expected a CSV with columns site,feature,label "
                        f"or a Neuronpedia explanation export (.json)")
    if path.suffix.lower() == ".json":
        return neuronpedia_labels(path, neuronpedia or {})
    out = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or ())
        if not {"feature", "label"} <= fields:
            raise FormatError(f"{path}: the header must name columns feature and label (and site, unless feature "
                              f"is written SITE#ID); got {sorted(fields)}")
        for line, row in enumerate(reader, start=2):
            site, feature = row.get("site"), str(row["feature"] or "").strip()
            if "#" in feature:
                site, _, feature = feature.rpartition("#")
            if not site or not feature.lstrip("-").isdigit():
                raise FormatError(f"{path}, line {line}: expected a site and an integer feature id, got "
                                  f"site={site!r} feature={row['feature']!r}")
            out[(site.strip(), int(feature))] = str(row["label"] or "")
    return out


def neuronpedia_labels(path: Path, sources: dict[str, str]) -> dict[tuple[str, int], str]:
    """Labels from a Neuronpedia explanation export: each item's `description` for the feature `index`
    of the SAE `modelId/layer`, mapped to a site by `sources`; the first description of a feature wins."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise FormatError(f"{path}: a Neuronpedia explanation export is a JSON list of explanations, got "
                          f"{type(items).__name__}")
    out = {}
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not {"modelId", "layer", "index", "description"} <= set(item):
            raise FormatError(f"{path}, item {n}: expected modelId, layer, index and description, got "
                              f"{sorted(item) if isinstance(item, dict) else type(item).__name__}")
        source = f"{item['modelId']}/{item['layer']}"
        if source not in sources:
            raise JfigError(f"{path}: explanations of the Neuronpedia SAE {source!r}, which none of the graph's SAEs "
                            f"is (their Neuronpedia ids: {sorted(sources) or 'none'}); load the SAEs by their "
                            f"release so they carry their ids, map the SAE to its site (`jfig label --source "
                            f"{source}=SITE`), or write the labels as a CSV")
        if not str(item["index"]).lstrip("-").isdigit():
            raise FormatError(f"{path}, item {n}: index {item['index']!r} is not an integer")
        out.setdefault((sources[source], int(item["index"])), str(item["description"]))
    return out
