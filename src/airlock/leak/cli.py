"""`airlock leak trace FILE`: rank the grants by how strongly a leaked text carries their watermark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from airlock.cli_support import console, fail, open_database, run_command

app = typer.Typer(help="Leak attribution: trace a leaked text to the grant that sampled it.", no_args_is_help=True)


@app.command("trace")
def trace(
    file: Annotated[Path, typer.Argument(help="The leaked text (UTF-8); '-' reads standard input.")],
    model: Annotated[
        list[str] | None,
        typer.Option(help="Weights spec whose tokenizer to use (repeatable); default: every local variant's."),
    ] = None,
    top: Annotated[int, typer.Option(help="Show this many grants.")] = 10,
) -> None:
    """Test the text against every grant's watermark; print the grants ranked by p-value."""

    def body() -> None:
        import sys

        from sqlalchemy import select

        from airlock.backends.weights import load_tokenizer
        from airlock.leak.trace import trace_tokens
        from airlock.registry.models import Variant

        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8", errors="replace")
        with open_database() as (_settings, db), db.session() as session:
            specs = sorted(set(model or [])) or sorted(
                {str(v.backend_config.get("model")) for v in session.scalars(select(Variant)) if v.backend == "local"}
            )
            if not specs:
                raise fail("no local model to tokenize with: pass --model SPEC")
            tokenizations = []
            for spec in specs:
                tokenizer = load_tokenizer(spec)
                tokenizations.append((spec, list(tokenizer(text, add_special_tokens=False)["input_ids"])))
            matches = trace_tokens(session, tokenizations)
        if not matches:
            raise fail("no grant in the database")
        scored = max(m.detection.scored_tokens for m in matches)
        console.print(
            f"{len(matches)} grant(s) tested; {scored} token(s) scored (tokens after a repeated window are not)"
        )
        table = Table("grant", "evaluator", "p-value", "adjusted p", "mean g", "tokens", "tokenizer")
        for m in matches[:top]:
            table.add_row(
                m.grant_id,
                escape(m.evaluator),
                f"{m.detection.p_value:.3g}",
                f"{m.p_adjusted:.3g}",
                f"{m.detection.mean_g:.3f}",
                str(m.detection.scored_tokens),
                escape(m.tokenizer),
            )
        console.print(table)
        best = matches[0]
        if best.p_adjusted < 1e-4:
            console.print(f"attributed to grant {best.grant_id} ({escape(best.evaluator)}), p = {best.p_adjusted:.3g}")
        else:
            console.print("no grant's watermark found at p < 1e-4 (adjusted)")

    run_command(body)
