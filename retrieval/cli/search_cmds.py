"""`clipfind search | similar | serve`: ask a library, print what it answers.

Thin shells over `retrieval.query.search` (the query), `retrieval.query.render` (the
output) and `retrieval.serve` (the warm server and its client). When `clipfind serve` is
running for the library, search and similar send their query there and never
load the model themselves.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import click

from retrieval import config
from retrieval.cli.common import (
    MODEL_HELP,
    library_option,
    model_options,
    pop_model_options,
    runtime_option,
    warn,
)
from retrieval.errors import ClipfindError
from retrieval.query.types import (
    DEFAULT_TEMPLATES,
    MAX_WEIGHT,
    NEGATIVE_WEIGHT,
    Filters,
    Query,
    normalise_path_filter,
)

UNTIL_IRRELEVANT_K = 1000  # the cap on --until-irrelevant lists when -k is not given
DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"]

FORMULA_HELP = (
    "How terms combine (all embeddings unit length): q = normalise(sum_i w_i*p_i - L*sum_j n_j), "
    "p_i the positive texts, images and --concept directions with weights w_i (1 unless given), n_j "
    "the --not and --not-image terms, L the --not-weight. --more-like/--less-like then move q by "
    "Rocchio's rule: q' = normalise(q + 0.75*mean(more) - 0.15*mean(less)). Scores are cosine "
    "similarities to q; relevance (0-1) is calibrated per query against a fixed random sample of the "
    "library (see the README)."
)


def filter_options(func: Callable) -> Callable:
    """--path, --after, --before, --tag, --min-score, --min-relevance, --until-irrelevant: search and similar."""
    options = [
        click.option("--path", "path_filter", metavar="PREFIX|GLOB",
                     help="Only images under this folder (or file prefix), or whose full path matches "
                          "this glob (* ? [..], e.g. '*/2024/*.jpg'); relative to the current folder."),
        click.option("--after", type=click.DateTime(DATE_FORMATS), metavar="DATE",
                     help="Only images taken (EXIF) at or after DATE, else modified at or after it; "
                          "YYYY-MM-DD[ HH:MM[:SS]], local time."),
        click.option("--before", type=click.DateTime(DATE_FORMATS), metavar="DATE",
                     help="Only images taken (else modified) before DATE."),
        click.option("--tag", "tags", multiple=True, metavar="LABEL",
                     help="Only images tagged LABEL by `clipfind tag` (repeat: all of them)."),
        click.option("--min-score", type=float, metavar="S", help="Drop results scoring below S."),
        click.option("--min-relevance", type=click.FloatRange(0, 1), metavar="R",
                     help="Drop results whose calibrated relevance (0-1, the same scale for every "
                          "query) is below R."),
        click.option("--until-irrelevant", is_flag=True,
                     help="Stop the list where relevant results end (relevance below 0.8); -k then "
                          f"caps it (default {UNTIL_IRRELEVANT_K})."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def output_options(func: Callable) -> Callable:
    """-k/--top, --json, --paths, --paths0/--null, --html FILE, --server/--no-server."""
    options = [
        click.option("-k", "--top", "k", type=click.IntRange(1),
                     help="How many results (all, if the library holds fewer)  [default: 10]."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per result per line."),
        click.option("--paths", "as_paths", is_flag=True, help="Bare paths, one per line."),
        click.option("--paths0", "--null", "-0", "as_paths0", is_flag=True,
                     help="Bare paths separated by NUL bytes (for xargs -0)."),
        click.option("--html", "html_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Also write a self-contained HTML contact sheet (thumbnails, scores) to FILE."),
        click.option("--server/--no-server", "use_server", default=True, show_default=True,
                     help="Send the query to a running `clipfind serve` for this library, if any."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filters(path_filter, after, before, tags, min_score, min_relevance=None, until_irrelevant=False) -> Filters:
    return Filters(path=normalise_path_filter(path_filter) if path_filter else None, after=after,
                   before=before, tags=tuple(tags), min_score=min_score, min_relevance=min_relevance,
                   until_irrelevant=until_irrelevant)


def _k(k: int | None, until_irrelevant: bool) -> int:
    """-k, else 10, or UNTIL_IRRELEVANT_K when the relevance decides where the list ends."""
    return k if k is not None else UNTIL_IRRELEVANT_K if until_irrelevant else 10


def _format(as_json: bool, as_paths: bool, as_paths0: bool) -> str:
    chosen = [name for name, on in (("json", as_json), ("paths", as_paths), ("paths0", as_paths0)) if on]
    if len(chosen) > 1:
        raise click.UsageError("choose one of --json, --paths, --paths0")
    return chosen[0] if chosen else "table"


def _answer(kind: str, subject, k: int, filters: Filters, library_path, use_server: bool,
            model_kwargs: dict, runtime: str = "auto"):
    """Searcher.search/similar: by the library's warm server if one runs (and no model flags), else here."""
    spec, device, precision = pop_model_options(model_kwargs)
    root = config.library_path(library_path)
    if use_server and spec is None:
        from retrieval.serve.client import ServerUnavailable, ask, find_server

        info = find_server(root)
        if info is not None:
            try:
                return ask(info, kind, subject, filters, k)
            except ServerUnavailable as exc:
                warn(f"the clipfind server for this library did not answer ({exc}); searching here")
    from retrieval.query.search import Searcher
    from retrieval.store.fast_read import open_for_query  # SQLite: stdlib sqlite3, no SQLAlchemy

    with open_for_query(root, model=spec) as library:
        searcher = Searcher(library, spec, device, precision, runtime=runtime,
                            onnx_threads=config.query_threads(), one_shot=True)
        try:
            return getattr(searcher, kind)(subject, k, filters)
        finally:
            searcher.cache.close()  # nothing of this query is left open when `main` skips teardown


def _emit(response, fmt: str, html_file: str | None) -> None:
    from retrieval.cli import quick

    quick.emit(response, fmt)
    if html_file:
        from retrieval.query.render import write_html

        target = write_html(response, html_file)
        click.echo(f"wrote a contact sheet of {len(response.results)} images to {target}", err=True)
    quick.answered = True  # all written: `main` may skip the interpreter's teardown


@click.command("search", epilog=f"{FORMULA_HELP}\n\n{MODEL_HELP}")
@click.argument("texts", nargs=-1)
@click.option("--image", "-i", "images", multiple=True, metavar="FILE",
              help="Search by an example image (repeatable). An indexed file reuses its stored vector.")
@click.option("--weight", "image_weight", type=float, default=1.0, show_default=True,
              help="Weight of each --image against a text's 1. Any term can carry its own weight "
                   "as TERM^W, e.g. 'beach^2' or --image sunset.jpg^0.5.")
@click.option("--not", "not_texts", multiple=True, metavar="TEXT",
              help="Push results away from TEXT (repeatable).")
@click.option("--not-image", "not_images", multiple=True, metavar="FILE",
              help="Push results away from this image (repeatable).")
@click.option("--not-weight", type=click.FloatRange(0, MAX_WEIGHT), default=NEGATIVE_WEIGHT, show_default=True,
              help="L in the formula below: how hard --not terms push.")
@click.option("--template", "-t", default=DEFAULT_TEMPLATES, show_default=True, metavar="NAME|FILE",
              help="Prompt templates for texts: single, photo, simple7, imagenet80, or a file with "
                   "one template containing {} per line; the query is the average over them.")
@click.option("--raw", is_flag=True, help="Encode texts exactly as typed, without templates.")
@click.option("--concept", "concepts", multiple=True, metavar="NAME",
              help="Search by a concept learned with `clipfind concept learn` (repeatable; NAME^W weighs it).")
@click.option("--more-like", "more_like", multiple=True, metavar="FILE",
              help="Relevance feedback: move the query toward this image (repeatable; Rocchio).")
@click.option("--less-like", "less_like", multiple=True, metavar="FILE",
              help="Relevance feedback: move the query away from this image (repeatable).")
@filter_options
@output_options
@library_option
@runtime_option
@model_options
def search_command(texts, images, image_weight, not_texts, not_images, not_weight, template, raw, concepts,
                   more_like, less_like, path_filter, after, before, tags, min_score, min_relevance,
                   until_irrelevant, k, as_json, as_paths, as_paths0, html_file, use_server, library_path,
                   runtime, **model_kwargs) -> None:
    """Find images by TEXTS, example images, or both.

    \b
    Examples:
      clipfind search "a dog on a beach"
      clipfind search beach --image sunset.jpg --weight 0.5
      clipfind search "a city at night" --not people --after 2024-01-01
      clipfind search cat --path ~/Pictures/2023 --paths0 | xargs -0 ls -l
      clipfind search "red car" -k 50 --html cars.html
      clipfind search --concept my-dog --until-irrelevant --paths
      clipfind search "a dog" --more-like good.jpg --less-like wrong.jpg
    """
    if not texts and not images and not concepts and not more_like:
        raise click.UsageError("give a text to search for, --image FILE, --concept NAME or --more-like FILE")
    fmt = _format(as_json, as_paths, as_paths0)
    query = Query.build(texts, images, not_texts, not_images, image_weight=image_weight,
                        templates=template, raw=raw, negative_weight=not_weight, concepts=concepts,
                        more_like=more_like, less_like=less_like)
    filters = _filters(path_filter, after, before, tags, min_score, min_relevance, until_irrelevant)
    _emit(_answer("search", query, _k(k, until_irrelevant), filters, library_path, use_server, model_kwargs,
                  runtime), fmt, html_file)


@click.command("similar", epilog=MODEL_HELP)
@click.argument("path", type=click.Path(dir_okay=False))
@filter_options
@output_options
@library_option
@runtime_option
@model_options
def similar_command(path, path_filter, after, before, tags, min_score, min_relevance, until_irrelevant, k,
                    as_json, as_paths, as_paths0, html_file, use_server, library_path, runtime,
                    **model_kwargs) -> None:
    """Images most like PATH, best first; PATH itself is left out.

    Exact copies score 1.0, re-encoded or resized copies a little less, so
    `--min-score 0.95` keeps near-duplicates only (check the scores on your
    own collection first: how close "similar" is depends on the model).

    \b
    Examples:
      clipfind similar ~/Pictures/IMG_0042.jpg
      clipfind similar photo.jpg --min-score 0.95 --paths
    """
    fmt = _format(as_json, as_paths, as_paths0)
    filters = _filters(path_filter, after, before, tags, min_score, min_relevance, until_irrelevant)
    _emit(_answer("similar", path, _k(k, until_irrelevant), filters, library_path, use_server, model_kwargs,
                  runtime), fmt, html_file)


@click.command("serve", epilog=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback lets the network reach your photos: "
                   "keep the token secret.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port (0: any free one; the chosen URL is printed and written to serve.json).")
@click.option("--token", metavar="TOKEN",
              help="The secret every request must carry (default: a new random one, printed in the "
                   "login URL and written to serve.json).")
@click.option("--verbose", "-v", is_flag=True, help="Log every request to stderr.")
@click.option("--threads", type=click.IntRange(1), metavar="N",
              help="Encoder threads per query (default: 1, and for a text query on ONNX Runtime "
                   "every core, up to 4, while nothing else runs on them).")
@library_option
@runtime_option
@model_options
def serve_command(host, port, token, verbose, threads, library_path, runtime, **model_kwargs) -> None:
    """Serve the library in a browser (search, photos, tags, status) and answer the CLI.

    Open the printed login URL once; the browser keeps a cookie. While it runs,
    `clipfind search` and `similar` on the same library ask it instead of
    loading the model themselves. Scripts send `Authorization: Bearer TOKEN`
    (the token is in serve.json); the JSON API is described at /docs.

    \b
    Examples:
      clipfind serve                       # then open the printed URL
      clipfind serve --host 0.0.0.0 --port 8080 --token "$(cat ~/.clipfind-token)"
      clipfind search "a red car"          # answered by the server
    """
    import secrets

    from retrieval.query.runtime import serving_options
    from retrieval.query.search import QUERY_THREADS, Searcher
    from retrieval.serve.client import is_loopback
    from retrieval.store.library import Library

    try:
        from retrieval.serve.runner import WebServer, quiet_logging
        from retrieval.serve.state import ServeState
    except ImportError as exc:  # a partial install: say what is missing, not a traceback
        raise ClipfindError(f"the web server needs {exc.name}: pip install 'clipfind[web]'") from None

    spec, device, precision = pop_model_options(model_kwargs)
    if token is not None and len(token) < 16:
        raise click.BadParameter("use at least 16 characters", param_hint="--token")
    if not is_loopback(host):
        warn(f"listening on {host}: anyone who can reach it and has the token can see your photos")
    library = Library.open(config.library_path(library_path), model=spec, create=False)
    searcher = Searcher(library, spec, device, precision, runtime=runtime,
                        query_threads=threads or QUERY_THREADS, onnx_options=serving_options(threads))
    state = ServeState(library, searcher, token=token or secrets.token_urlsafe(24))
    quiet_logging(verbose)
    try:
        server = WebServer(state, host, port, verbose=verbose)
    except OSError as exc:
        state.close()
        library.close()
        raise ClipfindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for message in dict.fromkeys(_warm_up(searcher)):  # once each, in order
        warn(message)
    server.announce()
    click.echo(f"clipfind serve: {server.url} for {library.root} (Ctrl-C to stop)")
    click.echo(f"open {server.login_url}")
    sys.stdout.flush()
    # uvicorn stops cleanly on SIGINT/SIGTERM, then raises the signal again for the handler it
    # found: make that one a KeyboardInterrupt, so serve.json is withdrawn below.
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.withdraw()
        state.close()
        library.close()


def _stop(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _warm_up(searcher) -> list[str]:
    """Load what the first queries would: the index, both towers (ONNX Runtime when the library
    has an export, else torch), one text through its tower. Returns the notices to show
    (runtime fallbacks, random weights)."""
    from retrieval.query.types import Query

    searcher.fresh_vectors()
    notices: list[str] = []
    searcher.runtimes.warm_up(notices)
    return notices + searcher.search(Query.build("a photo"), k=1).warnings


COMMANDS = [search_command, similar_command, serve_command]
