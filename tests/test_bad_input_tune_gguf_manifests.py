"""Bad input to tune, adaptive calibration files, GGUF in and out, manifests and cards.

Each case failed before its fix (a traceback, a hang, a silently ignored setting, a write into the source,
or a refusal that came only after the expensive work). What a user must see is what
tests/test_bad_input_cli.py checks: one `melsurgery: error:` line, exit status 2, no output, the source untouched.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from melsurgery.errors import UserError
from tests.support.helpers import assert_clean_failure, run_cli, snapshot
from tests.test_bad_input_cli import bomb, cli_all, copy_model, strict_json

TEXT = "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer the slings.\n"
TUNE = ("--max-tokens", "16", "--windows", "1", "--trials", "1", "--quiet")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder of hostile inputs: a FIFO, a link to /dev/zero, an empty text, a text, a scan of a wider model."""
    root = tmp_path_factory.mktemp("hostile3")
    os.mkfifo(root / "fifo.txt")
    (root / "zero.txt").symlink_to("/dev/zero")
    (root / "empty.txt").write_text(" \n\n")
    (root / "text.txt").write_text(TEXT)
    return root


def wider_scan(sharded, folder: Path) -> Path:
    data = json.loads(sharded[1].read_text())
    data["model"]["hidden_size"] = 128
    path = folder / "scan-128.json"
    path.write_text(json.dumps(data))
    return path


# --- tune ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tune_refuses_before_any_work(sharded, files, tmp_path):
    """Each of these ran (or crashed) before: a negative or 33-bit seed (numpy's traceback), a RUN_DIR inside
    the model folder (written into the source), --apply equal to or holding RUN_DIR (refused only after the
    whole study), a scan of another model (tuned anyway), an empty text (tuned on one token), a FIFO text
    (hung)."""
    src = copy_model(sharded, tmp_path, "src")
    before = snapshot(src)
    run = tmp_path / "run"
    common = ("--scan", sharded[1], "--text", files / "text.txt", *TUNE)
    cases = [
        (("tune", src, "-o", run, "--seed", "-1", *common), "--seed -1: must lie in [0, 4294967295]"),
        (("tune", src, "-o", run, "--seed", str(2**32), *common), "must lie in [0, 4294967295]"),
        (("tune", src, "-o", src / "run", *common), "is inside the source model folder"),
        (("tune", src, "-o", run, "--apply", run, *common), "is the run folder"),
        (("tune", src, "-o", run / "study", "--apply", run, *common), "holds the run folder"),
        (("tune", src, "-o", run, "--scan", wider_scan(sharded, tmp_path), "--text", files / "text.txt", *TUNE),
         "the --scan result is for a model with 128 hidden size, this one has 64"),
        (("tune", src, "-o", run, "--scan", sharded[1], "--text", files / "empty.txt", *TUNE),
         "the evaluation text is empty"),
        (("tune", src, "-o", run, "--scan", sharded[1], "--text", files / "fifo.txt", *TUNE),
         "cannot read evaluation text (not a regular file: a FIFO)"),
    ]
    for res, (_, needle) in zip(cli_all(*[args for args, _ in cases]), cases):
        assert_clean_failure(res, needle, out=run, code=2)
    assert snapshot(src) == before


@pytest.mark.slow
def test_tune_refuses_a_base_model_whose_figures_are_not_finite(sharded, files, tmp_path):
    """Logits that overflow made every trial's KL NaN, and Optuna's NaN constraint a traceback."""
    broken = copy_model(sharded, tmp_path, "overflow")
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = broken / index["lm_head.weight"]
    state = load_file(shard)
    state["lm_head.weight"] = state["lm_head.weight"] * 3e38
    save_file(state, shard, metadata={"format": "pt"})
    res = run_cli("tune", broken, "-o", tmp_path / "run", "--scan", sharded[1], "--text", files / "text.txt", *TUNE)
    assert_clean_failure(res, "perplexity on the tuning text is not a finite number", code=2)


@pytest.mark.slow
def test_tune_seed_at_the_top_of_its_range_continues_and_writes_strict_json(sharded, files, tmp_path, monkeypatch):
    """--seed 2^32-1 is valid, and a continued study (the sampler is seeded with seed + trials done) does not
    overflow it; tune.json is strict JSON even when a figure is not finite."""
    from dataclasses import replace

    from melsurgery.search import tune

    run = tmp_path / "run"
    args = ("tune", sharded[0], "-o", run, "--scan", sharded[1], "--text", files / "text.txt", "--seed",
            str(2**32 - 1), "--max-kl", "10", *TUNE[:-3], "--quiet")
    first = run_cli(*args, "--trials", "1")
    assert first.returncode in (0, 4), first.stderr  # 4: the study ran and no trial cut the sink in budget
    second = run_cli(*args, "--trials", "2")
    assert second.returncode in (0, 4), second.stderr
    result = tune.TuneResult.read(run / "tune.json")
    assert len(result.trials) == 2
    broken = (replace(result.trials[0], figures=replace(result.trials[0].figures, ppl_patched=math.inf)),
              replace(result.trials[1], figures=replace(result.trials[1].figures, ratio_patched=math.nan)))
    monkeypatch.setattr("melsurgery.report.plot.plot_tune", lambda data, path: Path(path).write_bytes(b"png"))
    tune.write_outputs(run, replace(result, trials=broken), None)
    figures = strict_json((run / "tune.json").read_text())["trials"]
    assert figures[0]["figures"]["ppl_patched"] is None and figures[1]["figures"]["ratio_patched"] is None


# --- calibration, evaluation and scan files ---------------------------------------------------------------


@pytest.mark.slow
def test_named_files_must_be_plain_files(sharded, files, tmp_path):
    """A FIFO blocked every reader forever; /dev/zero filled memory until the kernel killed the process. (And a
    lone surrogate in a calibration line was a tokenizer traceback.)"""
    m, out = sharded[0], tmp_path / "out"
    surrogate = tmp_path / "c.jsonl"
    surrogate.write_text('{"text": "\\ud800x"}\n')
    cases = [
        (("scan", m, "--calib", surrogate, "--quiet"), "line 1 holds a lone surrogate escape"),
        (("scan", m, "--calib", files / "fifo.txt", "--quiet"), "cannot read calibration file (not a regular file: "
                                                                "a FIFO)"),
        (("scan", m, "--calib", files / "zero.txt", "--quiet"), "(not a regular file: a character device)"),
        (("patch", m, "-o", out, "--scan", files / "zero.txt", "--recipe", "wemask", "--quiet"),
         "cannot read scan JSON (not a regular file: a character device)"),
        (("verify", m, m, "--text", files / "fifo.txt", "--quiet"), "cannot read evaluation text (not a regular"),
    ]
    runs = cli_all(*[args for args, _ in cases])
    for res, (_, needle) in zip(runs, cases):
        assert_clean_failure(res, needle, out=out, code=2)


@pytest.mark.parametrize("line", ['{"text": "a\\ud800b"}', '{"messages": [{"role": "user", "content": "\\udfff"}]}'],
                         ids=["text", "messages"])
def test_calibration_lone_surrogates_are_refused(tmp_path, line):
    """A JSON escape of half a surrogate pair is not text: the tokenizer raised a TypeError traceback."""
    from melsurgery.calibrate.samples import read_records

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=r"line 2 holds a lone surrogate escape"):
        read_records(path)


# --- manifests ----------------------------------------------------------------------------------------------


def test_manifest_merge_keys_may_be_overridden(tmp_path):
    from melsurgery.surgery.manifest import load_manifest

    path = tmp_path / "m.yaml"
    path.write_text("detection: &d {ratio: 500.0}\ncalibration: {<<: {seed: 1, max_tokens: 64}, seed: 3}\n"
                    "recipes: [ffn-dampen]\n")
    man = load_manifest(path)
    assert (man.calibration.seed, man.calibration.max_tokens, man.detection.ratio) == (3, 64, 500.0)


@pytest.mark.slow
def test_manifest_and_model_argument(sharded, tmp_path, monkeypatch):
    """A manifest without `model` takes MODEL (it was refused as naming 'default'); one naming the same folder
    in another spelling is accepted; one naming another model is refused."""
    from melsurgery.surgery.manifest import load_manifest

    m = sharded[0]
    bare, named = tmp_path / "bare.yaml", tmp_path / "named.yaml"
    bare.write_text("recipes: [ffn-dampen]\n")
    named.write_text(f"model: {m}\nrecipes: [ffn-dampen]\n")
    monkeypatch.chdir(m.parent)
    assert load_manifest(bare, f"./{m.name}/").model == f"./{m.name}/"
    assert load_manifest(named, f"./{m.name}/").model == f"./{m.name}/"
    assert load_manifest(bare).model == "default"
    with pytest.raises(UserError, match=r"names model '.*', the command line 'other/model'; drop MODEL"):
        load_manifest(named, "other/model")
    out = tmp_path / "out"
    res = run_cli("patch", m, "--manifest", bare, "-o", out, "--scan", sharded[1], "--quiet")
    assert res.returncode == 0, res.stderr
    assert "ffn-dampen" in (out / "melsurgery-manifest.yaml").read_text()


@pytest.mark.parametrize("flag", [("--max-tokens", "9"), ("--num-samples", "1"), ("--seed", "4"),
                                  ("--calib", "c.txt"), ("--ratio", "10"), ("--revision", "main")],
                         ids=lambda f: f[0])
def test_manifest_refuses_settings_it_would_ignore(tmp_path, flag):
    """These were silently dropped: the manifest's calibration, detection and revision won."""
    from click.testing import CliRunner

    from melsurgery.cli import main

    path = tmp_path / "m.yaml"
    path.write_text(f"model: {tmp_path / 'nowhere'}\nrecipes: [ffn-dampen]\n")
    res = CliRunner().invoke(main, ["patch", "--manifest", str(path), "-o", str(tmp_path / "out"), *flag])
    assert res.exit_code == 2, res.output
    assert f"melsurgery: error: {flag[0]} conflicts with --manifest" in res.output
    assert not (tmp_path / "out").exists()


# --- model cards -------------------------------------------------------------------------------------------

CARDS = {
    "deep-nesting": ("tags: " + "[" * 5000 + "]" * 5000 + "\n", "the YAML front matter is nested too deeply"),
    "alias-bomb": (bomb().replace("recipes: [wemask]\n", ""), "expands to more than 100,000 values"),
    "duplicate-key": ("license: mit\nlicense: apache-2.0\n", "gives the key 'license' twice"),
}


@pytest.mark.parametrize("case", sorted(CARDS))
@pytest.mark.slow
def test_push_refuses_cards_whose_metadata_breaks_limits(tmp_path, case):
    """Deep nesting was a RecursionError traceback; the bomb and the repeated key were accepted and sent."""
    from melsurgery.hub.push import validate_for_push
    from tests.hub.test_push import make_output, write_provenance

    folder = make_output(tmp_path / "out")
    (folder / "README.md").write_text(f"---\n{CARDS[case][0]}---\n# Patched\n")
    write_provenance(folder)
    with pytest.raises(UserError) as err:
        validate_for_push(folder)
    assert CARDS[case][1] in str(err.value) and "\n" not in str(err.value)
    if case == "deep-nesting":
        assert_clean_failure(run_cli("push", folder, "me/model", "--dry-run"), CARDS[case][1], code=2)


# --- GGUF ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """The planted model as a GGUF (F32), the same with one NaN in the ME Layer's down projection, a truncated
    copy and a header cut short; each in its own folder, and a private conversion cache."""
    from tests.support.planted import build_model, llama_config
    from tests.support.planted_gguf import write_gguf

    root = tmp_path_factory.mktemp("gguf3")
    model = build_model(llama_config())
    for name in ("good", "nan", "bad"):
        (root / name).mkdir()
    good = write_gguf(model, root / "good" / "m.gguf")
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[17, 41] = float("nan")
    write_gguf(model, root / "nan" / "m.gguf")
    data = good.read_bytes()
    (root / "bad" / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (root / "bad" / "short-header.gguf").write_bytes(data[:100])
    return root, {"MELSURGERY_CACHE": str(root / "cache")}


@pytest.mark.slow
def test_corrupt_gguf_sources_are_refused_before_conversion(gguf, sharded, tmp_path):
    """Truncated files and cut headers reached transformers' loader (a reshape or struct traceback)."""
    root, env = gguf
    runs = cli_all(("scan", root / "bad" / "truncated.gguf", "--quiet"),
                   ("verify", sharded[0], root / "bad" / "short-header.gguf", "--quiet"))
    assert_clean_failure(runs[0], "truncated.gguf: tensor", "extends past the end of the file", code=2)
    assert_clean_failure(runs[1], "short-header.gguf: not a readable GGUF file", code=2)
    assert not (root / "cache").exists() or not list((root / "cache").rglob("config.json"))


def gguf_cli(env: dict, *runs: tuple) -> list:
    """cli_all with the private conversion cache."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: run_cli(*args, env=env), runs))


@pytest.mark.slow
def test_gguf_with_nan_is_named_after_the_file(gguf, sharded, tmp_path):
    """The error named the conversion cache folder, behind the loaders' progress bars (--quiet or not)."""
    root, env = gguf
    src = root / "nan" / "m.gguf"
    out = tmp_path / "out.gguf"
    scan, patch = gguf_cli(env, ("scan", src, "--quiet"),
                           ("patch", src, "-o", out, "--recipe", "ffn-dampen", "--scan", sharded[1], "--quiet"))
    assert_clean_failure(scan, f"{src}: tensor model.layers.3.mlp.down_proj.weight has 1 NaN", code=2)
    assert_clean_failure(patch, f"{src}: tensor", "1 NaN", out=out, code=2)


@pytest.mark.slow
def test_gguf_conversion_is_quiet_and_folder_output_may_sit_beside_the_source(gguf, sharded):
    """A folder beside the .gguf was refused as 'inside the source model folder' (the .gguf's parent); the
    conversion printed the loaders' progress bars even with --quiet."""
    root, env = gguf
    src = root / "good" / "m.gguf"
    before = snapshot(src.parent)
    out = src.parent / "published"
    patch = ("patch", src, "--format", "gguf", "--recipe", "ffn-dampen", "--scan", sharded[1], "--quiet")
    beside, holding = gguf_cli(env, (*patch, "-o", out), (*patch, "-o", src.parent, "--overwrite"))
    assert beside.returncode == 0 and beside.stderr == "", beside.stderr
    assert (out / "m.gguf").is_file() and (out / "provenance.json").is_file()
    assert_clean_failure(holding, "holds the source model", code=2)
    shutil.rmtree(out)
    assert snapshot(src.parent) == before
