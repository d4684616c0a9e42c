"""Set the first token's embedding row to a fitted one: a token-selective edit that folds into plain weights.

With causal attention, position 0's whole trajectory depends only on its own embedding row (and its
rotary phase). Where every input opens with the same special token (the tokenizer's BOS: Gemma, Llama,
Mistral), editing that one row changes position 0 alone, directly, and later positions only through their
attention to it: a token-selective patch that every engine runs as stock weights (transformers without
remote code, vLLM, llama.cpp). The row is fitted by the fit stage (`fit/first_token.py`): gradient descent on the sink
after the ME Layer plus lambda times the KL to the base, with verify's definitions, on the tuning half of
the text; `kl` picks the point of the fitted path. With tied embeddings the row is also the token's LM-head
row: the fit's KL includes the change of that logit at every position.

`of`: "bos", the tokenizer's own first token; or "chat", for a tokenizer that adds none but whose chat
template always opens with the same special token (SmolLM2's `<|im_start|>`): the patch then assumes
chat-formatted input, and changes every later occurrence of that token too (each turn opens with it), which
the fit measures on chat-formatted windows (the template's opening, system turn included, then text).
"""

from __future__ import annotations

from melsurgery.architectures import Family
from melsurgery.checkpoint.edits import Edit
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.formats.wording import count
from melsurgery.params import Param
from melsurgery.recipes.base import RecipePlan

NAME = "first-token"
FOLDS = True
WHICH = {"bos": "the tokenizer's first token", "chat": "the chat template's first token"}
PARAMS = (
    Param("of", "choice", "bos", "first-token: which token opens every input: bos (the tokenizer's own first "
          "token) or chat (the chat template's first token, for tokenizers that add none).", flag="--first-token-of",
          choices=tuple(WHICH), search=False),
    Param("kl", "float", 0.03, "first-token: KL budget on the fitting windows: the fitted path's point with the "
          "smallest sink within it.", flag="--first-token-kl", low=0.0, high=10.0),
    Param("steps", "int", 24, "first-token: gradient steps of the fit.", flag="--first-token-steps", low=1, high=1000,
          search=False),
    Param("lr", "float", 0.03, "first-token: Adam step of the fit, relative to the row's RMS.",
          flag="--first-token-lr", low=1e-5, high=1.0, search=False),
    Param("windows", "int", 4, "first-token: fitting windows (from the tuning half of the text).",
          flag="--first-token-windows", low=1, high=256, search=False),
    Param("window_tokens", "int", 256, "first-token: tokens per fitting window.", flag="--first-token-window-tokens",
          low=16, high=8192, search=False),
    Param("token_id", "int", None, "first-token: the edited token (filled in by the fit; manifest only).", low=0,
          search=False),
    Param("row", "float_list", None, "first-token: the fitted row (filled in by the fit; given with token_id, no "
          "fit runs; manifest only).", search=False),
)


def plan(scan: ScanResult, family: Family, config: dict, params: dict) -> RecipePlan:
    """The embedding row of the fitted token set to the fitted values (one row of one tensor)."""
    p = params
    if p["row"] is None or p["token_id"] is None:
        raise UserError("first-token: no fitted row; `patch` fits one (a manifest may give row and token_id to "
                        "reuse a fit)")
    hidden, vocab = config["hidden_size"], config.get("vocab_size")
    if len(p["row"]) != hidden:
        raise UserError(f"first-token: the row has {count(len(p['row']), 'value')}, the model's hidden size is "
                        f"{hidden}")
    if vocab is not None and p["token_id"] >= vocab:
        raise UserError(f"first-token: token_id {p['token_id']} is out of range (vocabulary of {vocab})")
    tid = int(p["token_id"])
    edit = Edit(family.embed, 0.0, axis=0, index=(tid,), add=tuple(float(x) for x in p["row"]),
                why=f"first-token row of token {tid}")
    tied = config.get("tie_word_embeddings", False)
    summary = (f"first-token: embedding row of token id {tid} ({WHICH[p['of']]}) set to a row fitted for sink + "
               f"KL (path point within KL {p['kl']:g} on the fitting windows)"
               + ("; the embeddings are tied, so it is also that token's LM-head row" if tied else ""))
    assumes = (f"every input opens with token id {tid}, {WHICH[p['of']]}"
               + (": feed chat-formatted input; every later occurrence of the token (each turn) is changed too"
                  if p["of"] == "chat" else "; an input without it runs as the base model does"))
    return RecipePlan(NAME, dict(p), summary, [edit], assumes=assumes)


def needs_fit(params: dict) -> bool:
    """Whether a fit must run first (no fitted row given)."""
    return params.get("row") is None or params.get("token_id") is None
