"""The co-activation atlas: firing statistics, activation quantiles, top contexts and pairwise
co-activation of SAE features across sites, streamed over a corpus (docs/atlas.md)."""
from .accumulator import AtlasAccumulator, AtlasSpec
from .atlas import Atlas, merge_atlases
from .build import MAX_TRACKED, build_atlas, extend_atlas, token_batches, tracked_features
from .storage import read_atlas, write_atlas

__all__ = ["Atlas", "AtlasAccumulator", "AtlasSpec", "MAX_TRACKED", "build_atlas", "extend_atlas", "merge_atlases",
           "read_atlas", "token_batches", "tracked_features", "write_atlas"]
