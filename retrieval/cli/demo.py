"""`clipfind demo`: the whole job on a fresh machine with no network, in one command.

Draws a sample collection, indexes it with the best model available offline,
then runs one text search and one image search (with a picture that is not in
the collection) and prints both tables.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import click

from retrieval.cli.common import emit_json, json_option
from retrieval.errors import LibraryError


def default_demo_dir() -> Path:
    from retrieval import config

    return config.cache_root() / "demo"


def _make_collection(folder: Path, per_class: int) -> None:
    from retrieval.media.synthetic import write_collection

    if folder.is_dir() and any(folder.rglob("*.jpg")):
        return  # drawn before: same seed, same pictures
    write_collection(folder, per_class=per_class, seed=2026, size=256, fmt="jpg")


def _make_query_image(target: Path, label: str) -> Path:
    from retrieval.media.synthetic import draw

    draw(label, 256, random.Random(99)).save(target, quality=92)  # a seed the collection never used
    return target


def _open_library(root: Path, spec):
    """Open the demo library; if it was made with another model (say real weights appeared), start over."""
    from retrieval.facade import Library

    try:
        return Library.open(root, model=spec)
    except LibraryError:
        shutil.rmtree(root)
        return Library.open(root, model=spec)


@click.command("demo")
@click.option("--dir", "demo_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to put the sample collection and its library (default: ~/.cache/clipfind/demo).")
@click.option("--text", "query_text", default="red circle", show_default=True, help="The text query to run.")
@click.option("--per-class", default=8, show_default=True, type=click.IntRange(1, 500),
              help="Sample images drawn per class (12 classes).")
@click.option("-k", "--top", "k", default=5, show_default=True, type=click.IntRange(1))
@json_option
def demo_command(demo_dir: Path | None, query_text: str, per_class: int, k: int, as_json: bool) -> None:
    """Make a sample collection, index it, and search it by text and by image.

    Uses pretrained CLIP weights when they are already on this machine (Hugging
    Face cache or $CLIPFIND_MODEL_DIR); otherwise trains, once, the tiny CLIP
    model clipfind uses for its tests (about a minute on 2 cores). No network.

    \b
    Examples:
      clipfind demo
      clipfind demo --text "blue triangle" --json
    """
    from retrieval.devmodels.catalog import best_offline_spec
    from retrieval.query import render

    demo_dir = demo_dir or default_demo_dir()
    say = (lambda msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    say("choosing a model (no network needed)...")
    spec, why = best_offline_spec(log=say)
    say(f"model: {spec.label}\n       ({why})")

    collection = demo_dir / "collection"
    _make_collection(collection, per_class)
    query_image = _make_query_image(demo_dir / "query-blue-square.jpg", "blue square")

    with _open_library(demo_dir / "library", spec) as library:
        result = library.index([collection], spec, progress=not as_json)
        by_text = library.search(query_text, k=k)
        by_image = library.search(image=str(query_image), k=k)

    if as_json:
        emit_json({"model": spec.label, "model_reason": why, "collection": str(collection),
                   "library": str(demo_dir / "library"), "indexed": result.stats,
                   "text_query": query_text, "text_results": [r.to_dict() for r in by_text],
                   "image_query": str(query_image), "image_results": [r.to_dict() for r in by_image]})
        return
    click.echo(f"\nmodel: {spec.label}")
    click.echo(f"collection: {collection} ({result.plan.scanned} images)")
    click.echo(f"\ntext search: {query_text!r}")
    click.echo(render.table(list(by_text)))
    click.echo(f"\nimage search: {query_image} (not in the collection)")
    click.echo(render.table(list(by_image)))
    lib = demo_dir / "library"
    click.echo(f"\nnext: clipfind search -L {lib} \"green triangle\"   |   clipfind status -L {lib}")


COMMANDS = [demo_command]
