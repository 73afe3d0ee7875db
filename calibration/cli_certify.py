"""``certiprune certify``: offline certification, no server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import config
from .config import add_config_options, config_only_help
from .errors import CalibrationError

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


def build_parser(prog: str = "certiprune certify") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Certify how far a TorchScript model can be pruned "
                                "(Learn then Test) and write the pruned model.",
                                epilog=EXAMPLES + "\n" + config_only_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="TorchScript archive (torch.jit.save) or torch.export archive (.pt2)")
    p.add_argument("--data", required=True, help="calibration set: .npz or .safetensors with x (or one array per forward "
                   "argument, named after it) and optional y")
    p.add_argument("--out", required=True, help="where to write the pruned model (in the upload's format: name it .pt2 for a .pt2 model)")
    p.add_argument("--report", help="write the result JSON here (and a PNG plot beside it)")
    p.add_argument("--uncertainty", help="safetensors of per-parameter training statistics (criterion mu)")
    p.add_argument("--config", help="JSON object with any config fields (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(p)
    return p


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The job's config: --config's JSON object, with the fields given as flags replaced (not yet validated)."""
    return config.config_from_args(args, json.loads(args.config) if args.config else {})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import certify
    from .report import format_summary, plot_risk_curve

    console = Console(stderr=True)
    try:
        cfg = config_from_args(args)
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
    from .pt2_archive import is_pt2

    if is_pt2(args.out) and not str(args.out).endswith(".pt2"):
        print("note: the model is a torch.export archive, so the artifact is one too: name it .pt2 "
              "(torch.export.load expects that suffix)")
    if args.report:
        report = Path(args.report)
        report.write_text(json.dumps(cert.result, indent=2))
        png = plot_risk_curve(cert.result, report.with_suffix(".png"))
        print(f"report written to {report} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
