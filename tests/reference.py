"""Independent in-memory references of each recipe, made with forward hooks on the original model.

They re-derive each intervention from its definition (not from melsurgery's edits or custom layer),
so a patched checkpoint that matches them is right for the right reason. Where each role lives is
this file's own knowledge of the families (`ROLES`), deliberately not read from melsurgery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# model_type -> (attention-input norm or None where the residual enters the attention directly,
#                the FFN norm that me-norm rescales)
ROLES = {
    "gemma2": ("input_layernorm", "pre_feedforward_layernorm"),
    "gemma3_text": ("input_layernorm", "pre_feedforward_layernorm"),
    "olmo2": (None, "post_feedforward_layernorm"),
}
DEFAULT_ROLES = ("input_layernorm", "post_attention_layernorm")


def roles(model) -> tuple[str | None, str]:
    return ROLES.get(model.config.model_type, DEFAULT_ROLES)


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_offset(norm) -> float:
    """1.0 for norms that multiply by (1 + g) (Gemma), 0.0 for g: asked of the module itself."""
    x = torch.ones(1, norm.weight.numel())
    with torch.no_grad():
        return round(float((norm(x) - rms(x, 0.0) * norm.weight.float()).abs().max()), 3)


def on_attention_input(model, layers, edit):
    """Hook `edit(residual, attention_input) -> new attention input` into the given layers."""
    attn_norm, _ = roles(model)
    blocks = model.model.layers
    if attn_norm is not None:
        def hook(module, args, out):
            return edit(args[0], out)

        return [getattr(blocks[i], attn_norm).register_forward_hook(hook) for i in layers]

    def pre(module, args, kwargs):
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": edit(h, h)}

    return [blocks[i].self_attn.register_forward_pre_hook(pre, with_kwargs=True) for i in layers]


def norm_rescale(model, layers, dims, factor):
    def edit(h, x):
        x = x.clone()
        x[..., list(dims)] *= factor
        return x

    return on_attention_input(model, layers, edit)


def ffn_dampen(model, layer, neurons, factor):
    """Scale the output of FFN neurons (ints, or [expert, neuron] pairs in an MoE layer)."""
    mlp = model.model.layers[layer].mlp
    if not hasattr(mlp, "experts"):
        def pre(module, args):
            x = args[0].clone()
            x[..., list(neurons)] *= factor
            return (x,)

        return [mlp.down_proj.register_forward_pre_hook(pre)]

    def hook(module, args, out):
        x, index, weight = args[:3]  # [N, D], [N, k], [N, k]
        out = out.clone()
        for e, j in neurons:
            routed = (index == e).any(-1)
            w = (weight * (index == e)).sum(-1)[routed]
            gate_up = module.gate_up_proj[e]
            inter = gate_up.shape[0] // 2
            xs = x[routed]
            a = module.act_fn(xs @ gate_up[j]) * (xs @ gate_up[inter + j])
            out[routed] += ((factor - 1) * w * a)[:, None] * module.down_proj[e][:, j][None, :]
        return out

    return [mlp.experts.register_forward_hook(hook)]


def me_norm(model, layer, factor, dims=None):
    norm = getattr(model.model.layers[layer], roles(model)[1])
    g = norm.weight.detach().float() + norm_offset(norm)
    mean = g.mean()
    new = g.clone()
    sel = list(dims) if dims else list(range(g.numel()))
    new[sel] = mean + factor * (g[sel] - mean)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))

    def hook(module, args, out):
        return (rms(args[0], eps) * new).to(out.dtype)

    return [norm.register_forward_hook(hook)]


def wemask(model, layers, dims, strength, selector, selector_dims=(), threshold=None, first_positions=None):
    """Masks dims of selected tokens; `first_positions[b]` is the index of row b's first real token."""

    def edit(h, x):
        x = x.clone()
        B, T, _ = h.shape
        for b in range(B):
            for t in range(T):
                if selector == "magnitude":
                    chosen = max(abs(float(h[b, t, d])) for d in selector_dims) >= threshold
                else:
                    chosen = first_positions is not None and t == first_positions[b]
                if chosen:
                    for d in dims:
                        x[b, t, d] = x[b, t, d] * (1 - strength)
        return x

    return on_attention_input(model, layers, edit)


def remove(handles):
    for h in handles:
        h.remove()


@dataclass(frozen=True)
class Truth:
    """What a model is known to contain, independently of the plan under test: its ME Layer, the dims of the
    massive tokens (largest first), the FFN neurons that write them, and its depth. The massive token is the
    first of each sequence (BOS in planted models)."""

    me_layer: int
    dims: tuple[int, ...]
    neurons: tuple[int, ...]
    num_layers: int


def targets(recipe: str, params: dict, truth: Truth) -> dict:
    """Where a recipe with these (user-given) params must act, derived from the truth: the plan must agree."""
    spec = params.get("layers", "next")
    layers = {"next": [truth.me_layer + 1], "after-me": list(range(truth.me_layer + 1, truth.num_layers)),
              "me": [truth.me_layer]}.get(spec, spec)
    dims = list(params.get("dims") or truth.dims[: params.get("top_k", 3)])
    if recipe in ("norm-rescale", "wemask"):
        return {"layers": layers, "dims": dims}
    if recipe == "ffn-dampen":
        return {"layer": truth.me_layer, "neurons": list(params.get("neurons") or truth.neurons)}
    return {"layer": truth.me_layer}


def for_truth(recipe: str, params: dict, model, truth: Truth, defaults: dict, rows: int = 8):
    """The reference hooks of a recipe aimed by the truth: WeMask masks the first token of each row, whatever
    its selector (on these models exactly the massive tokens)."""
    p = {**defaults, **params}
    t = targets(recipe, params, truth)
    if recipe == "norm-rescale":
        return norm_rescale(model, t["layers"], t["dims"], p["factor"])
    if recipe == "ffn-dampen":
        return ffn_dampen(model, t["layer"], t["neurons"], p["factor"])
    if recipe == "me-norm":
        return me_norm(model, t["layer"], p["factor"], p.get("dims"))
    return wemask(model, t["layers"], t["dims"], p["strength"], "first", first_positions=[0] * rows)
