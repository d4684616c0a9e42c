"""Edits: what a folded recipe does to a tensor, as plain data, and how it is applied.

Recipes produce edits; the safetensors writer, the GGUF writer and in-memory trials apply them with
`apply_edit`, so the meaning of an edit lives here and nowhere else. Importing this module needs no
torch; applying an edit does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from melsurgery.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Edit:
    """w_eff <- scale * w_eff + shift (+ add) on a slice, where w_eff = offset + w.

    `axis` and `index` select the slice (rows: axis 0, columns: axis 1, None: the whole tensor);
    `offset` is the norm convention (1.0 for Gemma's (1 + g) norms) so that scaling acts on the
    effective weight. `add` is a vector added to each selected row (axis 0) or column (axis 1) of a
    matrix: with scale 0 it sets them (first-token writes its fitted embedding row so).
    """

    tensor: str
    scale: float
    shift: float = 0.0
    axis: int = 0
    index: tuple[int, ...] | None = None
    offset: float = 0.0
    why: str = ""
    add: tuple[float, ...] | None = None


def apply_edit(weight: torch.Tensor, edit: Edit) -> torch.Tensor:
    """The edited tensor in fp32 (callers cast back to the stored dtype)."""
    import torch

    w = weight.float().clone()
    if edit.add is not None:
        other = w.shape[1 - edit.axis] if w.dim() == 2 and edit.axis in (0, 1) else None
        if edit.index is None or other != len(edit.add):
            raise UserError(f"{edit.tensor}: a vector edit needs a matrix, selected rows or columns, and "
                            f"{other} values (got {len(edit.add)})")
    if edit.index is None:
        w.copy_(_affine(w, edit))
        return w
    if edit.axis >= w.dim():
        raise UserError(f"{edit.tensor}: cannot edit axis {edit.axis} of a {w.dim()}-D tensor")
    size = w.shape[edit.axis]
    bad = [i for i in edit.index if not 0 <= i < size]
    if bad:
        raise UserError(f"{edit.tensor}: indices {bad} out of range 0-{size - 1}")
    idx = torch.tensor(edit.index, dtype=torch.long)
    w.index_copy_(edit.axis, idx, _affine(w.index_select(edit.axis, idx), edit))
    return w


def edited_tensor(original: torch.Tensor, edits: list[Edit]) -> torch.Tensor:
    """The tensor after `edits` in sequence, computed in fp32 and cast back to its stored dtype.

    What the writer stores; in-memory trials (`tune`) apply the same function to weights in memory.
    """
    new = original.float()
    for e in edits:
        new = apply_edit(new, e)
    return new.to(original.dtype)


def edited_rows(rows: torch.Tensor, row_ids: list[int], edits: list[Edit]) -> torch.Tensor:
    """Some rows of a 2-D tensor after `edits` (of the whole tensor), given which rows they are.

    In-memory trials read a table in pieces (the embedding rows of the tokens at hand, the LM head in
    blocks); this applies whole-tensor edits to such a piece exactly as `edited_tensor` applies them to
    the whole. Row edits (axis 0) must name only rows the piece holds; callers load those rows.
    """
    where = {r: k for k, r in enumerate(row_ids)}
    out = rows
    for e in edits:
        if e.axis == 0 and e.index is not None:
            missing = [i for i in e.index if i not in where]
            if missing:
                raise ValueError(f"{e.tensor}: rows {missing[:3]} are not among the rows at hand")
            e = replace(e, index=tuple(where[i] for i in e.index))
        out = edited_tensor(out, [e])
    return out


def _affine(x: torch.Tensor, e: Edit) -> torch.Tensor:
    if e.offset:
        x = (x + e.offset) * e.scale + e.shift - e.offset
    else:
        x = x * e.scale + e.shift
    if e.add is not None:
        import torch

        vec = torch.tensor(e.add, dtype=x.dtype)
        x = x + (vec if e.axis == 0 else vec[:, None])
    return x


def is_identity(edit: Edit) -> bool:
    """An edit that leaves every entry as it was (the writer skips it)."""
    return edit.scale == 1.0 and edit.shift == 0.0 and not any(edit.add or ())
