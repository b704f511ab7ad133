"""CoOp (Zhou et al., 2022): learn the prompt's context words, backpropagating through the text tower.

Each class's prompt is `[SOS] v_1 .. v_M <class words> . [EOS]`; the M context
vectors v are shared by every class and are the only thing trained. They
start as the token embeddings of `init` ("a photo of a"), so step 0 *is* the
zero-shot classifier with that template. Image vectors are fixed (read from
the library, never re-encoded), so a training step is one text-tower forward
and backward over the C class prompts plus a (shots x C) matrix product:
full-batch, cheap on a CPU.

Two losses, one prompt learner:
* a label set (C >= 2): cross-entropy over the classes at the model's logit scale;
* one concept: logistic loss on scale * cos + b (b learned), positives vs
  negatives weighted to equal totals.
Both add `anchor` * ||v - v_init||^2, which keeps 1-2 shots from wandering far
from the zero-shot prompt (the same role the text prior plays in the probe).

Only open_clip's own text transformer (`CLIP.token_embedding` ...) exposes the
token embeddings; a Hugging Face text tower is refused with a ModelError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.errors import InputError, ModelError
from retrieval.model.runtime import torch_threads

DEFAULT_INIT = "a photo of a"
DEFAULT_STEPS = 100
DEFAULT_LR = 2e-3
DEFAULT_ANCHOR = 0.1
# One step is a few small matrices: a second torch thread costs more in hand-offs than it
# saves (tiny model, shared 2-core machine: 20 steps in 0.86 s on one thread, 20 s on two).
# None leaves torch's setting alone (a big text tower on a quiet machine may gain from more).
TRAIN_THREADS: int | None = 1


@dataclass
class CoopResult:
    text_vectors: np.ndarray  # (C, dim) unit vectors of the learned prompts
    bias: float  # concept mode only (0 for label sets)
    steps: int
    loss: float
    seconds: float
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)  # step -> text vectors, when asked


class PromptLearner(torch.nn.Module):
    """Token embeddings of `init <class>.` with the `init` part replaced by trainable vectors."""

    def __init__(self, model, tokenizer, class_texts: list[str], init: str = DEFAULT_INIT) -> None:
        super().__init__()
        if not hasattr(model, "token_embedding") or not hasattr(model, "transformer"):
            raise ModelError("CoOp needs open_clip's own text transformer; this model's text tower "
                             f"({type(getattr(model, 'text', model)).__name__}) does not expose its token embeddings")
        self.model = model
        n_ctx = int((tokenizer([init])[0] != 0).sum()) - 2  # minus start and end tokens
        if n_ctx < 1:
            raise InputError(f"the CoOp context {init!r} has no words")
        device = next(model.parameters()).device
        tokens = tokenizer([f"{init} {c.strip()}." for c in class_texts]).to(device)
        with torch.no_grad():
            embedded = model.token_embedding(tokens).float()
        self.register_buffer("tokens", tokens)
        self.register_buffer("prefix", embedded[:, :1].clone())
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].clone())
        self.register_buffer("ctx_init", embedded[0, 1:1 + n_ctx].clone())
        self.ctx = torch.nn.Parameter(embedded[0, 1:1 + n_ctx].clone())

    def forward(self) -> torch.Tensor:
        """Unit text vectors (C, dim) of the prompts with the current context."""
        from open_clip.transformer import text_global_pool

        model = self.model
        n = self.tokens.shape[0]
        x = torch.cat([self.prefix, self.ctx[None].expand(n, -1, -1), self.suffix], dim=1)
        x = x + model.positional_embedding.float()
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        x = text_global_pool(x, self.tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
                else x @ model.text_projection
        return F.normalize(x, dim=-1)

    def drift(self) -> torch.Tensor:
        return (self.ctx - self.ctx_init).pow(2).sum()


def learn_prompts(model, tokenizer, class_texts: list[str], features: np.ndarray, targets: np.ndarray,
                  logit_scale: float, init: str = DEFAULT_INIT, steps: int = DEFAULT_STEPS,
                  lr: float = DEFAULT_LR, anchor: float = DEFAULT_ANCHOR, seed: int = 0,
                  snapshots: tuple[int, ...] = ()) -> CoopResult:
    """Learn shared context vectors for a label set (targets in 0..C-1) or, with one class, a concept.

    In concept mode `targets` are 1 for positives and 0 for negatives. `snapshots`: steps after which
    the text vectors are also kept (one run serves a search over step counts on a validation set).
    """
    with torch_threads(TRAIN_THREADS):
        return _learn(model, tokenizer, class_texts, features, targets, logit_scale, init, steps, lr, anchor, seed,
                      snapshots)


def _learn(model, tokenizer, class_texts, features, targets, logit_scale, init, steps, lr, anchor,
           seed, snapshots=()) -> CoopResult:
    import time

    started = time.perf_counter()
    torch.manual_seed(seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the context (and a concept's bias) learn
    device = next(model.parameters()).device
    learner = PromptLearner(model, tokenizer, class_texts, init).to(device)
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device)
    y = torch.from_numpy(np.asarray(targets, np.int64)).to(device)
    concept = len(class_texts) == 1
    bias = torch.nn.Parameter(torch.zeros((), device=device))
    params = [learner.ctx] + ([bias] if concept else [])
    optimiser = torch.optim.Adam(params, lr=lr)
    if concept:
        pos = (y == 1).float()
        weight = pos * (0.5 / max(1.0, float(pos.sum()))) + (1 - pos) * (0.5 / max(1.0, float((1 - pos).sum())))
        with torch.no_grad():  # start the bias at the balanced point of the zero-shot prompt
            cos = (x @ learner().T)[:, 0]
            bias.fill_(-logit_scale * float(cos.median()))
    loss_value = float("nan")
    kept: dict[int, np.ndarray] = {}
    for step in range(steps):
        optimiser.zero_grad()
        text = learner()
        if step in snapshots:
            kept[step] = text.detach().cpu().numpy().astype(np.float32)
        if concept:
            logits = logit_scale * (x @ text.T)[:, 0] + bias
            loss = (weight * F.binary_cross_entropy_with_logits(logits, pos, reduction="none")).sum()
        else:
            loss = F.cross_entropy(logit_scale * x @ text.T, y)
        total = loss + anchor * learner.drift()
        total.backward()
        optimiser.step()
        loss_value = float(loss.detach())
    with torch.no_grad():
        vectors = learner().cpu().numpy().astype(np.float32)
    if steps in snapshots:
        kept[steps] = vectors
    return CoopResult(vectors, float(bias.detach()), steps, loss_value, time.perf_counter() - started, kept)
