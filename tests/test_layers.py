"""The layering the README's Layout promises: contracts without torch, an engine without measurement."""

import subprocess
import sys

import pytest

TORCH_FREE = ["stats", "samples", "scan_result", "provenance", "edits", "typed", "outputs", "manifest", "recipes",
              "card", "report", "hubmeta", "textfile", "yamlsafe"]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, melsurgery.{module}; print(' '.join(sorted(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


@pytest.mark.parametrize("module", TORCH_FREE)
def test_contract_modules_import_without_torch(module: str) -> None:
    loaded = _modules_after_import(module)
    assert f"melsurgery.{module}" in loaded
    assert "torch" not in loaded


def test_the_streaming_engine_knows_nothing_of_measurement() -> None:
    loaded = {m for m in _modules_after_import("streaming") if m.startswith("melsurgery.")}
    measuring = {"measure", "probes", "detect", "ffn_attribution", "attn_input", "scan", "verify", "tune", "stats"}
    assert loaded & {f"melsurgery.{m}" for m in measuring} == set()


# tensor and module names of the supported families: they belong in melsurgery/architectures.py only
FAMILY_NAMES = ("rotary_emb", "gate_up_proj", "down_proj", "up_proj", "gate_proj", "act_fn", "variance_epsilon",
                "lm_head", "layernorm", "self_attn", "embed_tokens", "model.layers", "q_proj", "k_proj", "v_proj",
                "o_proj", "mlp.", "block_sparse_moe", "experts.", "shared_expert")
# the same names as attributes of a module (`layer.mlp.down_proj`); the family entry's own fields
# (`family.experts`, `family.lm_head`) are how the rest of the code asks for them
MODULE_ATTRS = {"rotary_emb", "gate_up_proj", "down_proj", "up_proj", "gate_proj", "act_fn", "variance_epsilon",
                "self_attn", "mlp", "embed_tokens", "input_layernorm", "post_attention_layernorm", "q_proj", "k_proj",
                "v_proj", "o_proj", "block_sparse_moe", "shared_expert"}


def _name_leaks(source: str) -> list[str]:
    """Strings (not docstrings) and attribute accesses in `source` that spell a family's tensor or module name."""
    import ast

    tree = ast.parse(source)
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    leaks = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            leaks += [f"line {node.lineno}: {name}" for name in FAMILY_NAMES if name in node.value]
        elif isinstance(node, ast.Attribute) and node.attr in MODULE_ATTRS:
            leaks.append(f"line {node.lineno}: .{node.attr}")
    return leaks


def test_tensor_and_module_names_live_in_the_architecture_entry() -> None:
    from pathlib import Path

    import melsurgery

    root = Path(melsurgery.__file__).parent
    # the custom layer ships verbatim into checkpoints and cannot import the package
    files = [f for f in sorted(root.rglob("*.py")) if f.name != "architectures.py" and "modeling" not in f.parts]
    assert len(files) > 40
    leaks = {str(f.relative_to(root)): found for f in files if (found := _name_leaks(f.read_text()))}
    assert leaks == {}
    assert _name_leaks('w = layer.mlp.down_proj.weight\nname = "model.layers.3.self_attn.q_proj.weight"\n')
