"""Options of a graph build: one frozen dataclass per stage, each validating its fields when built.

`BuildOptions` holds the options shared by every stage (seq_len, max_sequences, batch_size, seed)
and one dataclass per stage: `atlas` (AtlasOptions), `candidates` (CandidateOptions), `measure`
(MeasureOptions), `significance` (SignificanceOptions) and `gating` (GatingOptions). Every option
also has a flat name (`top_k`, `alpha`, `gating_max_targets`, ...), the keyword `build_graph`
takes; `BuildOptions.from_dict` reads flat names, per-stage tables, or a mix, and flat read-only
properties (`opts.top_k`) return the stage fields. A wrong type, a value out of range or an
unknown name raises OptionError naming the option and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import OptionError
from ..measure import (AUTO_INPUTS, CLAMP_AT, IMPORTANCE_KINDS, INPUT_MODES, METHODS, POSITION_MODES, READS,
                       affordable_inputs)
from ..stats import CORRECTIONS

PVALUE_METHODS = ("robust", "saddlepoint", "normal", "permutation")
GATING_ESTIMATORS = ("mixed", "factorial")
TARGET_MODES = ("candidates", "all")     # candidate pairs only, or every feature in the window (dense)
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTES_FORMS = "a number of bytes > 0, or a string such as '2GB', '512MiB' or '1.5e9' (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: Any) -> float | None:
    """Bytes from a number or a string with an optional unit ("2GB", "512MiB", "1.5e9"); None if
    it is neither (a bool is neither)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        m = _BYTES_RE.match(value)
        if m and m.group(2).lower() in BYTE_UNITS:
            return float(m.group(1)) * BYTE_UNITS[m.group(2).lower()]
    return None


def format_bytes(n: float) -> str:
    """n bytes as a short decimal figure: '2 GB', '512 kB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Check:
    """What one option accepts: `kind` ("int", "float", "bool", "choice" or "bytes"), a range
    (`lo`/`hi`, open ends with `lo_open`/`hi_open`), `choices`, and whether None is allowed
    (`none` says what None means)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    none: str = ""

    @property
    def range(self) -> str:
        """The range in words: '≥ 1', 'in (0, 1)', '' when unbounded."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '≤'} {self.hi:g}"
        return ""

    @property
    def expected(self) -> str:
        """Everything the option accepts, in words."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "bytes":
            text = BYTES_FORMS
        else:
            text = " ".join(x for x in ("an integer" if self.kind == "int" else "a number", self.range) if x)
        return f"{text}, or None ({self.none})" if self.none else text

    def in_range(self, v: float) -> bool:
        return not ((self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo))
                    or (self.hi is not None and not (v < self.hi if self.hi_open else v <= self.hi)))

    def __call__(self, name: str, value: Any) -> Any:
        """`value` normalised (Python int/float/bool/str), or OptionError naming `name`."""
        if value is None and self.none:
            return None
        bad_type = OptionError(f"option {name} must be {self.expected}, got {value!r} ({type(value).__name__})",
                               name)
        if self.kind == "bool":
            if type(value).__name__ not in ("bool", "bool_"):
                raise bad_type
            return bool(value)
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                near = difflib.get_close_matches(value, self.choices, n=1) if isinstance(value, str) else []
                raise OptionError(f"option {name} must be {self.expected}, got {value!r}"
                                  + (f"; did you mean {near[0]!r}?" if near else ""), name)
            return value
        if self.kind == "bytes":
            v = parse_bytes(value)
            if v is None or not math.isfinite(v) or v <= 0:
                raise OptionError(f"option {name} must be {self.expected}, got {value!r}", name)
            return v
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind == "int" else numbers.Real):
            raise bad_type
        v = int(value) if self.kind == "int" else float(value)
        if not self.in_range(v):
            must = self.expected if self.kind == "int" else self.range
            raise OptionError(f"option {name} must be {must}, got {value!r}", name)
        return v


def option(default: Any, check: Check, doc: str) -> Any:
    """A dataclass field with its `check` and a one-line `doc` (the options table in the docs)."""
    return field(default=default, metadata={"check": check, "doc": doc})


INT1, INT0 = Check("int", lo=1), Check("int", lo=0)
BOOL = Check("bool")


class StageOptions:
    """Base of the option dataclasses: checks and normalises every field on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if "check" in f.metadata)


@dataclass(frozen=True)
class AtlasOptions(StageOptions):
    """The co-activation atlas."""

    window: int = option(5, INT0, "layer window: pairs whose layers differ by at most this are counted and tested")
    position_window: int = option(0, INT0, "co-activation counts feature j at positions p..p+w after i at p "
                                           "(0: same token)")


@dataclass(frozen=True)
class CandidateOptions(StageOptions):
    """Which feature pairs are measured."""

    top_k: int = option(32, INT1, "important features kept per site")
    importance: str = option("loss", Check("choice", choices=IMPORTANCE_KINDS),
                             "how features are ranked: 'loss' (ablation), 'kl', 'attribution' (first-order, fast) "
                             "or 'rate' (firing rate)")
    importance_pool: int | None = option(None, Check("int", lo=1, none="4 × top_k"),
                                         "most frequent features scored for importance per site")
    importance_sequences: int | None = option(None, Check("int", lo=1, none="all sequences"),
                                              "sequences used to score importance")
    min_coact: float = option(0.01, Check("float", lo=0, hi=1), "minimum co-activation rate P(j | i) of a pair")
    keep_low_coact: bool = option(True, BOOL, "also keep pairs that co-activate significantly less than chance")
    min_alignment: float | None = option(None, Check("float", lo=0, hi=1, none="no filter: alignment orders pairs"),
                                         "drop pairs at most one layer apart whose |cosine| between the source's "
                                         "decoder row and the target's encoder row is below this (opt-in)")
    max_sources: int | None = option(None, Check("int", lo=1, none="no cap"),
                                     "cap on measured source features (those with most candidate pairs first; "
                                     "with targets = 'all', the most important)")
    targets: str = option("candidates", Check("choice", choices=TARGET_MODES),
                          "targets of each source: its co-activation 'candidates', or 'all': every feature of every "
                          "later site in the window (a dense graph, its significance streamed block by block)")


@dataclass(frozen=True)
class MeasureOptions(StageOptions):
    """The intervention effects of sources on their candidate targets."""

    method: str = option("clamp", Check("choice", choices=METHODS), "intervention: clamp, ablate, mean_ablate, "
                                                                    "jacobian or jacobian_direct")
    positions: str = option("same", Check("choice", choices=POSITION_MODES),
                            "where targets are read: at the edited token ('same'), after it ('later') or from it on "
                            "('all')")
    clamp_at: str = option("single", Check("choice", choices=CLAMP_AT),
                           "where the source is clamped on each input: its strongest position ('single') or every "
                           "position where it fires ('all_active')")
    read: str = option("post", Check("choice", choices=READS),
                       "what is read of each target: its activation ('post') or its encoder pre-activation ('pre', "
                       "which can show inhibition of an inactive target)")
    inputs: str = option("source", Check("choice", choices=INPUT_MODES),
                         "inputs of a pair: every input where the source fires ('source'), or only those where "
                         "the target is active too ('target_active')")
    inputs_per_source: int | None = option(
        None, Check("int", lo=1, none=f"as many as memory_budget allows for one source, up to {AUTO_INPUTS}"),
        "inputs (sequences where the source fires) per source feature; more inputs resolve smaller "
        "p-values and make the tests hold their level when per-input effects are skewed")
    block_size: int = option(8, INT1, "source features per resumable block")
    null_every: int = option(2, INT0, "random-direction control on every n-th block (0: none, tau = 0)")
    memory_budget: float = option(2e9, Check("bytes"), "memory a measurement chunk may use, in bytes: a number "
                                                       "or a string with a unit")


@dataclass(frozen=True)
class SignificanceOptions(StageOptions):
    """Which measured pairs become edges."""

    alpha: float = option(0.01, Check("float", lo=0, hi=1, lo_open=True, hi_open=True), "family-wise (or FDR) level")
    correction: str = option("bonferroni", Check("choice", choices=CORRECTIONS),
                             "multiple-testing correction: bonferroni, bh (FDR) or none")
    tau_quantile: float = option(0.99, Check("float", lo=0, hi=1), "quantile of random-direction |effects| "
                                                                    "an edge must exceed (tau)")
    pvalue: str = option("robust", Check("choice", choices=PVALUE_METHODS),
                         "p-values of first-order and gating effects: 'robust' (the larger of the sign-flip "
                         "saddle-point p-value and the skewness-corrected t test: holds its level when per-input "
                         "effects are skewed), the sign-flip test's 'saddlepoint' tail (exact for few inputs; no "
                         "floor above what the inputs allow), its 'normal' approximation or Monte-Carlo "
                         "'permutation'")
    n_perm: int = option(1000, INT1, "sign flips for pvalue = 'permutation'")


@dataclass(frozen=True)
class GatingOptions(StageOptions):
    """Tests of gating (one source modulating another's effect). True when enabled."""

    enabled: bool = option(True, BOOL, "test gating after first-order edges")
    max_targets: int = option(16, INT1, "targets (with ≥ 2 significant inputs at one site) tested for gating")
    max_pairs: int = option(15, INT1, "source pairs tested per gating target")
    method: str = option("factorial", Check("choice", choices=GATING_ESTIMATORS),
                         "gating estimator: 'factorial' (2×2 contrast) or 'mixed'")

    def __bool__(self) -> bool:
        return self.enabled


STAGES: dict[str, type[StageOptions]] = {"atlas": AtlasOptions, "candidates": CandidateOptions,
                                          "measure": MeasureOptions, "significance": SignificanceOptions,
                                          "gating": GatingOptions}

# flat name -> (stage, field); stage None for the shared options on BuildOptions itself. Ordered as
# the manifest and fingerprint list them.
FLAT: dict[str, tuple[str | None, str]] = {
    "seq_len": (None, "seq_len"), "max_sequences": (None, "max_sequences"),
    "window": ("atlas", "window"), "position_window": ("atlas", "position_window"),
    **{n: ("candidates", n) for n in CandidateOptions.option_names()},
    **{n: ("measure", n) for n in MeasureOptions.option_names() if n != "memory_budget"},
    **{n: ("significance", n) for n in SignificanceOptions.option_names()},
    "gating": ("gating", "enabled"), "gating_max_targets": ("gating", "max_targets"),
    "gating_max_pairs": ("gating", "max_pairs"), "gating_method": ("gating", "method"),
    "batch_size": (None, "batch_size"), "memory_budget": ("measure", "memory_budget"), "seed": (None, "seed"),
}


class StageField:
    """Read-only flat alias on BuildOptions for a stage's field (`opts.top_k` is `opts.candidates.top_k`)."""

    def __init__(self, stage: str, name: str):
        self.stage, self.name = stage, name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.stage), self.name)


def _stage(name: str) -> Any:
    return field(default_factory=STAGES[name], metadata={"stage": name})


@dataclass(frozen=True)
class BuildOptions(StageOptions):
    """Every option of a graph build (defaults sized for a small CPU run): the shared options and
    one options dataclass per stage. Build from flat names or stage tables with `from_dict`."""

    seq_len: int = option(64, INT1, "tokens per sequence")
    max_sequences: int = option(256, INT1, "corpus sequences used (atlas, candidates, measurement)")
    batch_size: int = option(16, INT1, "sequences per batch in every stage")
    seed: int = option(0, INT0, "seed of corpus shuffling, input choice, random directions and permutations")
    atlas: AtlasOptions = _stage("atlas")
    candidates: CandidateOptions = _stage("candidates")
    measure: MeasureOptions = _stage("measure")
    significance: SignificanceOptions = _stage("significance")
    gating: GatingOptions = _stage("gating")

    # flat read-only aliases (`gating` itself is the GatingOptions, true when enabled)
    window = StageField("atlas", "window")
    position_window = StageField("atlas", "position_window")
    top_k = StageField("candidates", "top_k")
    importance = StageField("candidates", "importance")
    importance_pool = StageField("candidates", "importance_pool")
    importance_sequences = StageField("candidates", "importance_sequences")
    min_coact = StageField("candidates", "min_coact")
    keep_low_coact = StageField("candidates", "keep_low_coact")
    min_alignment = StageField("candidates", "min_alignment")
    max_sources = StageField("candidates", "max_sources")
    targets = StageField("candidates", "targets")
    method = StageField("measure", "method")
    positions = StageField("measure", "positions")
    clamp_at = StageField("measure", "clamp_at")
    read = StageField("measure", "read")
    inputs = StageField("measure", "inputs")
    inputs_per_source = StageField("measure", "inputs_per_source")
    block_size = StageField("measure", "block_size")
    null_every = StageField("measure", "null_every")
    memory_budget = StageField("measure", "memory_budget")
    alpha = StageField("significance", "alpha")
    correction = StageField("significance", "correction")
    tau_quantile = StageField("significance", "tau_quantile")
    pvalue = StageField("significance", "pvalue")
    n_perm = StageField("significance", "n_perm")
    gating_max_targets = StageField("gating", "max_targets")
    gating_max_pairs = StageField("gating", "max_pairs")
    gating_method = StageField("gating", "method")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, kind in STAGES.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, getattr(BuildOptions.from_dict({name: dict(value)}), name))
            elif not isinstance(value, kind):
                raise OptionError(f"option {name} must be a {kind.__name__} or a table of its options "
                                  f"({', '.join(kind.option_names())}), got {value!r} ({type(value).__name__})", name)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildOptions":
        """Options from flat names (`top_k=...`), per-stage tables (`{"candidates": {"top_k": ...}}`,
        or a stage dataclass), or a mix; each option given once. Raises OptionError for an unknown
        name (with the nearest valid one) or a bad value."""
        top: dict[str, Any] = {}
        stages: dict[str, dict[str, Any]] = {name: {} for name in STAGES}
        given: dict[tuple[str | None, str], str] = {}

        def place(stage: str | None, name: str, key: str, value: Any) -> None:
            if (stage, name) in given:
                raise OptionError(f"option {key} is given twice (as {given[stage, name]} and as {key})", key)
            given[stage, name] = key
            (stages[stage] if stage else top)[name] = option_field(stage, name).metadata["check"](key, value)

        for key, value in d.items():
            key = str(key)
            if key in STAGES and (isinstance(value, (Mapping, STAGES[key])) or key not in FLAT):
                if isinstance(value, STAGES[key]):
                    value = {n: getattr(value, n) for n in STAGES[key].option_names()}
                if not isinstance(value, Mapping):
                    raise OptionError(f"option {key} must be a table of {key} options "
                                      f"({', '.join(STAGES[key].option_names())}), got {value!r} "
                                      f"({type(value).__name__})", key)
                for sub, v in value.items():
                    sub = str(sub)
                    if sub not in STAGES[key].option_names():
                        raise OptionError(unknown_option_message(f"{key}.{sub}"), f"{key}.{sub}")
                    place(key, sub, f"{key}.{sub}", v)
            elif key in FLAT:
                place(*FLAT[key], key, value)
            else:
                raise OptionError(unknown_option_message(key), key)
        return cls(**top, **{name: STAGES[name](**kw) for name, kw in stages.items()})

    def to_dict(self) -> dict[str, Any]:
        """Flat {name: value} of every option (JSON-serialisable; `from_dict` reads it back). The graph
        manifest and the build folder's fingerprint store this."""
        return {name: getattr(getattr(self, stage) if stage else self, f) for name, (stage, f) in FLAT.items()}

    def with_inputs_resolved(self, config, target_widths, seq: int) -> "BuildOptions":
        """These options with inputs_per_source = None replaced by what `memory_budget` allows for one
        source (`affordable_inputs`, up to AUTO_INPUTS) at sequence length `seq`, for a model of
        `config` whose target SAEs have `target_widths` features; unchanged when it is set."""
        if self.inputs_per_source is not None:
            return self
        n = affordable_inputs(config, self.method, seq, target_widths, self.memory_budget)
        return self.replace(inputs_per_source=n)

    def replace(self, **flat: Any) -> "BuildOptions":
        """A copy with some options changed (flat names)."""
        return BuildOptions.from_dict({**self.to_dict(), **flat})

    def by_stage(self) -> dict[str, dict[str, Any]]:
        """{"shared": {...}, "atlas": {...}, ...}: every option grouped as in the per-stage tables."""
        shared = {n: getattr(self, n) for n in self.option_names()}
        return {"shared": shared, **{name: {n: getattr(getattr(self, name), n) for n in kind.option_names()}
                                        for name, kind in STAGES.items()}}


def unknown_option_message(key: str) -> str:
    """'unknown build option K; did you mean ...?' for a flat name or a 'stage.name' key."""
    stage, _, name = key.rpartition(".")
    if stage in STAGES:
        valid = STAGES[stage].option_names()
        home = [s for s, kind in STAGES.items() if name in kind.option_names()]
        if home:
            return f"unknown build option {key!r}; {name} is a {home[0]} option ({home[0]}.{name})"
        if name in FLAT:
            return f"unknown build option {key!r}; {name} is a shared option (set it directly in [options])"
        near = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean {stage + '.' + near[0]!r}?" if near else f"{stage} options: {', '.join(valid)}"
        return f"unknown build option {key!r}; {hint}"
    near = difflib.get_close_matches(key, [*FLAT, *STAGES], n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known options: {', '.join(FLAT)}"
    return f"unknown build option {key!r}; {hint}"


def option_field(stage: str | None, name: str) -> dataclasses.Field:
    """The dataclass field of option `name` of `stage` (None: a shared option); its metadata holds
    the option's Check ("check") and meaning ("doc")."""
    return next(f for f in dataclasses.fields(STAGES[stage] if stage else BuildOptions) if f.name == name)


def options_table() -> list[tuple[str, str, Any, str]]:
    """(flat name, stage, default, meaning) for every option, in manifest order."""
    defaults = BuildOptions()
    return [(name, stage or "shared", getattr(getattr(defaults, stage) if stage else defaults, f),
             option_field(stage, f).metadata["doc"]) for name, (stage, f) in FLAT.items()]
