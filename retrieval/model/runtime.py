"""CPU runtime copies of a model's image tower (fp32, bf16, int8), and torch's thread count.

Why a copy per precision: on a CPU, casting weights on every call (as autocast
does) costs more than bf16 saves, and dynamic int8 quantisation must rewrite
the modules it quantises. A copy shares the fp32 text tower and every tensor it
can with the original, so switching precision costs little memory.
torch is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from retrieval.model import release

if TYPE_CHECKING:
    import torch

CPU_PRECISIONS = ("fp32", "bf16", "int8")


def image_model_at(model: torch.nn.Module, precision: str,
                   converted: Callable[[str, torch.nn.Module], object] | None = None) -> torch.nn.Module:
    """A shallow clone of `model` whose image tower runs at `precision` on the CPU.

    bf16: a bf16 copy of the image tower (input cast to bf16 by the encoder).
    int8: a copy whose nn.Linear layers are dynamically quantised, including the
    attention projections, which nn.MultiheadAttention otherwise keeps in fp32.
    The text tower and everything else stay shared with `model`, in fp32.
    `converted` (int8): called with each part's path (for `visual.get_submodule`) and its
    quantised module once that part of the copy is done, so a caller that is done with the fp32 tower can
    free it part by part and never hold both whole towers (issue 17: ~130 MB of peak).
    """
    import torch

    if precision not in CPU_PRECISIONS:
        raise ValueError(f"no CPU image tower for precision {precision!r}")
    # New modules, but no fp32 weight copied for nothing: int8 and fp32 clones share the
    # original tensors (quantisation reads them, never writes), bf16 gets bf16 copies.
    params = list(model.visual.parameters())
    if precision == "bf16":
        memo = {id(t): torch.nn.Parameter(t.detach().to(torch.bfloat16), requires_grad=False) for t in params}
    else:
        memo = {id(t): t for t in params}
    visual = copy.deepcopy(model.visual, memo)
    del params, memo  # they hold every fp32 tensor: `converted` could free none of them
    input_dtype = None
    if precision == "bf16":
        visual = visual.to(torch.bfloat16)  # buffers; the parameters are bf16 already
        input_dtype = torch.bfloat16
    elif precision == "int8":
        split_self_attention(visual)
        if converted is None:
            _quantize_linear_layers(visual)
        else:
            for parent, name, path in _parts(visual, ""):
                holder = torch.nn.Sequential(getattr(parent, name))  # quantize_dynamic swaps children only
                swapped = [m for m in holder.modules() if isinstance(m, torch.nn.Linear)]
                _quantize_linear_layers(holder)
                setattr(parent, name, holder[0])
                for module in swapped:  # left in reference cycles: let go of their fp32 tensors now, not at gc
                    release.release_tensors(module)
                converted(path, holder[0])
    visual.eval()
    clone = copy.copy(model)
    clone._modules = dict(model._modules)  # our own module table: the original keeps its tower
    clone.visual = visual
    clone.input_dtype = input_dtype
    return clone


PART_BYTES = 32 << 20  # quantised one part at a time: a ViT block is ~28 MB of fp32


def _parts(module: torch.nn.Module, prefix: str) -> list[tuple[torch.nn.Module, str, str]]:
    """(parent, attribute, path) of the children to quantise one by one: each child of at most
    PART_BYTES of parameters, or with no children; bigger ones are split into theirs."""
    out = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        size = sum(p.numel() * p.element_size() for p in child.parameters())
        if size <= PART_BYTES or not any(True for _ in child.children()):
            out.append((module, name, path))
        else:
            out.extend(_parts(child, path))
    return out


def _quantize_linear_layers(module: torch.nn.Module) -> None:
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's "migrate to torchao" notice: nothing a user can do
        warnings.simplefilter("ignore")
        quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def split_self_attention(visual: torch.nn.Module) -> int:
    """Replace each self-attention nn.MultiheadAttention in open_clip's blocks by `SelfAttention`."""
    import torch

    try:
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:  # pragma: no cover - open_clip moved it: quantise the MLPs only
        return 0
    replaced = 0
    for block in visual.modules():
        attn = getattr(block, "attn", None)
        if (isinstance(block, ResidualAttentionBlock) and not hasattr(block, "ln_1_kv")
                and type(attn) is torch.nn.MultiheadAttention and attn._qkv_same_embed_dim
                and attn.bias_k is None and not attn.add_zero_attn):
            block.attn = _self_attention_class()(attn)
            replaced += 1
    return replaced


@functools.cache
def _self_attention_class():
    import torch
    import torch.nn.functional as F

    class SelfAttention(torch.nn.Module):
        """nn.MultiheadAttention's self-attention as two nn.Linear layers and SDPA.

        The same maths (eval mode, no dropout), written so that dynamic int8
        quantisation reaches the q/k/v and output projections: a third of a
        ViT's matmul work, which MultiheadAttention keeps in fp32.
        """

        def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
            super().__init__()
            dim = mha.embed_dim
            self.heads, self.batch_first = mha.num_heads, mha.batch_first
            # The same Parameter objects, no copy: built on "meta", then pointed at them.
            self.qkv = torch.nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None, device="meta")
            self.out = torch.nn.Linear(dim, dim, bias=mha.out_proj.bias is not None, device="meta")
            self.qkv.weight, self.out.weight = mha.in_proj_weight, mha.out_proj.weight
            if mha.in_proj_bias is not None:
                self.qkv.bias = mha.in_proj_bias
            if mha.out_proj.bias is not None:
                self.out.bias = mha.out_proj.bias

        def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
            if (key is not None and key is not query) or (value is not None and value is not query):
                raise ValueError("SelfAttention only does self-attention")
            x = query if self.batch_first else query.transpose(0, 1)
            batch, length, dim = x.shape
            q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # MultiheadAttention: True = masked; SDPA: True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            out = self.out(out.transpose(1, 2).reshape(batch, length, dim))
            return (out if self.batch_first else out.transpose(0, 1)), None

    return SelfAttention


def __getattr__(name: str):
    if name == "SelfAttention":  # built on first use so that importing this module needs no torch
        return _self_attention_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: leave torch's setting), then restore it."""
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
