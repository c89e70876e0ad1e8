"""The one-screen table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline.run.context import RunContext
from pipeline.run.files import format_bytes

STAGE_ORDER = ("calibrate", "quantize", "export", "eval", "smoke", "card")


def print_summary(ctx: RunContext, console: Console | None = None) -> None:
    """Stage, status, wall time, peak RSS, output size and path for every stage of the run."""
    console = console or Console(stderr=True)
    table = Table(title=f"{ctx.recipe.name} on {ctx.source.identity}", title_justify="left")
    for column in ("stage", "status", "time", "peak RSS", "output", "path / note"):
        table.add_column(column)
    for name, record in sorted(ctx.manifest.stages.items(), key=lambda item: STAGE_ORDER.index(item[0])):
        outputs = record.outputs
        table.add_row(
            name,
            record.status,
            f"{record.wall_s:.1f} s" if record.wall_s is not None else "",
            f"{record.peak_rss_mb:.0f} MiB" if record.peak_rss_mb else "",
            format_bytes(size) if (size := outputs.get("size_bytes")) else "",
            str(ctx.run_dir / outputs["path"]) if "path" in outputs else (record.note or ""),
        )
    console.print(table)
    console.print(f"artifact: {ctx.run_dir}  gate: {ctx.manifest.gate}  status: {ctx.manifest.status}")
