"""`clipfind index --engine ray [...]` and `clipfind ingest`: the distributed path, kept apart.

The options are added to `index` by `engine_options`; nothing here imports Ray (or numpy)
until `--engine ray` is given, so `clipfind --help` and a plain `index` stay light.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from retrieval import config
from retrieval.cli.common import emit_json, json_option, library_option
from retrieval.cli.skips import report_skipped, skipped_json

ENGINES = ("local", "ray")


def engine_options(func: Callable) -> Callable:
    """--engine, --ray-address, --ray-actors, --output-shards (for `index`)."""
    options = [
        click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                     help="Who decodes and encodes: this process with DataLoader workers (local), or a "
                          "Ray Data pipeline (ray; pip install 'clipfind[ray]')."),
        click.option("--ray-address", metavar="ADDR",
                     help="With --engine ray: the cluster's head (HOST:PORT, ray://HOST:PORT or auto); "
                          "default: start a local cluster on this machine."),
        click.option("--ray-actors", type=click.IntRange(1),
                     help="With --engine ray: encoder actors (default: one per GPU, else 1)."),
        click.option("--output-shards", type=click.Path(file_okay=False), metavar="DIR",
                     help="With --engine ray: write parquet shards + manifest to DIR instead of the library "
                          "(load them with `clipfind ingest DIR`)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def pop_engine_options(kwargs: dict):
    """(stages factory for index_paths or None, RayOptions or None, shards dir or None), checked
    before anything is opened: a Ray address that does not answer fails here, writing nothing."""
    engine, address, actors, shards = (kwargs.pop(k) for k in
                                       ("engine", "ray_address", "ray_actors", "output_shards"))
    if engine == "local":
        if address or actors or shards:
            raise click.UsageError("--ray-address, --ray-actors and --output-shards go with --engine ray")
        return None, None, None
    from retrieval.index.ray_pipeline import RayOptions, check_address

    check_address(address)
    options = RayOptions(address=address, actors=actors)
    from retrieval.index.ray_engine import ray_stages

    return ray_stages(options), options, shards


def run_export(library_path, roots, shards_dir, spec, device, precision, options, ray, as_json) -> None:
    """`index --engine ray --output-shards DIR`: plan against the library if there is one; write shards."""
    from retrieval.errors import ModelError
    from retrieval.index.indexer import NO_MODEL
    from retrieval.index.ray_engine import export_shards
    from retrieval.store.library import DB_NAME, Library

    root = config.library_path(library_path)
    library = Library.open(root, model=spec, create=False) if (root / DB_NAME).exists() else None
    if library is None and spec is None:
        raise ModelError(NO_MODEL)
    try:
        stats = export_shards(library, roots, shards_dir, spec, device, precision, options, ray)
    finally:
        if library is not None:
            library.close()
    if as_json:
        emit_json(stats)
        return
    click.echo(f"wrote {stats['rows']} rows in {stats['files']} shards to {stats['shards']} "
               f"(encoded {stats['encoded']} now, {stats['already_in_shards']} were there already, "
               f"{stats['skipped']} skipped) in {stats['seconds']:.1f} s")
    click.echo(f"load them with: clipfind ingest {stats['shards']} -L LIBRARY")


@click.command("ingest")
@click.argument("shards_dir", type=click.Path(), metavar="SHARDS_DIR")
@click.argument("library_arg", required=False, type=click.Path(file_okay=False), metavar="[LIBRARY]")
@library_option
@click.option("--wait", is_flag=True, help="Wait for a running writer instead of refusing.")
@click.option("--verbose", "-v", is_flag=True, help="List every file the workers could not decode.")
@json_option
def ingest_command(shards_dir, library_arg, library_path, wait, verbose, as_json) -> None:
    """Load the shards `index --engine ray --output-shards` wrote into a library.

    Every shard is checked first (size, checksum, model): a truncated shard or
    one made with another model is refused and nothing is written. Loading the
    same shards again adds nothing. Files the workers could not decode are
    recorded as the run's skips, as `index` records them. LIBRARY may be given
    here or with -L.

    \b
    Examples:
      clipfind index /data/photos --engine ray --ray-address head:6379 --output-shards /shared/shards
      clipfind ingest /shared/shards ~/photos-library
      clipfind ingest /shared/shards -L ~/photos-library --json
    """
    from retrieval.index.ingest import checked_manifest, ingest_shards
    from retrieval.store.library import Library

    if library_arg and library_path:
        raise click.UsageError("give the library once: as LIBRARY or with --library, not both")
    manifest = checked_manifest(shards_dir)  # before a library is opened, let alone made
    with Library.open(library_arg or library_path) as library:
        stats = ingest_shards(library, shards_dir, wait=wait, manifest=manifest)
    if as_json:
        emit_json({**stats, "skipped_files": skipped_json(stats["skipped_files"])})
        return
    click.echo(f"ingested {stats['shards']} shards ({stats['rows']} rows): {stats['added']} added, "
               f"{stats['updated']} updated, {stats['unchanged']} already there"
               + (f", {stats['stale']} older than the library's" if stats["stale"] else "")
               + f", in {stats['seconds']:.1f} s; library {stats['library']}")
    report_skipped(stats["skipped_files"], verbose, quiet=False)


COMMANDS = [ingest_command]
