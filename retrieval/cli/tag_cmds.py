"""`clipfind tag | tags | eval zeroshot | eval retrieval | prompts generate`.

Thin shells over `retrieval.tagging.autotag`, `retrieval.tagging.evaluate` and
`retrieval.prompting.cupl`; torch and open_clip load inside the commands so `--help`
and `prompts generate` stay light.
"""

from __future__ import annotations

import csv
import os
import sys

import click

from retrieval import config
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
from retrieval.errors import InputError, ModelError
from retrieval.query.render import shown_path

STRATEGY_HELP = (
    "Prompt strategy: raw, template[:TEXT] (default 'a photo of a {}.'), "
    "ensemble[:imagenet80|simple7|cifar10|FILE], cupl[:FILE|cifar10]; join parts with + "
    "(ensemble+cupl, ensemble:cifar10+cupl:cifar10)."
)
LABELS_HELP = "Label file (one per line, `label: synonym, synonym`) or a built-in set: imagenet1k, cifar10, cifar100."


def _options(*decorators):
    """Several click decorators as one, applied in the order they are listed (top first)."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


_shots_options = _options(
    click.option("--shots", type=click.Path(file_okay=False),
                 help="Tip-Adapter: a folder with one sub-folder of example images per label."),
    click.option("--alpha", type=float, help="Tip-Adapter weight of the example cache (default 1)."),
    click.option("--beta", type=float, help="Tip-Adapter sharpness (default 5.5)."),
    click.option("--search-alpha-beta", is_flag=True,
                 help="Pick alpha and beta by leave-one-out accuracy on the examples."),
)
_eval_options = _options(
    click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True),
    click.option("--workers", type=click.IntRange(0), help="Decode worker processes (default: by dataset size)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    library_option,
    model_options,
    json_option,
)


@click.command("tag", epilog=MODEL_HELP)
@library_option
@click.option("--labels", "labels_spec", help=LABELS_HELP)
@click.option("--concepts", "use_concepts", is_flag=True,
              help="Tag with every concept learned by `clipfind concept learn` instead of --labels "
                   "(run name 'concepts'; each concept's own decision point).")
@click.option("--strategy", default="template", show_default=True, help=STRATEGY_HELP)
@click.option("--descriptions", type=click.Path(dir_okay=False), help="CuPL descriptions JSON {label: [sentences]}.")
@_shots_options
@click.option("--train", is_flag=True, help="Tip-Adapter-F: fine-tune the --shots cache keys (a few seconds) "
              "before tagging.")
@click.option("--name", help="Tag run name (default: the label set's name). Re-using a name replaces that run.")
@click.option("--top-k", type=click.IntRange(1), help="Keep at most this many labels per image (default 1; "
              "multi-label: all that pass).")
@click.option("--threshold", type=float, help="Single-label: minimum probability. Multi-label: minimum score "
              "(cosine) for every label.")
@click.option("--calibrate", is_flag=True, help="Multi-label with per-label thresholds fitted on this library "
              "(no labelled data needed; the default in multi-label mode).")
@click.option("--multi-label", is_flag=True, help="Judge each label on its own instead of a softmax over labels.")
@click.option("--wait", is_flag=True, help="If another command is writing this library, wait for it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@model_options
@json_option
def tag_command(library_path, labels_spec, use_concepts, strategy, descriptions, shots, alpha, beta,
                search_alpha_beta, train, name, top_k, threshold, calibrate, multi_label, wait, quiet, as_json,
                **model_kwargs) -> None:
    """Auto-tag every image in the library from its stored vectors (no pixels decoded).

    \b
    Examples:
      clipfind tag --labels animals.txt
      clipfind tag --labels animals.txt --strategy ensemble+cupl --descriptions animals.json
      clipfind tag --labels cifar10 --shots ./examples --search-alpha-beta
      clipfind tag --labels scenes.txt --multi-label --calibrate
      clipfind tag --labels cifar10 --shots ./examples --train      # Tip-Adapter-F
      clipfind tag --concepts
    """
    from retrieval.facade import Library
    from retrieval.tagging.autotag import TagOptions

    if bool(labels_spec) == use_concepts:
        raise click.UsageError("give --labels FILE or --concepts (one of them)")
    spec, device, precision = pop_model_options(model_kwargs)
    options = TagOptions(top_k=top_k, threshold=threshold, multi_label=multi_label, calibrate=calibrate)
    with Library.open(library_path, model=spec, create=False) as library:
        if use_concepts:
            from retrieval.tagging.concept_tags import RUN_NAME, tag_concepts

            result = tag_concepts(library, name or RUN_NAME, top_k, progress=not quiet and not as_json, wait=wait)
        else:
            encoder = library.encoder(spec, device, precision)
            note_random(encoder.spec)
            result = library.tag(labels_spec, strategy, name=name, descriptions=descriptions, shots=shots,
                                 alpha=alpha, beta=beta, search_alpha_beta=search_alpha_beta, options=options,
                                 progress=not quiet and not as_json, wait=wait, train=train)
    if as_json:
        emit_json(result.to_dict())
        return
    for note in result.notes:
        warn(note)
    click.echo(f"tag run {result.name!r} ({result.strategy}, {result.mode}): {result.tags} tags on "
               f"{result.images} images in {result.seconds:.1f} s ({result.images_per_s:,.0f} images/s)")


@click.command("tags")
@library_option
@click.option("--run", help="Only this tag run.")
@click.option("--label", help="Only this label.")
@click.option("--runs", "list_runs", is_flag=True, help="List the tag runs instead of their tags.")
@click.option("--limit", type=click.IntRange(1), help="At most this many rows.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header: run,image_id,path,label,score,rank.")
@json_option
def tags_command(library_path, run, label, list_runs, limit, as_csv, as_json) -> None:
    """List or export tags (one row per image and label), best first per image.

    \b
    Examples:
      clipfind tags --runs
      clipfind tags --run animals --label cat
      clipfind tags --run animals --csv > tags.csv
    """
    from retrieval.store.library import Library
    from retrieval.tagging import autotag as tagging

    if as_csv and as_json:
        raise click.UsageError("choose one of --csv and --json")
    with Library.open(library_path, create=False) as library:
        if list_runs:
            runs = tagging.list_runs(library)
            if as_json:
                for r in runs:
                    emit_json(r)
            for r in [] if as_json else runs:
                click.echo(f"{r['name']}\t{r['strategy']}\t{r['labels']} labels\t{r['tags']} tags\t{r['created_at']}")
            return
        rows = tagging.query_tags(library, run=run, label=label, limit=limit)
        if as_csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(["run", "image_id", "path", "label", "score", "rank"])
            for r in rows:
                writer.writerow([r["run"], r["image_id"], shown_path(r["path"]), r["label"], repr(r["score"]), r["rank"]])
        elif as_json:
            for r in rows:
                emit_json({**r, "path": shown_path(r["path"])})
        else:
            for r in rows:
                click.echo(f"{shown_path(r['path'])}\t{r['label']}\t{r['score']:.4f}\t{r['run']}")


# -- eval ------------------------------------------------------------------------------------
@click.group("eval")
def eval_group() -> None:
    """Measure zero-shot accuracy per prompt strategy, or text→image recall."""


def _eval_encoder(library_path, model_kwargs):
    """The model the flags name, else the library's model."""
    from retrieval.model.encoder import Encoder
    from retrieval.store.library import Library, library_exists

    spec, device, precision = pop_model_options(model_kwargs)
    if spec is not None:
        note_random(spec)
        return Encoder(spec, device=device, precision=precision)
    root = config.library_path(library_path)
    if not library_exists(root):
        raise ModelError("name a model (--model-dir DIR, or --model NAME --checkpoint FILE) or a --library")
    library = Library.open(root, create=False)
    return library.encoder(None, device, precision)


def _workers(workers: int | None, n: int) -> int:
    if workers is not None:
        return workers
    return 0 if n < 512 else max(1, min(4, config.usable_cores() - 1))


@eval_group.command("zeroshot", epilog=MODEL_HELP)
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--strategy", "strategies", multiple=True, help=STRATEGY_HELP + " Repeat to compare.")
@click.option("--labels", "labels_spec", help="Label file giving names/synonyms for the dataset's classes.")
@click.option("--descriptions", type=click.Path(dir_okay=False), help="CuPL descriptions JSON.")
@_shots_options
@_eval_options
def eval_zeroshot(dataset, strategies, labels_spec, descriptions, shots, alpha, beta, search_alpha_beta,
                  batch_size, workers, quiet, library_path, as_json, **model_kwargs) -> None:
    """Top-1/top-5 zero-shot accuracy on DATASET for each --strategy, side by side.

    DATASET is an image folder (one sub-folder per class) or a CSV of path,label.
    With --shots, each strategy is also scored with Tip-Adapter on top.

    \b
    Examples:
      clipfind eval zeroshot ./cifar10/test --model-dir ./model --strategy template --strategy ensemble
      clipfind eval zeroshot data.csv --strategy ensemble+cupl --descriptions desc.json --json
    """
    from retrieval.prompting.cupl import load_descriptions
    from retrieval.tagging import evaluate
    from retrieval.tagging.labels import load_labels

    strategies = list(strategies) or ["template"]
    data = evaluate.load_classification(dataset)
    labels = load_labels(labels_spec) if labels_spec else None
    desc = load_descriptions(descriptions) if descriptions else None
    encoder = _eval_encoder(library_path, model_kwargs)
    result = evaluate.zeroshot(encoder, data, strategies, labels, desc, shots, alpha, beta, search_alpha_beta,
                               batch_size, _workers(workers, len(data.paths)), progress=not quiet and not as_json)
    if as_json:
        emit_json(result)
        return
    for note in result["notes"]:
        warn(note)
    click.echo(f"{result['dataset']['images']} images, {result['dataset']['classes']} classes "
               f"(chance top-1 {result['chance_top1']:.3f}); encoded at {result['encode_images_per_s']:,.0f} images/s")
    width = max(len("strategy"), *(len(r["strategy"]) for r in result["results"]))
    click.echo(f"{'strategy':<{width}}  {'top-1':>6}  {'top-5':>6}  {'images/s':>9}  {'texts':>6}")
    for r in result["results"]:
        extra = f"  alpha={r['alpha']:g} beta={r['beta']:g} ({r['alpha_beta']})" if "alpha" in r else ""
        click.echo(f"{r['strategy']:<{width}}  {r['top1']:>6.3f}  {r['top5']:>6.3f}  {r['images_per_s']:>9,.0f}  "
                   f"{r['texts']:>6}{extra}")


@eval_group.command("retrieval", epilog=MODEL_HELP)
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@_eval_options
def eval_retrieval(captions, batch_size, workers, quiet, library_path, as_json, **model_kwargs) -> None:
    """Text→image recall@1/5/10 on CAPTIONS, a CSV of path,caption (several captions per image allowed)."""
    from retrieval.tagging import evaluate

    encoder = _eval_encoder(library_path, model_kwargs)
    result = evaluate.retrieval(encoder, captions, batch_size, _workers(workers, 0), progress=not quiet and not as_json)
    if as_json:
        emit_json(result)
        return
    click.echo(f"{result['captions']} captions, {result['images']} images: recall@1 {result['recall@1']:.3f}  "
               f"recall@5 {result['recall@5']:.3f}  recall@10 {result['recall@10']:.3f}  "
               f"mean rank {result['mean_rank']:.1f}  ({result['encode_images_per_s']:,.0f} images/s)")


# -- prompts generate --------------------------------------------------------------------------
@click.group("prompts")
def prompts_group() -> None:
    """Write CuPL descriptions for a label set with a language model."""


@prompts_group.command("generate")
@click.option("--labels", "labels_spec", required=True, help=LABELS_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Descriptions JSON to write.")
@click.option("--api-base", envvar="OPENAI_BASE_URL", default="http://127.0.0.1:8000/v1", show_default=True,
              help="OpenAI-compatible API base (…/v1); env OPENAI_BASE_URL.")
@click.option("--model", "llm_model", envvar=config.ENV_LLM_MODEL, required=True,
              help="Chat model name the endpoint serves; env CLIPFIND_LLM_MODEL.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the API key (none needed for local servers).")
@click.option("--per-question", type=click.IntRange(1), default=5, show_default=True,
              help="Answers sampled per question (5 questions per label).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for one answer.")
@click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
              help="Retries per question, with exponential backoff.")
@click.option("--backoff", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="First retry delay in seconds (doubles each time).")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False),
              help="Answer cache (default OUT.cache.jsonl); a re-run asks only what is missing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def prompts_generate(labels_spec, out, api_base, llm_model, api_key_env, per_question, timeout, retries, backoff,
                     cache_path, quiet, as_json) -> None:
    """Ask an LLM CuPL's questions about every label; write {label: [sentences]} to --out.

    \b
    Examples:
      clipfind prompts generate --labels animals.txt --out animals.json \\
          --api-base http://127.0.0.1:8000/v1 --model llama3
      clipfind tag --labels animals.txt --strategy ensemble+cupl --descriptions animals.json
    """
    from tqdm import tqdm

    from retrieval.prompting import cupl
    from retrieval.tagging.labels import load_labels

    labels = [label.name for label in load_labels(labels_spec)]
    if not api_base.startswith(("http://", "https://")):
        raise InputError(f"--api-base must be an http(s) URL, not {api_base!r}")
    client = cupl.ChatClient(api_base, llm_model, os.environ.get(api_key_env) or None, timeout, retries, backoff)
    total = len(labels) * len(cupl.QUESTIONS)
    with tqdm(total=total, disable=quiet or as_json, unit="q", desc="asking", leave=False) as bar:
        stats = cupl.generate(labels, client, out, per_question, cache_path=cache_path, progress=bar.update)
    if as_json:
        emit_json(stats)
        return
    if stats["labels_without_answers"]:
        warn(f"no usable answers for {len(stats['labels_without_answers'])} labels (they will use templates): "
             + ", ".join(stats["labels_without_answers"][:5]))
    click.echo(f"wrote descriptions for {stats['labels']} labels to {stats['out']} "
               f"({stats['questions_asked']} questions asked, {stats['answered_from_cache']} from the cache)")


COMMANDS = [tag_command, tags_command, eval_group, prompts_group]
