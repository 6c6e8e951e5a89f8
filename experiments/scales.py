"""Settings shared by the numbered experiments (01 atlas, 02 causal graph, 03 graph analysis): the
model, the SAE sites, the corpus and the build size at each scale.

    python -m experiments.02_causal_graph.run --scale cpu          # about an hour on 2 CPU cores
    python -m experiments.02_causal_graph.run --scale accelerator  # one GPU

Sites come in (hook_resid_mid, hook_resid_post) pairs of consecutive layers, so a graph has
within-layer pairs (mid -> post of one layer: the MLP alone) as well as pairs across layers.
The corpus is the offline default (the CPython documentation and the prompt suites) plus text
sampled from the model itself, unless --corpus names a text file, a folder of .txt files or a
JSONL file with a "text" field.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import jfig
from jfig.data import Corpus, default_corpus
from jfig.errors import JfigError
from jfig.pipeline.behavior import cached_saes_for
from jfig.saes import default_saes


@dataclass(frozen=True)
class Scale:
    layers: tuple[int, ...]         # each gives blocks.L.hook_resid_mid and blocks.L.hook_resid_post
    d_sae: int
    sae_tokens: int                 # training tokens per SAE site
    samples: int                    # model-sampled documents added to the default corpus
    max_sequences: int              # sequences of seq_len tokens the build measures on
    atlas_sequences: int            # sequences experiment 01's atlas counts over
    seq_len: int
    top_k: int                      # source features per source site (attribution importance)
    inputs_per_source: int
    hub_sequences: int              # sequences of the hub-ablation test
    hub_matched: int                # firing-rate-matched random features per hub
    null_samples: int               # rewired copies behind every z-score

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(f"blocks.{l}.{s}" for l in self.layers for s in ("hook_resid_mid", "hook_resid_post"))


SCALES = {
    "cpu": Scale(layers=(9, 10, 11), d_sae=2048, sae_tokens=65_536, samples=256, max_sequences=256, atlas_sequences=2048, seq_len=64,
                 top_k=410, inputs_per_source=32, hub_sequences=16, hub_matched=5, null_samples=20),
    "accelerator": Scale(layers=(8, 9, 10, 11, 12, 13), d_sae=4096, sae_tokens=262_144, samples=1024,
                         max_sequences=1024, atlas_sequences=16384, seq_len=128, top_k=1024, inputs_per_source=64, hub_sequences=256, hub_matched=20,
                         null_samples=100),
    "smoke": Scale(layers=(9, 10), d_sae=512, sae_tokens=8_192, samples=8, max_sequences=32, atlas_sequences=32, seq_len=32, top_k=8,
                   inputs_per_source=8, hub_sequences=8, hub_matched=3, null_samples=3),
}


def arguments(description: str, default_out: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--corpus", default="default", help="'default' (docs + prompts + model samples) or a path")
    ap.add_argument("--out", default=default_out, help="results folder (small tables and figures)")
    ap.add_argument("--work", default=None, help="build folder shared by 02 and 03 (resumable); default: "
                                                 "experiments/build-<scale>")
    return ap


def setup(args) -> tuple:
    """(model, saes, corpus, scale, description of the corpus) for the parsed arguments."""
    scale = SCALES[args.scale]
    model = jfig.load_model("smollm2-135m")
    saes, _ = default_saes(model, sites=scale.sites, d_sae=scale.d_sae, tokens=scale.sae_tokens, progress=True)
    if args.corpus == "default":
        corpus = default_corpus(model, n_samples=scale.samples)
        what = f"default corpus (CPython docs + prompt suites) + {scale.samples} model samples of 128 tokens"
    else:
        corpus = Corpus.from_spec(args.corpus)
        what = f"user corpus {args.corpus}"
    return model, saes, corpus, scale, what


def work_folder(args) -> Path:
    return Path(args.work) if args.work else Path(__file__).parent / f"build-{args.scale}"


def describe(scale: Scale) -> dict:
    return {**asdict(scale), "sites": list(scale.sites)}


def built_graph(args) -> tuple:
    """(graph, model, {site: SAE}) of experiment 02's build at this scale: the graph in the build folder
    and the SAEs it was built with, found in jfig's SAE cache by the manifest's fingerprints."""
    work = work_folder(args)
    if not (work / "graph" / "manifest.json").exists():
        raise JfigError(f"no graph in {work / 'graph'}: run experiments/02_causal_graph at --scale {args.scale} first")
    graph = jfig.load_graph(work / "graph")
    model = jfig.load_model("smollm2-135m")
    return graph, model, model.check_saes(cached_saes_for(model, graph.manifest))
