"""Label sets: what `tag` and `eval` classify into.

A label file has one label per line; `label: synonym, synonym` adds other
names for the same class (their prompts are ensembled into the label's one
class vector, and tags are written under the first name). Blank lines and
lines starting with `#` are skipped. Built-in sets: `imagenet1k` (open_clip's
cleaned ImageNet class names), `cifar10`, `cifar100`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import InputError

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The CIFAR-100 fine label names in their standard (alphabetical) order, with
# underscores read as spaces so they work inside prompts.
CIFAR100 = tuple(
    name.replace("_", " ")
    for name in """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
    """.split()
)


@dataclass(frozen=True)
class Label:
    """One class: the name tags are written under, plus other names for the same thing."""

    name: str
    synonyms: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


def _imagenet1k() -> tuple[str, ...]:
    from open_clip import zero_shot_metadata

    return tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)


BUILTIN = {
    "imagenet1k": _imagenet1k,
    "cifar10": lambda: CIFAR10,
    "cifar100": lambda: CIFAR100,
}


def parse_labels(text: str, source: str = "label file") -> list[Label]:
    """Labels from label-file text; empty sets and duplicate names are errors."""
    labels: list[Label] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        name = " ".join(name.split())
        if not name:
            raise InputError(f"{source}, line {lineno}: a synonym list needs a label before the colon")
        synonyms = []
        for syn in rest.split(","):
            syn = " ".join(syn.split())
            if syn and syn.casefold() != name.casefold() and syn not in synonyms:
                synonyms.append(syn)
        key = name.casefold()
        if key in seen:
            raise InputError(f"{source}: label {name!r} appears twice (lines {seen[key]} and {lineno})")
        seen[key] = lineno
        labels.append(Label(name, tuple(synonyms)))
    if not labels:
        raise InputError(f"{source} has no labels (one label per line, `label: synonym, synonym`)")
    return labels


def load_labels(spec: str | Path) -> list[Label]:
    """A label file, or the name of a built-in set (a file of that name wins)."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read label file {path}: {exc}") from exc
        return parse_labels(text, f"label file {path}")
    if str(spec) in BUILTIN:
        return [Label(name) for name in BUILTIN[str(spec)]()]
    raise InputError(f"no label file {str(spec)!r} (built-in sets: {', '.join(BUILTIN)})")


def from_names(names: list[str] | tuple[str, ...]) -> list[Label]:
    """Labels from bare names (e.g. dataset folders), with the same duplicate check as files."""
    return parse_labels("\n".join(n.replace(":", " ") for n in names), "label list")


def label_set_name(spec: str | Path) -> str:
    """A short default name for a tag run made with this label set (file stem or built-in name)."""
    return str(spec) if str(spec) in BUILTIN and not Path(spec).is_file() else Path(spec).stem
