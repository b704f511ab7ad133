"""A text tower that runs on tokens cut to the batch's longest text, for the ONNX export.

Why: a query text is a dozen tokens, yet open_clip pads every text to 77 and
runs all 77 positions; a fresh text query (5 templates x 77) spent 0.6 s of
its 2.6 s there (ViT-B-32, one thread). CLIP's own text tower is causal (each
position sees only those before it) and pools at the end-of-text token, so the
padding after the longest text in a batch changes nothing that is read out:
running positions [0, L) gives the same vectors up to float error.

`variable_length_tower(model)` re-implements open_clip's `encode_text` with
the positional table and the causal mask sliced to the input's length, for
the towers where that argument holds (the built-in `CLIP` text tower, or a
`TextTransformer` without class token or padding mask, pooling by argmax or
at the end token). Anything else gets None and keeps the fixed-length export.
`length_error` is the check the exporter runs before it trusts the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

POOLS = ("argmax", "eos")  # read out at the end token: positions after it never matter
AGREEMENT_TOLERANCE = 1e-4  # max |trimmed - full| relative to the largest |feature|


def _parts(model) -> dict | None:
    """The pieces of `model`'s text tower when it is causal and pools at the end token, else None."""
    import torch
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        parts = {"embed": model.token_embedding, "pos": model.positional_embedding,
                 "transformer": model.transformer, "mask": model.attn_mask, "ln": model.ln_final,
                 "proj": model.text_projection, "pool": model.text_pool_type,
                 "eos": getattr(model, "text_eos_id", None)}
    elif isinstance(getattr(model, "text", None), TextTransformer):
        text = model.text
        if text.cls_emb is not None or text.use_pad_mask or getattr(text, "output_tokens", False):
            return None
        parts = {"embed": text.token_embedding, "pos": text.positional_embedding,
                 "transformer": text.transformer, "mask": text.attn_mask, "ln": text.ln_final,
                 "proj": text.text_projection, "pool": text.pool_type, "eos": text.eos_id}
    else:
        return None
    mask = parts["mask"]
    if parts["pool"] not in POOLS or mask is None or mask.dim() != 2:
        return None
    if not torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1)):
        return None
    blocks = getattr(parts["transformer"], "resblocks", None)
    if blocks is None or not all(_plain_block(block) for block in blocks):
        return None
    return parts


def _plain_block(block) -> bool:
    """open_clip's default block: pre-norm self-attention (nn.MultiheadAttention) and MLP."""
    import torch
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and isinstance(attn, torch.nn.MultiheadAttention) and attn._qkv_same_embed_dim
            and attn.bias_k is None and not attn.add_zero_attn)


def _attend(attn, x, mask):
    """nn.MultiheadAttention's maths on (N, L, D), with every reshape written in terms of -1.

    Why not call the module: the TorchScript exporter records some of its reshapes with the
    traced length as a constant, so the graph fails on any other length."""
    import torch

    heads = attn.num_heads
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (N, H, L, d)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + mask
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
    return attn.out_proj(out)


def variable_length_tower(model) -> Callable | None:
    """An nn.Module: tokens (N, L) -> features (N, dim) for any L up to the context length,
    or None when `model`'s text tower is not causal with end-token pooling."""
    import torch
    from open_clip.transformer import text_global_pool

    parts = _parts(model)
    if parts is None:
        return None

    class VariableLengthText(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.ln, self.pos, self.proj = parts["embed"], parts["ln"], parts["pos"], parts["proj"]
            self.blocks = parts["transformer"].resblocks
            self.cast = parts["transformer"].get_cast_dtype()
            self.register_buffer("mask", parts["mask"], persistent=False)

        def forward(self, tokens):
            length = tokens.shape[1]
            x = self.embed(tokens).to(self.cast) + self.pos[:length].to(self.cast)
            mask = self.mask[:length, :length].to(x.dtype)
            for block in self.blocks:
                x = x + block.ls_1(_attend(block.attn, block.ln_1(x), mask))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            x = text_global_pool(self.ln(x), tokens, parts["pool"], eos_token_id=parts["eos"])
            if self.proj is None:
                return x
            return self.proj(x) if isinstance(self.proj, torch.nn.Linear) else x @ self.proj

    return VariableLengthText().eval()


def trim(tokens, end_token: int):
    """`tokens` (N, context) numpy, cut after the last end token of any row (at least 2 columns)."""
    ends = (tokens == end_token).argmax(axis=1)
    length = max(2, int(ends.max()) + 1) if len(tokens) else tokens.shape[1]
    return tokens[:, :length] if length < tokens.shape[1] else tokens


def length_error(reference, trimmed: Callable[[Any], Any], tokens, end_token: int) -> float:
    """Largest |trimmed(tokens cut to one text's length) - reference| over the texts, relative to
    the largest |feature|. `reference` is the features of the full (N, context) `tokens`; each
    text runs alone, cut to its own length (the farthest from the full context)."""
    import numpy as np

    reference = np.asarray(reference, dtype=np.float64)
    worst = 0.0
    for row in range(len(tokens)):
        out = np.asarray(trimmed(trim(tokens[row:row + 1], end_token)), dtype=np.float64)
        worst = max(worst, float(np.abs(out - reference[row:row + 1]).max()))
    return worst / max(float(np.abs(reference).max()), 1e-12)
