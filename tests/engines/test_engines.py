"""Patched or refused, never silently unpatched: the refusals that need no vLLM (docs/engines.md).

A token-selective patch declares model type "melsurgery" and architecture "Melsurgery<Base>": transformers
without remote code refuses it, with remote code (or melsurgery.load) it runs the custom layer, and a
damaged spec fails at load with one line in transformers and in melsurgery. The vLLM rows of the table
are tested against a real vLLM in tests/engines (make test-engines).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import melsurgery
from melsurgery.architectures import base_config, family_for
from melsurgery.engines import modeling_melsurgery as shipped
from melsurgery.errors import UserError
from tests.support.helpers import assert_clean_failure, patch, run_cli

IDS = torch.tensor([[1, 5, 17, 3, 9, 11, 4, 8, 21, 13]])  # BOS first: the planted massive token


@pytest.fixture(scope="module")
def patched(planted, planted_scan, tmp_path_factory):
    """The planted model with a wemask patch (every layer after the ME Layer) and a folded ffn-dampen patch."""
    root = tmp_path_factory.mktemp("engines")
    patch(planted, root / "wemask", [("wemask", {"layers": "after-me"})], planted_scan)
    patch(planted, root / "folded", [("ffn-dampen", {})], planted_scan)
    return root / "wemask", root / "folded"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_a_wemask_patch_declares_an_architecture_no_stock_engine_knows(patched, planted):
    wemask, folded = patched
    config = json.loads((wemask / "config.json").read_text())
    base = json.loads((planted / "config.json").read_text())
    assert config["model_type"] == "melsurgery" and config["architectures"] == ["MelsurgeryLlamaForCausalLM"]
    assert config["melsurgery_base"] == {"model_type": "llama", "architectures": base["architectures"]}
    assert base_config(config) == {k: v for k, v in {**config, "model_type": "llama",
                                                      "architectures": base["architectures"]}.items()
                                   if k not in ("melsurgery_base", "auto_map")}
    assert family_for(config) == family_for(base)
    assert json.loads((folded / "config.json").read_text()) == base  # folded: a stock checkpoint, byte for byte


@pytest.mark.parametrize("trust", [None, False])
def test_transformers_without_remote_code_refuses_the_wemask_patch(patched, trust):
    """Not passing trust_remote_code (a non-interactive run) or passing False: transformers' own refusal."""
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    with pytest.raises(ValueError, match=r"(?s)contains custom code which must be executed.*trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(patched[0], **kwargs)


def test_a_config_read_with_remote_code_does_not_open_the_stock_class(patched):
    """The remote config is the base config class under a name of its own: handing it to AutoModel without
    remote code is refused too, instead of building the stock model."""
    config = AutoConfig.from_pretrained(patched[0], trust_remote_code=True)
    assert type(config).__name__ == "MelsurgeryLlamaConfig" and config.model_type == "llama"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(patched[0], config=config, trust_remote_code=False)


def test_remote_code_and_melsurgery_load_run_the_same_patch(patched, planted, tmp_path):
    wemask, folded = patched
    remote = AutoModelForCausalLM.from_pretrained(wemask, trust_remote_code=True, dtype=torch.float32).eval()
    ours, _ = melsurgery.load(wemask)
    base, _ = melsurgery.load(planted)
    assert torch.equal(logits(remote), logits(ours))
    assert not torch.allclose(logits(ours), logits(base))  # the mask is really applied
    assert len(remote._melsurgery_hooks) == len(ours._melsurgery_hooks) > 0
    stock = AutoModelForCausalLM.from_pretrained(folded, dtype=torch.float32).eval()  # folded: no remote code
    assert torch.equal(logits(stock), logits(melsurgery.load(folded)[0]))
    remote.save_pretrained(tmp_path / "resaved")  # a re-saved copy still declares itself, so it is still refused
    again = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert (again["model_type"], again["architectures"]) == ("melsurgery", ["MelsurgeryLlamaForCausalLM"])


def test_melsurgery_load_uses_the_installed_layer_not_the_folder_copy(patched, tmp_path):
    """A modeling file in the folder is never imported by melsurgery: a broken one changes nothing."""
    folder = tmp_path / "w"
    shutil.copytree(patched[0], folder)
    (folder / "modeling_melsurgery.py").write_text("raise RuntimeError('the folder copy was imported')\n")
    model, _ = melsurgery.load(folder)
    assert torch.equal(logits(model), logits(melsurgery.load(patched[0])[0]))


def _spec(c):
    return c["melsurgery_wemask"]


def _first(c):
    return _spec(c)["per_layer"][0]


# (what is damaged, how, the one line each engine gives)
TAMPERED = [
    ("dim out of range", lambda c: _first(c).update(dims=[10**6]), "dims [1000000] of layer"),
    ("dim of the wrong type", lambda c: _first(c).update(dims=["17"]), "dims ['17'] of layer"),
    ("layer out of range", lambda c: _first(c).update(layer=99), "layer 99 is not a layer of this model"),
    ("strength as text", lambda c: _first(c).update(strength="1"), "strength '1' of layer"),
    ("no threshold", lambda c: _first(c).update(threshold=None), "threshold None of layer"),
    ("unknown selector", lambda c: _spec(c).update(selector="every"), "selector 'every' is not one of"),
    ("no layers", lambda c: _spec(c).update(per_layer=[]), "per_layer must be a non-empty list"),
    ("no spec", lambda c: c.pop("melsurgery_wemask"), "declares model type 'melsurgery' but has no"),
    ("unknown base", lambda c: c["melsurgery_base"].update(model_type="llama9"), "base model type 'llama9'"),
    ("no base record", lambda c: c.pop("melsurgery_base"), "needs melsurgery_base"),
]


@pytest.fixture
def tampered(patched, tmp_path, request):
    _, damage, message = request.param
    folder = tmp_path / "tampered"
    shutil.copytree(patched[0], folder)
    config = json.loads((folder / "config.json").read_text())
    damage(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, message


@pytest.mark.parametrize("tampered", TAMPERED, indirect=True, ids=[t[0] for t in TAMPERED])
def test_a_damaged_spec_fails_at_load_in_transformers_and_in_melsurgery(tampered):
    folder, message = tampered
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        melsurgery.load(folder)


@pytest.mark.parametrize(("tampered", "needle"), [(TAMPERED[0], "dims [1000000] of layer 4 must be dims 0-63"),
                                                  (TAMPERED[-2], "unsupported architecture 'llama9'"),
                                                  (TAMPERED[-1], "needs melsurgery_base")],
                         indirect=["tampered"], ids=["dims", "base", "record"])
@pytest.mark.slow
def test_a_damaged_spec_is_one_line_from_the_cli(planted, tampered, needle):
    res = run_cli("verify", planted, tampered[0], "--windows", "1", "--max-tokens", "16", "--generations", "0",
                  "--quiet")
    assert_clean_failure(res, needle, code=2)


@pytest.mark.slow
def test_scan_and_patch_refuse_a_checkpoint_with_a_custom_layer(patched, tmp_path):
    """scan and patch read plain weights: a wemask patch would be measured as its base, so it is refused."""
    for args in (("scan", patched[0]), ("patch", patched[0], "-o", tmp_path / "x", "--recipe", "ffn-dampen")):
        assert_clean_failure(run_cli(*args, "--quiet"), "custom layer", "give its base model", code=2)
    assert not (tmp_path / "x").exists()


def test_the_shipped_contract_matches_the_package():
    """The custom layer ships verbatim and cannot import melsurgery: it spells the same keys."""
    from melsurgery import architectures as a

    assert (shipped.MODEL_TYPE, shipped.ARCH_PREFIX, shipped.BASE_KEY, shipped.CONFIG_KEY) == \
        (a.PATCHED_MODEL_TYPE, a.PATCHED_ARCH_PREFIX, a.BASE_KEY, a.WEMASK_KEY)


@pytest.mark.slow
def test_importing_melsurgery_never_imports_vllm():
    import subprocess
    import sys

    code = ("import sys, melsurgery, melsurgery.engines.loading, melsurgery.engines.vllm_plugin, "
            "melsurgery.engines.vllm_serve; print('vllm' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "False", res.stderr


@pytest.mark.slow
def test_verify_engine_vllm_without_vllm_is_one_line(planted, patched):
    """`verify --engine vllm` where vLLM is not installed (the default test environment): one line, exit 6, before
    anything is measured. With vLLM installed, tests/engines runs it for real."""
    from melsurgery.engines.vllm_serve import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed in this Python: tests/engines runs verify --engine vllm against it")
    res = run_cli("verify", planted, patched[0], "--engine", "vllm", "--quiet")
    assert_clean_failure(res, "--engine vllm: vLLM is not installed in this Python", "pip install vllm", code=6)
