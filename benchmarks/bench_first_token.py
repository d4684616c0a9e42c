"""One first-token fit step against a plain full-model autograd step, in one run (ratios, not seconds).

    python3 benchmarks/bench_first_token.py [MODEL] [--windows 2] [--tokens 128] [--repeat 2]

Workload: MODEL (default: the embedded SmolLM2), `--windows` windows of `--tokens` tokens from the tuning half
of the embedded text, float32 on the CPU. Both steps compute the same kind of objective (sink after the ME
Layer over the base's massive tokens, plus the mean KL to the base over the scored tokens) and its gradient
with respect to the first token's embedding row:

- plain: the whole transformers model in memory, the row spliced into `inputs_embeds`, attentions returned,
  the base model's logits recomputed by a second forward pass (nothing cached), full logits, one backward;
- fit: `RowObjective.evaluate` (fit/first_token.py): base pass cached once (massive tokens, base sinks,
  the KL's per-position terms), only the row as a leaf, the head scored in blocks.

Prints the median seconds of each and their ratio; the memory figure is the process's peak RSS after each
(the plain step runs second, so its peak includes the fit's).
"""

from __future__ import annotations

import argparse
import statistics

from harness import GB, measured, ratio, workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from melsurgery.architectures import family_for
    from melsurgery.checkpoint.reader import Checkpoint
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.checkpoint.source import resolve
    from melsurgery.fit.first_token import RowObjective, first_token
    from melsurgery.measure.verify import eval_text, make_windows, split_text
    from melsurgery.params import DetectParams

    source = resolve(args.model)
    ckpt = Checkpoint(source.folder)
    tok = load_tokenizer(source.folder)
    of = "bos" if tok("a")["input_ids"] != tok("a", add_special_tokens=False)["input_ids"] else "chat"
    token_id = first_token(tok, of)
    win = make_windows(tok, split_text(eval_text(None)[0])[0], args.tokens, args.windows,
                       "chat" if of == "chat" else "tokenizer")
    with measured("base pass") as base:
        obj = RowObjective(ckpt, family_for(ckpt.config), win.ids, win.first_target, token_id, DetectParams())
    row = obj.row0 * 0.97
    fit = []
    for _ in range(args.repeat):
        with measured("fit step") as step:
            obj.evaluate(row, 1.0)
        fit.append(step)

    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.requires_grad_(False)
    ids = torch.tensor(win.ids)
    first, after = win.first_target, obj.sink_layers
    embed = model.get_input_embeddings()
    plain = []
    for _ in range(args.repeat):
        with measured("plain step") as step:
            r = row.clone().requires_grad_(True)
            x = embed(ids).detach()
            scale = obj.scale if obj.scale is not None else 1.0
            x = torch.cat([(r * scale)[None, None].expand(len(ids), 1, -1), x[:, 1:]], dim=1)
            out = model(inputs_embeds=x, output_attentions=True)
            with torch.no_grad():
                lb = model(ids).logits[:, first - 1 : -1].double().log_softmax(-1)
            lp = out.logits[:, first - 1 : -1].double().log_softmax(-1)
            kl = (lb.exp() * (lb - lp)).sum(-1).mean()
            sink = torch.stack([out.attentions[i][:, :, 1:, 0].mean() for i in after]).mean()
            (sink / obj.sink_base + kl).backward()
        plain.append(step)

    f, p = (statistics.median(s.wall_s for s in steps) for steps in (fit, plain))
    fc, pc = (statistics.median(s.cpu_s for s in steps) for steps in (fit, plain))
    print(workload(f"{source.id}, {len(win.ids)} windows x {args.tokens} tokens (first token {token_id})",
                   f"float32, CPU, {torch.get_num_threads()} threads, median of {args.repeat}"))
    print(f"fit step {f:.1f} s ({fc:.1f} s CPU), plain step {p:.1f} s ({pc:.1f} s CPU): the fit step takes "
          f"{ratio(f, p)} the plain step's time, {ratio(fc, pc)} its CPU; the fit's base pass, once per path: "
          f"{ratio(base.wall_s, f)} a fit step")
    print(f"peak RSS after the fit steps {fit[-1].peak_rss / GB:.2f} GB, after the plain steps "
          f"{plain[-1].peak_rss / GB:.2f} GB")


if __name__ == "__main__":
    main()
