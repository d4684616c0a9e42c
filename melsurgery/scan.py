"""`scan`: calibrate, detect, and assemble the documented JSON result."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__, attn_input
from .calibrate import Stats, calibrate
from .checkpoint.source import Source
from .checkpoint.validate import open_model
from .detect import Detection, DetectParams, detect, entry_dict
from .errors import UserError
from .samples import load_tokenizer, read_records, tokenize

SCHEMA_VERSION = 1
JSON_TOP = 16


ADAPTIVE_START = 4  # samples in the first round of an adaptive calibration; each round doubles


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration text, how much of it. `num_samples`: a count, None for all, or "auto" (adaptive)."""

    path: Path | None = None
    num_samples: int | str | None = None
    max_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        n = self.num_samples
        if not (n is None or n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)):
            raise UserError(f"calibration num_samples {n!r}: a positive number, or 'auto'")


def run_scan(
    source: Source,
    calib: CalibrationSpec | None = None,
    params: DetectParams | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    progress: bool = False,
) -> dict:
    """Scan a model and return the JSON-ready result (see README, "scan JSON"); dtype None: the checkpoint's."""
    calib = calib or CalibrationSpec()
    params = params or DetectParams()
    check_scan_params(calib, params)
    ckpt, family = open_model(source.folder)
    dtype = dtype or ckpt.float_dtype
    tokenizer = load_tokenizer(source.folder)
    records, calib_name = read_records(calib.path)
    start = time.perf_counter()

    def measure(samples: list) -> tuple[Stats, Detection]:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(ckpt.config.get("num_hidden_layers", 0)), desc=f"scan ({len(samples)} samples)",
                       unit="layer", leave=False)
        try:
            stats = calibrate(ckpt, family, samples, device=device, dtype=dtype,
                              progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        return stats, detect(stats, params)

    def sample(recs: list[dict], n: int | None) -> list:
        return tokenize(recs, tokenizer, num_samples=n, max_tokens=calib.max_tokens, seed=calib.seed)

    adaptive = None
    if calib.num_samples == "auto":
        stats, det, adaptive = _adaptive(records, calib.seed, lambda recs: measure(sample(recs, None)))
    else:
        stats, det = measure(sample(records, calib.num_samples))  # type: ignore[arg-type]
    result = build_result(source, family.name, stats, det, params, calib, calib_name, time.perf_counter() - start,
                          qk_norm=family.qk_norm)
    result["calibration"].update(adaptive=adaptive, dtype=str(dtype).removeprefix("torch."))
    return result


def _signature(det: Detection) -> tuple:
    """What an adaptive calibration must pin down: the ME Layer, its dims, and which tokens are massive."""
    return det.me_layer, frozenset(det.massive_dims), frozenset((t["pos"], t["token"]) for t in det.token_summary)


def _adaptive(records: list[dict], seed: int, measure) -> tuple[Stats, Detection, dict]:
    """Calibrate on 4, 8, 16, ... samples (prefixes of one seeded order) until two rounds in a row
    find the same ME Layer, massive dims and massive tokens, or every sample is used."""
    order = random.Random(seed).sample(records, len(records))
    n, rounds, previous = min(ADAPTIVE_START, len(order)), [], None
    while True:
        stats, det = measure(order[:n])
        rounds.append({"samples": len(stats.samples), "me_layer": det.me_layer, "massive_dims": det.massive_dims,
                       "tokens": sorted({t["token"] for t in det.token_summary})})
        if previous is not None and _signature(det) == previous:
            reason = (f"ME Layer, massive dims and massive tokens unchanged from {rounds[-2]['samples']} to "
                      f"{rounds[-1]['samples']} samples")
            break
        if n >= len(order):
            reason = f"all {len(order)} samples used: the detection " + (
                "still changed in the last round" if previous is not None else "needs them all")
            break
        previous, n = _signature(det), min(2 * n, len(order))
    return stats, det, {"rounds": rounds, "reason": reason}


def check_scan_params(calib: CalibrationSpec, params: DetectParams) -> None:
    """Calibration and detection settings as declared (recipes/params.py): finite, in range, right type."""
    from .recipes.params import CALIBRATION, DETECTION
    from .recipes.params import resolve as resolve_params

    resolve_params("detection", DETECTION, asdict(params), strict=True)
    resolve_params("calibration", CALIBRATION, {k: v for k, v in asdict(calib).items() if k != "path"}, strict=True)


def build_result(
    source: Source, family: str, stats: Stats, det: Detection, params: DetectParams, calib: CalibrationSpec,
    calib_name: str, seconds: float, qk_norm: bool = False,
) -> dict:
    """The scan JSON (schema_version 1) from the statistics and the detection."""
    layers = []
    massive = set(det.massive_layers)
    for layer in stats.layers:
        inside = 0 <= layer.index < len(det.sink)
        sink = det.sink[layer.index] if inside else None
        layers.append({
            "layer": layer.index,
            "name": "embeddings" if layer.index < 0 else f"layer {layer.index}",
            "mixer": layer.mixer,
            "max_abs": layer.max_abs,
            "median_abs": layer.median_abs,
            "ratio": _finite(layer.ratio),
            "massive": layer.index in massive,
            "sink": sink,
            "sink_rate": det.sink_rate[layer.index] if inside else None,
            "top": [entry_dict(e, stats) for e in layer.top[:JSON_TOP]],
        })
    after = [s for s in det.sink[det.me_layer + 1 :] if s is not None] if det.me_layer is not None else []
    tokens = [(t["sample"], t["pos"]) for t in det.massive_tokens]
    per_layer = attn_input.figures(stats, det.me_layer, tokens, det.massive_dims, [d["dim"] for d in det.top_dims])
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": f"melsurgery {__version__}",
        "model": {
            "id": source.id,
            "folder": str(source.folder),
            "kind": source.kind,
            "revision": source.revision,
            "family": family,
            "num_layers": stats.num_layers,
            "hidden_size": stats.hidden_size,
        },
        "calibration": {
            "source": calib_name,
            "num_samples": len(stats.samples),
            "max_tokens": calib.max_tokens,
            "seed": calib.seed,
            "tokens": sum(len(s.ids) for s in stats.samples),
            "seconds": round(seconds, 3),
        },
        "params": asdict(params),
        **det.to_dict(),
        "sink_after_me": sum(after) / len(after) if after else None,
        "qk_norm": qk_norm,
        **per_layer,
        "layers": layers,
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def write_json(result: dict, path: Path) -> None:
    """Write a result as JSON (non-finite figures as null); an unwritable path is a one-line user error."""
    from .jsonsafe import dumps

    try:
        Path(path).write_text(dumps(result, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None


def read_json(path: Path) -> dict:
    """A scan result written by `scan --json`, its fields checked (ScanResult) before anything uses them."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: cannot read scan JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: not a melsurgery scan result (schema_version {SCHEMA_VERSION})")
    ScanResult.from_dict(data, str(path))
    return data


def _is_int(x: object, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_num(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ScanResult:
    """The fields of a scan JSON that patch, the recipes and the model card rely on, typed and checked.

    The JSON schema itself (README, "Scan JSON") is unchanged; this is its reader's contract.
    """

    num_layers: int
    hidden_size: int
    me_layer: int | None
    massive_dims: tuple[int, ...]
    top_dims: tuple[tuple[int, float], ...]
    selector_threshold: float | None
    ffn_neurons: tuple[tuple[int | None, int], ...]
    ffn_norm_weight_mean: float | None

    @classmethod
    def from_dict(cls, data: dict, where: str) -> ScanResult:
        """Check every field (one message naming the field and what it should be), then build."""
        from .errors import UserError

        def need(ok: bool, field: str, want: str, value: object) -> None:
            if not ok:
                raise UserError(f"{where}: {field} must be {want}, got {value!r:.60}; rerun `melsurgery scan --json`")

        model = data.get("model")
        need(isinstance(model, dict), "model", "an object", model)
        n, hidden = model.get("num_layers"), model.get("hidden_size")
        need(_is_int(n, 1), "model.num_layers", "a positive integer", n)
        need(_is_int(hidden, 1), "model.hidden_size", "a positive integer", hidden)
        me = data.get("me_layer")
        need(me is None or (_is_int(me) and me < n), "me_layer", f"null or a layer index 0-{n - 1}", me)

        def dim_list(field: str, value: object) -> tuple[int, ...]:
            need(isinstance(value, list) and all(_is_int(d) and d < hidden for d in value), field,
                 f"a list of dims 0-{hidden - 1}", value)
            return tuple(value)  # type: ignore[arg-type]

        dims = dim_list("massive_dims", data.get("massive_dims", []))
        top = data.get("top_dims", [])
        need(isinstance(top, list) and all(isinstance(t, dict) for t in top), "top_dims", "a list of objects", top)
        for k, t in enumerate(top):
            dim_list(f"top_dims[{k}].dim", [t.get("dim")])
            need(_is_num(t.get("mean_abs")), f"top_dims[{k}].mean_abs", "a finite number", t.get("mean_abs"))
        thr = data.get("selector_threshold")
        need(thr is None or (_is_num(thr) and thr >= 0), "selector_threshold", "null or a finite number >= 0", thr)
        neurons = data.get("ffn_neurons", [])
        need(isinstance(neurons, list) and all(isinstance(x, dict) for x in neurons), "ffn_neurons",
             "a list of objects", neurons)
        for k, x in enumerate(neurons):
            need(_is_int(x.get("neuron")), f"ffn_neurons[{k}].neuron", "an index >= 0", x.get("neuron"))
            need(x.get("expert") in (None, "shared") or _is_int(x.get("expert")), f"ffn_neurons[{k}].expert",
                 "null, \"shared\" or an index >= 0", x.get("expert"))
        norm = data.get("norm") or {}
        need(isinstance(norm, dict), "norm", "an object", norm)
        mean = norm.get("ffn_norm_weight_mean")
        need(mean is None or _is_num(mean), "norm.ffn_norm_weight_mean", "null or a finite number", mean)
        if me is not None:
            need(bool(dims), "massive_dims", "non-empty when me_layer is set", dims)
        return cls(n, hidden, me, dims, tuple((t["dim"], float(t["mean_abs"])) for t in top),
                   None if thr is None else float(thr),
                   tuple((x.get("expert"), x["neuron"]) for x in neurons), None if mean is None else float(mean))
