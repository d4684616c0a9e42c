"""The scan result as typed data: what `scan` writes (docs/commands/scan.md, schema_version 1) and what patch, the
recipes, tune, the model card, the report and verify read.

Torch-free, so that detection, the recipes and the card can share it without a model. `to_json()` gives the
JSON object key for key in the documented order (a scan JSON read with `from_json` comes back byte for byte);
`from_json` checks every field first and names the first bad one in one line (exit status 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from melsurgery.errors import UserError
from melsurgery.formats.textfile import MAX_JSON, read_text
from melsurgery.formats.typed import JsonRecord, Need, is_int, is_num, join, load
from melsurgery.params import DetectParams

SCHEMA_VERSION = 1
FIX = "rerun `melsurgery scan --json`"


@dataclass(frozen=True)
class ModelInfo:
    """Which model was scanned, and the two sizes a scan must match before it is applied to a model."""

    id: str
    folder: str
    kind: str  # folder, hub or gguf
    revision: str | None
    family: str
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class AdaptiveRound:
    """One round of an adaptive calibration: how many samples, and what the detection found on them."""

    samples: int
    me_layer: int | None
    massive_dims: tuple[int, ...]
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class Adaptive:
    """The rounds of `--num-samples auto` and why it stopped."""

    rounds: tuple[AdaptiveRound, ...]
    reason: str


@dataclass(frozen=True)
class CalibrationInfo:
    """The calibration text and how much of it was used (provenance keeps all of it but the timing)."""

    source: str
    num_samples: int
    max_tokens: int
    seed: int
    tokens: int
    seconds: float
    adaptive: Adaptive | None = None
    dtype: str | None = None  # the compute dtype


@dataclass(frozen=True)
class MassiveToken:
    """A massive token: calibration sample, position, token string."""

    sample: int
    pos: int
    token: str


@dataclass(frozen=True)
class TokenCount:
    """How often a (position, token) pair is massive over the calibration samples."""

    pos: int
    token: str
    count: int


@dataclass(frozen=True)
class TopDim:
    """A dim of the massive tokens at the ME Layer, by mean |h| over them (WeMask's top-k ranking)."""

    dim: int
    mean_abs: float
    tokens: int


@dataclass(frozen=True)
class Precursor:
    """A layer before the ME Layer with large entries that do not persist."""

    layer: int
    dim: int
    value: float
    ratio: float | None  # null where the layer's median is zero
    dims: tuple[int, ...]
    tokens: int
    example_token: str
    example_pos: int


@dataclass(frozen=True, kw_only=True)
class FfnNeuron:
    """An FFN neuron of the ME Layer that writes a massive dim (in MoE layers, of which expert)."""

    neuron: int
    expert: int | str | None = field(default=None, metadata={"omit_none": True})  # an index, or "shared"
    contribution: float
    share: float
    activation_massive: float
    activation_other_max: float
    down_weight: float
    dim: int
    selectivity: float | None  # null: the neuron is silent on every other token


@dataclass(frozen=True)
class DimAttribution:
    """What built a massive dim inside the ME Layer: its input, the token mixer's write, the FFN's write."""

    dim: int
    value: float
    input: float
    mixer: str
    attn_write: float
    ffn_write: float
    ffn_norm_weight: float


@dataclass(frozen=True)
class NormInfo:
    """The ME Layer's FFN-input (or -output) RMSNorm on the massive tokens versus the others."""

    ffn_norm_role: str
    ffn_norm_scale_massive: float
    ffn_norm_scale_other_median: float | None  # null when every token is massive
    ffn_norm_weight_mean: float
    ffn_norm_weight_on_dims: dict[str, float]


@dataclass(frozen=True)
class SelectorLayer:
    """The magnitude selector of one layer after the ME Layer (None threshold: the tokens do not separate)."""

    layer: int
    threshold: float | None
    massive_min: float
    others_max: float
    selected: int
    massive_tokens: int


@dataclass(frozen=True)
class SinkDim:
    """One dim of a layer's sink attribution: mean |x * grad| and its share of the layer's total."""

    dim: int
    score: float
    share: float


@dataclass(frozen=True)
class LayerSinkDims:
    """The dims of the massive tokens' attention input that drive one layer's sink, against the magnitude top-k."""

    layer: int
    dims: tuple[SinkDim, ...]
    overlap: float | None
    sink_top_share: float | None
    magnitude_top_share: float | None


@dataclass(frozen=True)
class OrdinaryMean:
    """The ordinary tokens' mean attention input of one layer (wemask --replace mean)."""

    layer: int
    mean: tuple[float, ...]


@dataclass(frozen=True)
class TopEntry:
    """One of a state's largest entries."""

    sample: int
    pos: int
    token: str
    dim: int
    value: float


@dataclass(frozen=True)
class LayerRecord:
    """One residual-stream state: the embeddings (layer -1) or a decoder layer's output."""

    layer: int
    name: str
    mixer: str | None
    max_abs: float
    median_abs: float
    ratio: float | None
    massive: bool
    sink: float | None
    sink_rate: float | None
    top: tuple[TopEntry, ...]


@dataclass(frozen=True, kw_only=True)
class ScanResult(JsonRecord):
    """Everything a scan found, typed (docs/commands/scan.md, "Scan JSON"); the same object in memory and in the JSON.

    Fields absent from a JSON take their defaults (a hand-edited or older result still reads).
    """

    schema_version: int = SCHEMA_VERSION
    tool: str = ""
    model: ModelInfo
    calibration: CalibrationInfo | None = None
    params: DetectParams = field(default_factory=DetectParams)
    me_layer: int | None = None
    massive_dims: tuple[int, ...] = ()
    massive_tokens: tuple[MassiveToken, ...] = ()
    token_summary: tuple[TokenCount, ...] = ()
    top_dims: tuple[TopDim, ...] = ()
    massive_layers: tuple[int, ...] = ()
    persist_until: int | None = None
    precursors: tuple[Precursor, ...] = ()
    sink: tuple[float | None, ...] = ()  # per decoder layer
    sink_rate: tuple[float | None, ...] = ()  # per decoder layer
    ffn_neurons: tuple[FfnNeuron, ...] = ()
    dims_attribution: tuple[DimAttribution, ...] = ()
    norm: NormInfo | None = field(default=None, metadata={"none_as": {}})  # {} in JSON: no attribution
    selector_threshold: float | None = None
    sink_after_me: float | None = None
    qk_norm: bool = False
    selector_layers: tuple[SelectorLayer, ...] = ()
    sink_dims: tuple[LayerSinkDims, ...] = ()
    ordinary_mean: tuple[OrdinaryMean, ...] = ()
    sink_dims_overlap: float | None = None
    sink_dims_k: int | None = None
    layers: tuple[LayerRecord, ...] = ()

    json_fix: ClassVar[str] = FIX

    @classmethod
    def json_check(cls, data: object, need: Need | None, path: str) -> None:
        """A scan result of this schema, its references checked beyond the types (sizes, layers, dims)."""
        if need is None:
            return
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            at = f"{path} is " if path else ""
            raise UserError(f"{need.where}: {at}not a melsurgery scan result (schema_version {SCHEMA_VERSION})")
        _check_references(data, need, path)

    @classmethod
    def build(cls, data: dict) -> ScanResult:
        """The typed result of figures computed in this process (scan.build_result): no user input to check."""
        return load(cls, data, "", None)

    def write(self, path: Path) -> None:
        """Write as JSON (non-finite figures as null); an unwritable path is a one-line user error."""
        write_json(self.to_json(), path)

    @classmethod
    def read(cls, path: Path) -> ScanResult:
        """A scan result written by `scan --json`, every field checked before anything uses it."""
        text = read_text(path, "scan JSON", MAX_JSON)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"{path}: cannot read scan JSON ({exc})") from None
        return cls.from_json(data, str(path))


def write_json(data: dict, path: Path) -> None:
    """Write a JSON-ready dict (non-finite figures as null); an unwritable path is a one-line user error."""
    from melsurgery.checkpoint.atomic import write_atomic
    from melsurgery.formats.jsonsafe import dumps

    write_atomic(path, dumps(data, indent=1) + "\n")


def _check_references(data: dict, need: Need, path: str) -> None:
    """The checks beyond types: sizes positive, layers and dims inside the model, dims present with a layer."""

    def at(key: str) -> str:
        return join(path, key)

    model = data.get("model")
    need(isinstance(model, dict), at("model"), "an object", model)
    n, hidden = model.get("num_layers"), model.get("hidden_size")
    need(is_int(n, 1), at("model.num_layers"), "a positive integer", n)
    need(is_int(hidden, 1), at("model.hidden_size"), "a positive integer", hidden)
    me = data.get("me_layer")
    need(me is None or (is_int(me, 0) and me < n), at("me_layer"), f"null or a layer index 0-{n - 1}", me)

    def dims(key: str, value: object) -> None:
        need(isinstance(value, list) and all(is_int(d, 0) and d < hidden for d in value), at(key),
             f"a list of dims 0-{hidden - 1}", value)

    massive = data.get("massive_dims", [])
    dims("massive_dims", massive)
    top = data.get("top_dims", [])
    need(isinstance(top, list) and all(isinstance(t, dict) for t in top), at("top_dims"), "a list of objects", top)
    for k, t in enumerate(top):
        dims(f"top_dims[{k}].dim", [t.get("dim")])
        need(is_num(t.get("mean_abs")), at(f"top_dims[{k}].mean_abs"), "a finite number", t.get("mean_abs"))
    thr = data.get("selector_threshold")
    need(thr is None or (is_num(thr) and thr >= 0), at("selector_threshold"), "null or a finite number >= 0", thr)
    neurons = data.get("ffn_neurons", [])
    need(isinstance(neurons, list) and all(isinstance(x, dict) for x in neurons), at("ffn_neurons"),
         "a list of objects", neurons)
    for k, x in enumerate(neurons):
        need(is_int(x.get("neuron"), 0), at(f"ffn_neurons[{k}].neuron"), "an index >= 0", x.get("neuron"))
        need(x.get("expert") in (None, "shared") or is_int(x.get("expert"), 0), at(f"ffn_neurons[{k}].expert"),
             "null, \"shared\" or an index >= 0", x.get("expert"))
    norm = data.get("norm") or {}
    need(isinstance(norm, dict), at("norm"), "an object", norm)
    mean = norm.get("ffn_norm_weight_mean")
    need(mean is None or is_num(mean), at("norm.ffn_norm_weight_mean"), "null or a finite number", mean)
    if me is not None:
        need(bool(massive), at("massive_dims"), "non-empty when me_layer is set", massive)
