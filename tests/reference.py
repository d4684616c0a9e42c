"""Independent in-memory references of each recipe, made with forward hooks on the original model.

They re-derive each intervention from its definition (not from melsurgery's edits or custom layer),
so a patched checkpoint that matches them is right for the right reason.
"""

from __future__ import annotations

import torch


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_rescale(model, layers, dims, factor):
    def hook(module, args, out):
        out = out.clone()
        out[..., list(dims)] *= factor
        return out

    return [model.model.layers[i].input_layernorm.register_forward_hook(hook) for i in layers]


def ffn_dampen(model, layer, neurons, factor):
    def pre(module, args):
        x = args[0].clone()
        x[..., list(neurons)] *= factor
        return (x,)

    return [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(pre)]


def me_norm(model, layer, factor, dims=None):
    norm = model.model.layers[layer].post_attention_layernorm
    g = norm.weight.detach().float()
    mean = g.mean()
    new = g.clone()
    sel = list(dims) if dims else list(range(g.numel()))
    new[sel] = mean + factor * (g[sel] - mean)

    def hook(module, args, out):
        return (rms(args[0], module.variance_epsilon) * new).to(out.dtype)

    return [norm.register_forward_hook(hook)]


def wemask(model, layers, dims, strength, selector, selector_dims=(), threshold=None, first_positions=None):
    """Masks dims of selected tokens; `first_positions[b]` is the index of row b's first real token."""

    def hook(module, args, out):
        h = args[0]
        out = out.clone()
        B, T, _ = h.shape
        for b in range(B):
            for t in range(T):
                if selector == "magnitude":
                    chosen = max(abs(float(h[b, t, d])) for d in selector_dims) >= threshold
                else:
                    chosen = first_positions is not None and t == first_positions[b]
                if chosen:
                    for d in dims:
                        out[b, t, d] = out[b, t, d] * (1 - strength)
        return out

    return [model.model.layers[i].input_layernorm.register_forward_hook(hook) for i in layers]


def remove(handles):
    for h in handles:
        h.remove()
