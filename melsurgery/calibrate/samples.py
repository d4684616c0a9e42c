"""Calibration and evaluation text: reading sample files and tokenising them."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from melsurgery.calibrate.stats import Sample
from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import read_text

DEFAULT_CALIBRATION = "calibration.jsonl"


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
            raise UserError(f"calibration num_samples {quote(n)}: a positive number, or 'auto'")


def read_records(path: Path | None) -> tuple[list[dict], str]:
    """Records from a .txt (blank-line separated blocks) or .jsonl (`text` or `messages`) file.

    None means the embedded default set. Returns the records and a name for provenance.
    """
    if path is None:
        text = resources.files("melsurgery.data").joinpath(DEFAULT_CALIBRATION).read_text(encoding="utf-8")
        return _parse_jsonl(text, "embedded calibration set"), f"melsurgery:{DEFAULT_CALIBRATION}"
    path = Path(path)
    text = read_text(path, "calibration file")
    if path.suffix == ".jsonl":
        records = _parse_jsonl(text, str(path))
    elif path.suffix in (".txt", ".md", ""):
        records = [{"text": b.strip(), "kind": "text"} for b in text.split("\n\n") if b.strip()]
    else:
        raise UserError(f"{path}: calibration files are .txt (blank-line separated) or .jsonl")
    if not records:
        raise UserError(f"{path}: no samples in calibration file")
    return records, str(path)


def _parse_jsonl(text: str, where: str) -> list[dict]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where}: line {n} is not JSON") from None
        if not isinstance(rec, dict) or not (isinstance(rec.get("text"), str) or isinstance(rec.get("messages"), list)):
            raise UserError(f"{where}: line {n} has neither a 'text' string nor a 'messages' list")
        if "messages" in rec and not (rec["messages"] and all(_is_message(m) for m in rec["messages"])):
            raise UserError(f"{where}: line {n}: 'messages' must be a non-empty list of "
                            '{"role": "...", "content": "..."} objects with string values')
        if not _encodable(rec):
            raise UserError(f"{where}: line {n} holds a lone surrogate escape (such as \\ud800), which is not text")
        records.append(rec)
    return records


def _encodable(rec: dict) -> bool:
    """JSON may escape half a surrogate pair; such a string is not Unicode text and no tokenizer takes it."""
    strings = [rec.get("text")] + [v for m in rec.get("messages") or [] for v in m.values()]
    try:
        for s in strings:
            if isinstance(s, str):
                s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_message(m: object) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def tokenize(
    records: list[dict], tokenizer: object, *, num_samples: int | None, max_tokens: int, seed: int
) -> list[Sample]:
    """Pick `num_samples` records (seeded), apply the chat template where there is one, truncate."""
    if num_samples is not None and num_samples < len(records):
        records = random.Random(seed).sample(records, num_samples)
    samples = []
    for rec in records:
        if "messages" in rec:
            if getattr(tokenizer, "chat_template", None):
                from melsurgery.checkpoint.safeload import render_chat

                text = render_chat(tokenizer, rec["messages"])
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer("\n".join(m.get("content", "") for m in rec["messages"]))["input_ids"]
        else:
            ids = tokenizer(rec["text"])["input_ids"]
        ids = list(ids)[:max_tokens]
        if len(ids) < 2:
            continue
        samples.append(Sample(ids, [tokenizer.decode([i]) for i in ids], rec.get("kind", "text")))
    if not samples:
        raise UserError("no calibration sample has at least two tokens")
    return samples
