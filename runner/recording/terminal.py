"""What a run prints on the terminal: one line per job of a sweep, a table for a single run
(with the gradient-flow table), numbers rounded as a reader needs them; the files keep exact values."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.recording.record import Summary


def rounded(value: Any) -> str:
    """A number as a reader needs it on a terminal (exact values stay in the files)."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def print_summary(summary: Summary, multirun: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    colour = {"ok": "green", "interrupted": "yellow"}.get(summary.status, "red")
    if multirun:
        detail = summary.error if summary.status != "ok" else \
            f"loss={rounded(summary.final_loss)} param_sum={rounded(summary.param_sum)}"
        # Error texts hold brackets ([/path/pair.cc:537]) that rich would read as markup.
        reused = f" (reused from {summary.reused_from})" if summary.reused_from else ""
        console.print(f"[{colour}]{summary.status}[/] {escape(Path(summary.run_dir or '').name)} {escape(str(detail))}"
                      f"{escape(reused)}", soft_wrap=True)
        return
    table = Table(title=f"run: [{colour}]{summary.status}[/]", show_header=False)
    rows = [("run dir", summary.run_dir), ("steps", summary.steps_done), ("final loss", summary.final_loss),
            (summary.eval_metric or "eval", summary.eval_value), ("param_sum", summary.param_sum),
            ("param_sha256", (summary.param_sha256 or "")[:16]), ("peak_saved_bytes", summary.peak_saved_bytes),
            ("wall s", summary.wall_s)]
    if summary.processes > 1:  # how the ranks shared the work, as counted
        shared = [("parallel", f"{summary.parallel} x {summary.processes} ranks"),
                  ("all-reduce rounds/step", summary.allreduce_calls_per_step),
                  ("reduce-scatter rounds/step", summary.reduce_scatter_calls_per_step),
                  ("peak_grad_bytes", summary.peak_grad_bytes), ("ranks agree", summary.ranks_agree)]
        rows += [(name, value) for name, value in shared if value is not None]  # the engine's own figures
    if summary.ema_param_sha256:  # trainer.ema: the averaged weights' figures
        rows += [(f"EMA {summary.eval_metric or 'eval'}", summary.ema_eval_value),
                 ("EMA param_sum", summary.ema_param_sum)]
    if summary.params_without_grad:
        rows.append(("no gradient", ", ".join(summary.params_without_grad)))
    rows += [(name, text) for name, text in (("error", summary.error), ("hint", summary.hint)) if text]
    for name, value in rows:
        table.add_row(escape(name), escape(rounded(value)))
    console.print(table)
    if summary.gradient_flow:
        flow = Table(title="gradient flow, first step")
        for column in ("module", "component", "grad_norm"):
            flow.add_column(column)
        for row in summary.gradient_flow:
            norm = f"{row['grad_norm']:.3g}" if row["receives_gradient"] else "none"
            flow.add_row(escape(row["module"]), escape(row["component"]), norm)
        console.print(flow)
