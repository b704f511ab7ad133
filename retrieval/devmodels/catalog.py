"""Which model to use when the user named none: real weights on disk if any, else the tiny test model.

Nothing here touches the network: pretrained weights count only when they are
already in the Hugging Face cache (or named by $CLIPFIND_MODEL_DIR).
"""

from __future__ import annotations

from pathlib import Path

from retrieval import config
from retrieval.model.spec import ModelSpec

# Good general-purpose weights, best first; any of them found in the cache wins.
PREFERRED_PRETRAINED = (
    ("ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-B-32", "openai"),
    ("ViT-B-16", "laion2b_s34b_b88k"),
    ("ViT-L-14", "laion2b_s32b_b82k"),
)


def cached_pretrained(model: str, tag: str) -> bool:
    """True when open_clip's weights for (model, tag) are already in the local HF cache."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model, tag)
    repo = cfg.get("hf_hub", "").rstrip("/")
    if not repo:
        return False
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return True
    return False


def best_offline_spec(log=None) -> tuple[ModelSpec, str]:
    """(spec, why): the best model usable with no network, training the tiny one if needed."""
    env_dir = config.model_dir_override()
    if env_dir:
        return ModelSpec(model_dir=env_dir), "named by $CLIPFIND_MODEL_DIR"
    for model, tag in PREFERRED_PRETRAINED:
        if cached_pretrained(model, tag):
            return ModelSpec(model=model, pretrained=tag), "pretrained weights found in the local cache"
    from retrieval.devmodels.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(log=log)
    why = ("no pretrained CLIP weights on this machine, so the tiny model clipfind trains itself "
           "on drawn shapes (it knows colours and shapes, not photos)")
    return ModelSpec(model_dir=str(model_dir)), why
