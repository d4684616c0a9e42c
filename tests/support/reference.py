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
    "bamba": ("input_layernorm", "pre_ff_layernorm"),
    "jamba": ("input_layernorm", "pre_ff_layernorm"),
    "lfm2": ("operator_norm", "ffn_norm"),
}
DEFAULT_ROLES = ("input_layernorm", "post_attention_layernorm")
# model_type -> (FFN module, its down projection) where not ("mlp", "down_proj")
FFNS = {"bamba": ("feed_forward", "down_proj"), "jamba": ("feed_forward", "down_proj"), "lfm2": ("feed_forward", "w2")}


def roles(model) -> tuple[str | None, str]:
    return ROLES.get(model.config.model_type, DEFAULT_ROLES)


def _scale_inputs(linear, columns, factor):
    """A pre-hook scaling some input features of a linear layer (= some of its weight's columns)."""
    def pre(module, args):
        x = args[0].clone()
        x[..., list(columns)] *= factor
        return (x,)

    return linear.register_forward_pre_hook(pre)


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
    """Scale the output of FFN neurons (ints, or [expert, neuron] pairs in an MoE layer; expert "shared":
    the shared expert, a dense FFN of its own)."""
    ffn, down = FFNS.get(model.config.model_type, ("mlp", "down_proj"))
    mlp = getattr(model.model.layers[layer], ffn)
    if not hasattr(mlp, "experts"):
        return [_scale_inputs(getattr(mlp, down), neurons, factor)]
    handles = []
    shared = [j for e, j in neurons if e == "shared"]
    if shared:
        handles.append(_scale_inputs(mlp.shared_expert.down_proj, shared, factor))

    def hook(module, args, out):
        x, index, weight = args[:3]  # [N, D], [N, k], [N, k]
        out = out.clone()
        for e, j in [n for n in neurons if n[0] != "shared"]:
            routed = (index == e).any(-1)
            w = (weight * (index == e)).sum(-1)[routed]
            gate_up = module.gate_up_proj[e]
            inter = gate_up.shape[0] // 2
            xs = x[routed]
            a = module.act_fn(xs @ gate_up[j]) * (xs @ gate_up[inter + j])
            out[routed] += ((factor - 1) * w * a)[:, None] * module.down_proj[e][:, j][None, :]
        return out

    return [*handles, mlp.experts.register_forward_hook(hook)]


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


def wemask(model, per_layer, selector, selector_dims=(), first_positions=None):
    """Per layer (layer, dims, strength, threshold, values or None): the dims of selected tokens move
    towards the values (zero when None) by strength; `first_positions[b]`: row b's first real token."""
    handles = []
    for layer, dims, strength, threshold, values in per_layer:
        target = values if values is not None else [0.0] * len(dims)

        def edit(h, x, dims=dims, strength=strength, threshold=threshold, target=target):
            x = x.clone()
            B, T, _ = h.shape
            for b in range(B):
                for t in range(T):
                    if selector == "magnitude":
                        chosen = max(abs(float(h[b, t, d])) for d in selector_dims) >= threshold
                    else:
                        chosen = first_positions is not None and t == first_positions[b]
                    if chosen:
                        for d, v in zip(dims, target):
                            x[b, t, d] = x[b, t, d] * (1 - strength) + strength * v
            return x

        handles += on_attention_input(model, [layer], edit)
    return handles


def remove(handles):
    for h in handles:
        h.remove()


def for_plan(plan, model, scan, rows: int = 8):
    """The reference hooks of a planned recipe (first_positions: every row starts at position 0)."""
    p = plan.params
    if plan.recipe == "norm-rescale":
        return norm_rescale(model, p["layers"], p["dims"], p["factor"])
    if plan.recipe == "ffn-dampen":
        return ffn_dampen(model, p["layer"], p["neurons"], p["factor"])
    if plan.recipe == "me-norm":
        return me_norm(model, p["layer"], p["factor"], p["dims"])
    spec = plan.wemask
    per_layer = [(m.layer, m.dims, m.strength, m.threshold, m.values) for m in spec.per_layer]
    return wemask(model, per_layer, spec.selector, scan.massive_dims, first_positions=[0] * rows)


def whole_verify(base, patched, windows, first_target, massive):
    """Today's whole-model verify, re-derived from its definitions on two fully loaded models.

    `windows`: token ids per window; `first_target`: the first scored position; `massive`: (window,
    position) of the massive tokens. Per-layer sinks follow the definition: per head, the attention
    mass the queries after each massive token put on it, summed over the window's massive tokens;
    mean over windows and heads. Similarity: mean pairwise cosine of the attention inputs."""
    import melsurgery

    out = {}
    runs = {}
    for key, folder in (("base", base), ("patched", patched)):
        model, _ = melsurgery.load(folder, attn_implementation="eager")
        inputs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]

        def grab(module, args, kwargs, into):
            into.append(kwargs["hidden_states"][0].double())

        handles = [layer.self_attn.register_forward_pre_hook(lambda m, a, k, into=inputs[i]: grab(m, a, k, into),
                                                             with_kwargs=True)
                   for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            res = [model(torch.tensor([w]), output_attentions=True, output_hidden_states=True) for w in windows]
        remove(handles)
        runs[key] = res
        n = len(model.model.layers)
        sinks, sims, maxes = [], [], []
        for i in range(n):
            per_window = []
            for w, r in enumerate(res):
                a = r.attentions[i][0].double()  # [H, T, T]
                cols = [p for ww, p in massive if ww == w and p + 1 < a.shape[-1]]
                if cols:
                    per_window.append(sum(a[:, p + 1 :, p].mean(-1) for p in cols))
            sinks.append(float(torch.stack(per_window).mean()) if per_window else None)
            cos = []
            for x in inputs[i]:
                u = torch.nn.functional.normalize(x, dim=-1)
                c = u @ u.T
                T = c.shape[0]
                cos.append(float((c.sum() - c.diagonal().sum()) / (T * (T - 1))))
            sims.append(sum(cos) / len(cos))
            # hidden_states[i + 1] is layer i's output, except the last (after the final norm)
            maxes.append(None if i == n - 1 else max(float(r.hidden_states[i + 1].abs().max()) for r in res))
        out[f"sink_{key}"], out[f"similarity_{key}"], out[f"max_abs_{key}"] = sinks, sims, maxes
    kl, nll_b, nll_p, agree = [], [], [], []
    for w, rb, rp in zip(windows, runs["base"], runs["patched"]):
        lb = rb.logits[0, first_target - 1 : -1].double().log_softmax(-1)
        lp = rp.logits[0, first_target - 1 : -1].double().log_softmax(-1)
        target = torch.tensor(w[first_target:])[:, None]
        kl.append((lb.exp() * (lb - lp)).sum(-1))
        nll_b.append(-lb.gather(-1, target)[:, 0])
        nll_p.append(-lp.gather(-1, target)[:, 0])
        agree.append((lb.argmax(-1) == lp.argmax(-1)).double())
    kl = torch.cat(kl)
    out.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1_agreement=float(torch.cat(agree).mean()),
               ppl_base=float(torch.cat(nll_b).mean().exp()), ppl_patched=float(torch.cat(nll_p).mean().exp()))
    return out


@dataclass(frozen=True)
class Truth:
    """What a model is known to contain, independently of the plan under test: its ME Layer, the dims of the
    massive tokens (largest first), the FFN neurons that write them, and its depth. The massive token is the
    first of each sequence (BOS in planted models)."""

    me_layer: int
    dims: tuple[int, ...]
    neurons: tuple[int, ...]
    num_layers: int
    attention: tuple[int, ...] | None = None  # hybrids: the layers that attend (None: all)


def targets(recipe: str, params: dict, truth: Truth) -> dict:
    """Where a recipe with these (user-given) params must act, derived from the truth: the plan must agree."""
    spec = params.get("layers", "next")
    layers = {"next": [truth.me_layer + 1], "after-me": list(range(truth.me_layer + 1, truth.num_layers)),
              "me": [truth.me_layer]}.get(spec, spec)
    if truth.attention is not None and recipe in ("norm-rescale", "wemask"):
        later = [i for i in truth.attention if i > truth.me_layer]
        layers = {"next": later[:1], "after-me": later}.get(spec, [i for i in layers if i in truth.attention])
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
    per_layer = [(layer, t["dims"], p["strength"], None, None) for layer in t["layers"]]
    return wemask(model, per_layer, "first", first_positions=[0] * rows)
