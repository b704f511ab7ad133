"""`clipfind concept learn | list | show | remove`: concepts taught from a few example images.

Thin shells over `retrieval.learn.concepts` (learning) and `retrieval.store.concepts`
(the stored rows). Searching by a concept is `clipfind search --concept NAME`;
tagging with every concept is `clipfind tag --concepts`.
"""

from __future__ import annotations

import click

from retrieval.cli.common import (
    MODEL_HELP,
    emit_json,
    json_option,
    library_option,
    model_options,
    note_random,
    pop_model_options,
    warn,
)

METHOD_HELP = (
    "probe (default for auto): logistic regression over the stored vectors, pulled toward --prompt; "
    "milliseconds. coop: the prompt's context words learned through the text tower; seconds to "
    "minutes on a CPU. tip-f learns label sets: see `clipfind tag --shots DIR --train`."
)


@click.group("concept")
def concept_group() -> None:
    """Teach the library a concept from a few example images, then search or tag with it."""


@concept_group.command("learn", epilog=MODEL_HELP)
@click.argument("name")
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--positive", "-p", "positives", multiple=True, metavar="FILE|DIR",
              help="An example of the concept: an image or a folder of them (repeatable; FILES after NAME "
                   "count too).")
@click.option("--negative", "-n", "negatives", multiple=True, metavar="FILE|DIR",
              help="A counter-example (repeatable). Default: a random sample of the library.")
@click.option("--prompt", help='Words for the concept, e.g. "a photo of my dog": a prior that keeps 1-2 '
                               "examples from overfitting.")
@click.option("--method", type=click.Choice(["auto", "probe", "coop", "tip-f"]), default="auto",
              show_default=True, help=METHOD_HELP)
@click.option("--replace", is_flag=True, help="Replace a concept of the same name.")
@library_option
@model_options
@json_option
def learn_command(name, files, positives, negatives, prompt, method, replace, library_path, as_json,
                  **model_kwargs) -> None:
    """Learn concept NAME from example images (files or folders), and store it in the library.

    Examples already in the library reuse their stored vectors; others are
    encoded on the fly (a notice says how many).

    \b
    Examples:
      clipfind concept learn my-dog ~/Pictures/rex/*.jpg --prompt "a photo of my dog"
      clipfind concept learn defect -p examples/defect/ -n examples/good/
      clipfind search --concept my-dog --until-irrelevant
    """
    from retrieval.learn.concepts import learn_concept
    from retrieval.store.library import Library

    spec, device, precision = pop_model_options(model_kwargs)
    with Library.open(library_path, model=spec, create=False) as library:
        if spec is not None or device != "auto" or precision != "auto":
            library.encoder(spec, device, precision)
        note_random(spec)
        result = learn_concept(library, name, list(positives) + list(files), list(negatives), prompt, method,
                               replace)
    if as_json:
        emit_json(result.to_dict())
        return
    for note in result.notes:
        warn(note)
    params = result.concept.params
    click.echo(f"learned concept {result.concept.name!r} ({result.concept.method}) from {params['positives']} "
               f"positive and {params['negatives']} negative examples ({params['negative_source']}) "
               f"in {result.seconds:.2f} s")


@concept_group.command("list")
@library_option
@json_option
def list_command(library_path, as_json) -> None:
    """Every stored concept (one JSON object per line with --json).

    \b
    Examples:
      clipfind concept list
      clipfind concept list --json | jq .name
    """
    from retrieval.store.concepts import list_concepts
    from retrieval.store.library import Library

    with Library.open(library_path, create=False) as library:
        concepts = list_concepts(library)
        fingerprint = (library.model_record or {}).get("fingerprint")
    for concept in concepts:
        usable = concept.fingerprint == fingerprint
        if as_json:
            emit_json({**concept.to_dict(), "usable": usable})
            continue
        other = "" if usable else "  (learned with another model: unusable)"
        prompt = f'  "{concept.prompt}"' if concept.prompt else ""
        click.echo(f"{concept.name}\t{concept.method}\t{concept.params.get('positives', '?')} positives{prompt}{other}")
    if not concepts and not as_json:
        click.echo("no concepts yet (clipfind concept learn NAME FILES...)")


@concept_group.command("show")
@click.argument("name")
@click.option("--vector", is_flag=True, help="Include the concept's direction (with --json).")
@library_option
@json_option
def show_command(name, vector, library_path, as_json) -> None:
    """What concept NAME was learned from, and how it scores.

    \b
    Examples:
      clipfind concept show my-dog
      clipfind concept show my-dog --json --vector
    """
    from retrieval.store.concepts import load_concept
    from retrieval.store.library import Library

    with Library.open(library_path, create=False) as library:
        concept = load_concept(library, name)
    if as_json:
        emit_json(concept.to_dict(with_vector=vector))
        return
    click.echo(f"concept:   {concept.name}\nmethod:    {concept.method}\nprompt:    {concept.prompt or '-'}\n"
               f"examples:  {concept.params.get('positives')} positive, {concept.params.get('negatives')} "
               f"negative ({concept.params.get('negative_source')})\n"
               f"scoring:   P = sigmoid({concept.scale:.3f} * cosine + {concept.bias:.3f}); "
               f"P = 0.5 at cosine {concept.threshold:.4f}\nlearned:   {concept.created_at}")


@concept_group.command("remove")
@click.argument("name")
@library_option
@json_option
def remove_command(name, library_path, as_json) -> None:
    """Delete concept NAME.

    \b
    Example:
      clipfind concept remove my-dog
    """
    from retrieval.store.concepts import remove_concept
    from retrieval.store.library import Library

    with Library.open(library_path, create=False) as library:
        remove_concept(library, name)
    if as_json:
        emit_json({"removed": name})
    else:
        click.echo(f"removed concept {name!r}")


COMMANDS = [concept_group]
