"""`scan`: calibrate, detect, and assemble the documented JSON result."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from melsurgery.architectures import Family
from melsurgery.calibrate.samples import CalibrationSpec, read_records, tokenize
from melsurgery.calibrate.stats import Sample, Stats
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import load_tokenizer
from melsurgery.checkpoint.source import Source
from melsurgery.checkpoint.validate import nonfinite, open_model, refuse_custom_layer
from melsurgery.detect import attn_input
from melsurgery.detect.ffn_attribution import ScanProbe, attribute
from melsurgery.detect.me_layer import Detection, detect, entry_dict
from melsurgery.detect.scan_result import SCHEMA_VERSION, ScanResult
from melsurgery.detect.scan_result import write_json as write_dict
from melsurgery.errors import UserError
from melsurgery.formats.typed import JsonRecord
from melsurgery.formats.wording import count
from melsurgery.measure.definitions import layer_stats, top_k_for
from melsurgery.measure.probes import Probe
from melsurgery.params import DetectParams
from melsurgery.version import __version__

JSON_TOP = 16


ADAPTIVE_START = 4  # samples in the first round of an adaptive calibration; each round doubles


def run_scan(
    source: Source,
    calib: CalibrationSpec | None = None,
    params: DetectParams | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    progress: bool = False,
) -> ScanResult:
    """Scan a model and return its typed result (docs/commands/scan.md, "Scan JSON"); dtype None: the checkpoint's."""
    calib = calib or CalibrationSpec()
    params = params or DetectParams()
    check_scan_params(calib, params)
    ckpt, family = open_model(source.folder)
    refuse_custom_layer(ckpt, "scan")
    dtype = dtype or ckpt.float_dtype
    tokenizer = load_tokenizer(source.folder)
    records, calib_name = read_records(calib.path)
    start = time.perf_counter()

    def measure(samples: list) -> tuple[Stats, Detection]:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(ckpt.config.get("num_hidden_layers", 0)),
                       desc=f"scan ({count(len(samples), 'sample')})",
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
    return build_result(source, family.name, stats, det, params, calib, calib_name, time.perf_counter() - start,
                        qk_norm=family.qk_norm, adaptive=adaptive, dtype=str(dtype).removeprefix("torch."))


def calibrate(
    ckpt: Checkpoint,
    family: Family,
    samples: list[Sample],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    top_k: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Stats:
    """The scan's pass: per-layer statistics of the residual stream and who wrote its large entries,
    streaming the model layer by layer."""
    model = StreamingModel(ckpt, family, device, dtype)
    k = top_k or top_k_for(len(samples))
    stream = Stream(model.embed([s.ids for s in samples]))
    stats = Stats(samples=samples, num_layers=model.num_layers, hidden_size=stream.states[0].shape[-1])
    stats.layers.append(layer_stats(-1, stream.states, k))

    def observe(i: int, _: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor], probe: Probe) -> None:
        _check_outputs(outputs, i, dtype)
        entry = layer_stats(i, outputs, k, probe.key_attention if probe.attends else None)
        entry.mixer = model.mixers[i].kind
        entry.attribution = attribute(probe.layer, family, inputs, outputs, probe, entry)  # type: ignore[arg-type]
        entry.attn_input = probe.attn_input.record if probe.attn_input else None  # type: ignore[attr-defined]
        stats.layers.append(entry)

    def probe(layer: nn.Module) -> ScanProbe:  # the median of the residual entering the layer: the last state's
        return ScanProbe(layer, family, stats.layers[-1].median_abs)

    run_layers(model, [stream], probe=probe, observe=observe, progress=progress)
    return stats


def _check_outputs(states: list[torch.Tensor], i: int, dtype: torch.dtype) -> None:
    """Finite weights can still overflow (fp16): say so, rather than detect on NaN statistics."""
    bad = sum(nonfinite(h) for h in states)
    if bad:
        hint = "; scan with --dtype float32" if dtype != torch.float32 else ""
        raise UserError(f"layer {i} produced {bad} non-finite activations (NaN or Inf) on the calibration text "
                        f"in {str(dtype).removeprefix('torch.')}, although its weights are finite{hint}")


FIRST_POSITION = "[position 0]"


def _massive_kinds(det: Detection) -> list[str]:
    """The kinds of massive token: the first position whatever its text (without a BOS token the first word
    of every sample is massive, and a new sample brings a new word), elsewhere the token's text (a
    delimiter is massive wherever it falls)."""
    return sorted({FIRST_POSITION if t["pos"] == 0 else t["token"] for t in det.token_summary})


def _signature(det: Detection) -> tuple:
    """What an adaptive calibration must pin down: the ME Layer, its dims, and which kinds of token are massive."""
    return det.me_layer, frozenset(det.massive_dims), frozenset(_massive_kinds(det))


def _adaptive(records: list[dict], seed: int, measure) -> tuple[Stats, Detection, dict]:
    """Calibrate on 4, 8, 16, ... samples (prefixes of one seeded order) until two rounds in a row
    find the same ME Layer, massive dims and massive tokens, or every sample is used."""
    order = random.Random(seed).sample(records, len(records))
    n, rounds, previous = min(ADAPTIVE_START, len(order)), [], None
    while True:
        stats, det = measure(order[:n])
        rounds.append({"samples": len(stats.samples), "me_layer": det.me_layer, "massive_dims": det.massive_dims,
                       "tokens": _massive_kinds(det)})
        if previous is not None and _signature(det) == previous:
            reason = (f"ME Layer, massive dims and massive tokens unchanged from {rounds[-2]['samples']} to "
                      f"{count(rounds[-1]['samples'], 'sample')}")
            break
        if n >= len(order):
            reason = f"all {count(len(order), 'sample')} used: the detection " + (
                "still changed in the last round" if previous is not None else "needs them all")
            break
        previous, n = _signature(det), min(2 * n, len(order))
        del stats, det  # not held while the next round measures
    return stats, det, {"rounds": rounds, "reason": reason}


def check_scan_params(calib: CalibrationSpec, params: DetectParams) -> None:
    """Calibration and detection settings as declared (recipes/params.py): finite, in range, right type."""
    from melsurgery.params import CALIBRATION, DETECTION
    from melsurgery.params import resolve as resolve_params

    resolve_params("detection", DETECTION, asdict(params), strict=True)
    resolve_params("calibration", CALIBRATION, {k: v for k, v in asdict(calib).items() if k != "path"}, strict=True)


def build_result(
    source: Source, family: str, stats: Stats, det: Detection, params: DetectParams, calib: CalibrationSpec,
    calib_name: str, seconds: float, qk_norm: bool = False, adaptive: dict | None = None, dtype: str | None = None,
) -> ScanResult:
    """The scan result (schema_version 1) from the statistics and the detection; `adaptive`: the rounds of an
    adaptive calibration, `dtype`: the compute dtype."""
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
    return ScanResult.build({
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
            "adaptive": adaptive,
            "dtype": dtype,
        },
        "params": asdict(params),
        **det.to_dict(),
        "sink_after_me": sum(after) / len(after) if after else None,
        "qk_norm": qk_norm,
        **per_layer,
        "layers": layers,
    })


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def write_json(result: JsonRecord | dict, path: Path) -> None:
    """Write a scan result (or another command's result, typed or JSON-ready) as JSON, non-finite figures as
    null."""
    write_dict(result.to_json() if isinstance(result, JsonRecord) else result, path)


def read_json(path: Path) -> ScanResult:
    """A scan result written by `scan --json`, its fields checked before anything uses them."""
    return ScanResult.read(path)
