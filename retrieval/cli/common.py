"""Options and output helpers shared by every command, so each command stays a thin shell."""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from retrieval import config
from retrieval.errors import ModelError
from retrieval.model.spec import PRECISIONS, RUNTIMES, ModelSpec

MODEL_HELP = (
    "Model: --model NAME --pretrained TAG (open_clip weights, fetched when online), "
    "--model NAME --checkpoint FILE (a local open_clip state dict), --model-dir DIR "
    "(open_clip_config.json + weights), or --model NAME --random-weights (plumbing tests only)."
)


def library_option(func: Callable) -> Callable:
    """--library/-L, and --db (a PostgreSQL URL for the metadata; the folder keeps the caches)."""
    func = click.option(
        "--db", metavar="URL", envvar=config.ENV_DB, expose_value=False, is_eager=True,
        callback=lambda _ctx, _param, value: config.use_database(value),
        help="Keep the library's metadata in PostgreSQL: postgresql+psycopg://USER@HOST:PORT/DB "
             "($CLIPFIND_DB; the folder remembers it). Default: the folder's SQLite file.",
    )(func)
    return click.option(
        "--library", "-L", "library_path", type=click.Path(file_okay=False), envvar=config.ENV_LIBRARY,
        help="Library directory (default: $CLIPFIND_HOME, else ~/.local/share/clipfind).",
    )(func)


def json_option(func: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(func)


def model_options(func: Callable) -> Callable:
    """--model/--pretrained/--checkpoint/--model-dir/--random-weights/--device/--precision."""
    options = [
        click.option("--model", "model_name", help="open_clip architecture, e.g. ViT-B-32."),
        click.option("--pretrained", help="open_clip pretrained tag (or a weights file)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local open_clip state dict."),
        click.option("--model-dir", type=click.Path(file_okay=False), help="open_clip local-dir model folder."),
        click.option("--random-weights", is_flag=True, help="Random weights: plumbing tests only."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="Encoder precision; auto = fp16 on GPU, measured best on CPU."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def runtime_option(func: Callable) -> Callable:
    """--runtime auto|onnx|torch: who encodes query texts and images."""
    return click.option(
        "--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
        help="Who encodes the query: onnx (ONNX Runtime, no torch import: a fresh query in about a "
             "second), torch, or auto (onnx when the library's export is usable, else torch, "
             "with a one-line notice).")(func)


def spec_from_options(model_name, pretrained, checkpoint, model_dir, random_weights) -> ModelSpec | None:
    """The ModelSpec the flags describe, or None when no model flag was given."""
    if not any([model_name, pretrained, checkpoint, model_dir, random_weights]):
        return None
    return ModelSpec(model=model_name, pretrained=pretrained, checkpoint=checkpoint,
                     model_dir=model_dir, random_weights=random_weights)


def pop_model_options(kwargs: dict) -> tuple[ModelSpec | None, str, str]:
    """Take the model flags out of a command's kwargs: (spec or None, device, precision)."""
    spec = spec_from_options(*(kwargs.pop(k) for k in
                               ("model_name", "pretrained", "checkpoint", "model_dir", "random_weights")))
    return spec, kwargs.pop("device"), kwargs.pop("precision")


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, default=str, ensure_ascii=False))


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def note_random(spec: ModelSpec | None) -> None:
    """Every output made with random weights says so, on stderr so pipes stay clean."""
    if spec is not None and spec.random_weights:
        warn(f"using {spec.label}")


__all__ = ["ModelError", "MODEL_HELP"]
