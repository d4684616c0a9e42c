"""CUDA checks, run once on a GPU machine (not part of the test suite, which is CPU-only).

Builds planted models, then checks on the GPU: the streaming scan agrees with the CPU scan; patched
checkpoints (folded + wemask) load with melsurgery.load in fp32/bf16/fp16 and match the CPU logits;
KV-cache generation equals recomputation; verify runs. Prints a JSON summary (and writes it to $OUT).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run as a file (python scripts/gpu_check.py): the repository root makes tests.support importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import melsurgery
from melsurgery.checkpoint.source import resolve  # noqa: E402
from melsurgery.detect.scan import run_scan  # noqa: E402
from melsurgery.measure.verify import run_verify  # noqa: E402
from melsurgery.surgery.manifest import Manifest  # noqa: E402
from melsurgery.surgery.patch import run_patch  # noqa: E402
from tests.support.planted import make_tokenizer, planted_folder  # noqa: E402


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = planted_folder(tmp / "src", shards=2)
        t = time.perf_counter()
        cpu = run_scan(resolve(str(src)), device="cpu")
        out["scan_cpu_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gpu = run_scan(resolve(str(src)), device="cuda")
        out["scan_cuda_s"] = time.perf_counter() - t
        same = (cpu.me_layer, cpu.massive_dims, [n.neuron for n in cpu.ffn_neurons]) == (
            gpu.me_layer, gpu.massive_dims, [n.neuron for n in gpu.ffn_neurons])
        rel = max(abs(a.max_abs - b.max_abs) / a.max_abs for a, b in zip(cpu.layers, gpu.layers))
        out["scan_agrees"], out["scan_max_rel_diff"] = same, rel
        ok &= same and rel < 1e-3

        recipes = [("ffn-dampen", {"factor": 0.5}), ("wemask", {"layers": "after-me"})]
        run_patch(resolve(str(src)), tmp / "out", Manifest(model=str(src), recipes=recipes), scan=cpu)
        tok = make_tokenizer()
        ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
        ref, _ = melsurgery.load(tmp / "out")
        with torch.no_grad():
            ref_logits = ref(ids).logits
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model, _ = melsurgery.load(tmp / "out", device="cuda", dtype=dtype)
            with torch.no_grad():
                logits = model(ids.cuda()).logits.float().cpu()
            err = float((logits - ref_logits).abs().max())
            name = str(dtype).removeprefix("torch.")
            out[f"logits_max_err_{name}"] = err
            finite = bool(torch.isfinite(logits).all())
            ok &= finite and err < (1e-3 if dtype == torch.float32 else 0.5)
            gen = model.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=8,
                                 do_sample=False)
            seq = ids.cuda()
            with torch.no_grad():
                for _ in range(8):
                    nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
                    seq = torch.cat([seq, nxt], 1)
            out[f"kv_generation_equals_recompute_{name}"] = bool(torch.equal(gen, seq))
            if dtype == torch.float32:
                ok &= bool(torch.equal(gen, seq))
        t = time.perf_counter()
        v = run_verify(src, tmp / "out", device="cuda", max_windows=2, max_tokens=128, generations=1,
                       max_new_tokens=8).to_json()
        out["verify_cuda_s"] = time.perf_counter() - t
        out["verify_kl_mean"], out["verify_matches_provenance"] = v["kl_mean"], v["weights"]["matches_provenance"]
        ok &= v["weights"]["matches_provenance"] is True and v["kl_mean"] > 0
    out["ok"] = ok
    text = json.dumps(out, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
