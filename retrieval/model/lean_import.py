"""Import open_clip without the optional libraries the model at hand does not use.

Why (issue 12): open_clip's package imports every model family on `import open_clip`;
its Hugging Face text tower pulls in transformers and its timm image tower timm, both
inside `try: import ... except ImportError`. A Ray encoder actor is a fresh process
that builds one known model, and those imports were ~1.5 s of its CPU (~4 s of wall
time on a loaded 2-core machine) before its first batch. When the model's config names
no Hugging Face part (no `hf_` key, no multimodal decoder) and no timm tower, they are
made unimportable just while open_clip imports, so open_clip takes its own "not
installed" branch; afterwards anything may import them as usual. A model whose config
cannot be read here (an unknown name, a pretrained file) gets the plain import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from retrieval.model.spec import ModelSpec

# optional module -> config text that means the model needs it
OPTIONAL = {"transformers": ('"hf_', '"multimodal_cfg"'), "timm": ('"timm_',)}


def config_text(spec: ModelSpec) -> str | None:
    """The open_clip config JSON that `spec` builds from, as text (None: not found here)."""
    if spec.model_dir:
        file = Path(spec.model_dir) / "open_clip_config.json"
    elif spec.model and spec.model.endswith(".json"):
        file = Path(spec.model)
    elif spec.model:
        found = importlib.util.find_spec("open_clip")  # the package is located, not executed
        if found is None or not found.submodule_search_locations:
            return None
        file = Path(next(iter(found.submodule_search_locations))) / "model_configs" / f"{spec.model}.json"
    else:
        return None
    try:
        return file.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def unneeded(spec: ModelSpec) -> list[str]:
    """The optional modules `spec`'s model does not need (none when its config is unknown)."""
    text = config_text(spec)
    if text is None:
        return []
    return [name for name, marks in OPTIONAL.items() if not any(mark in text for mark in marks)]


@contextlib.contextmanager
def unimportable(names: Sequence[str]) -> Iterator[None]:
    """`import NAME` raises ImportError inside the block (for names not imported yet)."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # Python's documented "not importable"
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def import_open_clip(spec: ModelSpec):
    """open_clip, imported without what `spec` does not need (if it is not imported already)."""
    if "open_clip" not in sys.modules:
        with unimportable(unneeded(spec)):
            import open_clip  # noqa: F401
    return sys.modules["open_clip"]
