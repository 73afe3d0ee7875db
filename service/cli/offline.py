"""``certiprune certify``: offline certification, no server (the science is ``calibration.certify``).

torch is imported inside the command, when it runs: ``certiprune certify --help`` and the other commands
do not pay for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from calibration.config import config_only_help  # torch-free: the parameter table

from .base import ConfigCommand
from .options import config_from_options

EXAMPLES = """examples:
  # certify with the defaults (magnitude pruning, ε = 0.01 accuracy drop, δ = 0.1) and write the pruned model
  certiprune certify model.pt --data cal.npz --out pruned.pt

  # try two criteria, tolerate 2 points of accuracy drop at 95 % confidence; JSON report + PNG plot
  certiprune certify model.pt --data cal.npz --criterion magnitude obd --epsilon 0.02 --delta 0.05 \\
      --out pruned.pt --report report.json          # also writes report.png

  # unlabelled data: certify that predictions change on at most 1 % of inputs, on a coarse grid, on a GPU
  certiprune certify model.pt --data unlabelled.safetensors --risk disagreement --sparsities 0.3,0.5,0.7,0.9 \\
      --device cuda --out pruned.pt

calibration data: .npz or .safetensors with x (the model's inputs) and, optionally, y (integer labels).
The guarantee holds for data drawn like the calibration set; see the JSON report's "guarantee".
"""


def certify_config(options: Any) -> dict[str, Any]:
    """The job's config: --config's JSON object, with the fields given as flags replaced (not yet validated).

    ``options``: the command's parsed options (a mapping, or an object with them as attributes).
    """
    values = options if isinstance(options, dict) else vars(options)
    return config_from_options(values, json.loads(values["config"]) if values.get("config") else {})


def cmd_certify(args: Any) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from calibration import certify
    from calibration.errors import CalibrationError
    from calibration.report import format_summary, plot_risk_curve

    console = Console(stderr=True)
    try:
        cfg = certify_config(args)
    except json.JSONDecodeError as exc:
        console.print(f"[red]error:[/red] --config is not valid JSON: {exc}")
        return 2
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, disable=args.quiet, transient=True) as bar:
            task = bar.add_task("starting", total=1)

            def on_progress(p: Any) -> None:
                bar.update(task, description=f"{p.stage}: {p.message}", completed=p.done, total=max(p.total, 1))

            cert = certify(args.model, args.data, cfg, out=args.out, uncertainty=args.uncertainty,
                           progress=on_progress)
    except CalibrationError as exc:
        console.print(f"[red]error ({exc.code}):[/red] {exc}")
        return 2
    print(format_summary(cert.result))
    print(f"\npruned model written to {args.out} (sha256 {cert.result['artifact_sha256']})")
    from calibration.pt2_archive import is_pt2

    if is_pt2(args.out) and not str(args.out).endswith(".pt2"):
        print("note: the model is a torch.export archive, so the artifact is one too: name it .pt2 "
              "(torch.export.load expects that suffix)")
    if args.report:
        report = Path(args.report)
        report.write_text(json.dumps(cert.result, indent=2))
        png = plot_risk_curve(cert.result, report.with_suffix(".png"))
        print(f"report written to {report} and {png}")
    return 0


@click.command("certify", cls=ConfigCommand, epilog=EXAMPLES + "\n" + config_only_help(),
               short_help="certify offline, without a server (see `certiprune certify --help`)")
@click.argument("model")
@click.option("--data", required=True, help="calibration set: .npz or .safetensors with x (or one array per forward "
              "argument, named after it) and optional y")
@click.option("--out", required=True, help="where to write the pruned model (in the upload's format: name it .pt2 "
              "for a .pt2 model)")
@click.option("--report", help="write the result JSON here (and a PNG plot beside it)")
@click.option("--uncertainty", help="safetensors of per-parameter training statistics (criterion mu)")
@click.option("--config", help="JSON object with any config fields (flags override it)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def certify(**options: Any) -> int:
    """Certify how far a TorchScript model can be pruned (Learn then Test) and write the pruned model.

    MODEL: TorchScript archive (torch.jit.save) or torch.export archive (.pt2).
    """
    return cmd_certify(SimpleNamespace(**options))  # its errors are its own (exit 2); others are tracebacks


COMMANDS = [certify]


def parse_certify(argv: list[str]) -> dict[str, Any]:
    """The options of ``certiprune certify ARGV`` without running it (a usage error exits 2, as the CLI does)."""
    from . import parse

    return parse(["certify", *argv])[1]


def main(argv: list[str] | None = None) -> int:
    """``certiprune certify ARGV``: its exit code."""
    import sys

    from . import main as cli_main

    return cli_main(["certify", *(sys.argv[1:] if argv is None else argv)])
