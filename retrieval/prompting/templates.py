"""Prompt template sets by name or file: plain strings, no numpy, no torch.

`clipfind search` names a template set even when a running server answers the
query, so resolving one must stay light (`retrieval.query.types` calls it).
The CLIP paper's sets come from open_clip, imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.errors import InputError

SINGLE_TEMPLATE = ("a photo of a {}.",)

# A small set for free-text *search* queries: photo-ish phrasings that still read
# well around arbitrary phrases ("a dog on a beach"), unlike class-name templates.
PHOTO_TEMPLATES = (
    "a photo of {}.",
    "a photo of a {}.",
    "a picture of {}.",
    "an image of {}.",
    "{}",
)


def openai_templates(name: str) -> tuple[str, ...]:
    """open_clip's template lists are callables (`lambda c: f"a photo of a {c}."`); turn them into `{}` strings."""
    from open_clip import zero_shot_metadata as meta

    return tuple(t("{}") for t in getattr(meta, name))


def template_set(name_or_file: str) -> tuple[str, ...]:
    """A named template set, or a file with one template containing `{}` per line.

    Names: `single` (a photo of a {}.), `photo` (the search default), `simple7`
    (the CLIP paper's 7-template subset), `imagenet80` (all 80 templates),
    `cifar10` (the CLIP paper's 18 CIFAR-10 templates, shipped as package data).
    """
    def bundled(name: str) -> str:  # imported here: cupl costs a fresh `clipfind search` ~10 ms
        from retrieval.prompting.cupl import bundled_path

        return str(bundled_path(name))

    named = {
        "single": lambda: SINGLE_TEMPLATE,
        "photo": lambda: PHOTO_TEMPLATES,
        "simple7": lambda: openai_templates("SIMPLE_IMAGENET_TEMPLATES"),
        "imagenet80": lambda: openai_templates("OPENAI_IMAGENET_TEMPLATES"),
        "cifar10": lambda: template_set(bundled("cifar10_templates.txt")),
    }
    if name_or_file in named:
        return named[name_or_file]()
    path = Path(name_or_file)
    if not path.is_file():
        raise InputError(f"no template set or file named {name_or_file!r} (sets: {', '.join(named)})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read template file {path}: {exc}") from exc
    templates = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not templates:
        raise InputError(f"template file {path} has no templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise InputError(f"template file {path}: every template needs a {{}} placeholder (not: {bad[0]!r})")
    return templates
