"""`clipfind models`: what architectures and pretrained tags open_clip knows, offline."""

from __future__ import annotations

import click

from retrieval.cli.common import emit_json, json_option


@click.command("models")
@click.option("--pretrained", "show_tags", is_flag=True, help="Also list each model's pretrained tags.")
@click.argument("pattern", required=False)
@json_option
def models_command(show_tags: bool, pattern: str | None, as_json: bool) -> None:
    """List open_clip architectures (optionally matching PATTERN).

    \b
    Examples:
      clipfind models ViT-B
      clipfind models --pretrained ViT-B-32
    """
    import open_clip

    names = [n for n in open_clip.list_models() if not pattern or pattern.lower() in n.lower()]
    rows = [{"model": n, "pretrained": open_clip.list_pretrained_tags_by_model(n) if show_tags else None}
            for n in names]
    if as_json:
        for row in rows:
            emit_json(row)
        return
    for row in rows:
        tags = f"  {', '.join(row['pretrained'])}" if row["pretrained"] else ""
        click.echo(f"{row['model']}{tags}")


COMMANDS = [models_command]
