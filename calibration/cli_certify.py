"""``certiprune certify``: offline certification, no server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import BN_STATISTICS, BOUNDS, CRITERIA, FINETUNE_LOSSES, PATTERNS, PRECISIONS, PROCEDURES, RISKS
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
                                "(Learn then Test) and write the pruned model.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="TorchScript archive (torch.jit.save) or torch.export archive (.pt2)")
    p.add_argument("--data", required=True, help="calibration set: .npz or .safetensors with x (or one array per forward "
                   "argument, named after it) and optional y")
    p.add_argument("--out", required=True, help="where to write the pruned model (in the upload's format: name it .pt2 for a .pt2 model)")
    p.add_argument("--report", help="write the result JSON here (and a PNG plot beside it)")
    p.add_argument("--uncertainty", help="safetensors of per-parameter training statistics (criterion mu)")
    p.add_argument("--criterion", nargs="+", choices=CRITERIA,
                   help="which weights go first; several are tested with δ split between them (default magnitude)")
    p.add_argument("--scope", choices=("global", "layerwise"),
                   help="rank weights across the whole model (global, default) or within each layer")
    p.add_argument("--risk", choices=RISKS, help="what must stay under ε (default accuracy_drop with labels, "
                   "disagreement without)")
    p.add_argument("--epsilon", type=float, help="tolerance ε in (0, 1) for the risk (default 0.01)")
    p.add_argument("--delta", type=float, help="allowed failure probability δ in (0, 1) (default 0.1: 90%% sure)")
    p.add_argument("--bound", choices=BOUNDS, help="p-value and confidence bound (default auto: paired_exact for accuracy_drop, binomial otherwise)")
    p.add_argument("--procedure", choices=PROCEDURES,
                   help="family-wise error control over the levels (default fixed_sequence)")
    p.add_argument("--sparsities", help="comma-separated increasing list, e.g. 0.1,0.2,0.3")
    p.add_argument("--tune-fraction", type=float,
                   help="share of the data held out for scoring (obd, mu) and BatchNorm re-estimation (default 0.25 "
                        "when needed, else 0)")
    p.add_argument("--seed", type=int, help="seed of the tune/calibration split and of 'random'")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default 512)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to evaluate (default auto)")
    p.add_argument("--full-curve", action="store_true", help="evaluate every level, also after testing stopped")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="arithmetic of the evaluation, and so of the certified model (default fp32, exact; "
                        "tf32/bf16/fp16 only on CUDA: the certificate is for the model run that way)")
    p.add_argument("--no-bn-recalibration", action="store_true",
                   help="keep the dense model's BatchNorm statistics (default: re-estimate them on D_tune)")
    p.add_argument("--exclude-first-last", action="store_true",
                   help="never prune the first and the last prunable layer")
    p.add_argument("--prune-include", nargs="+", metavar="PATTERN",
                   help="prune only the weights whose parameter name matches one of these glob patterns "
                        "(e.g. 'encoder.*'); can opt in an embedding (default: every weight that multiplies an input)")
    p.add_argument("--prune-exclude", nargs="+", metavar="PATTERN",
                   help="never prune the weights whose parameter name matches one of these glob patterns")
    p.add_argument("--reconstruct", action="store_true",
                   help="re-fit the kept weights of each layer on D_tune after masking (Optimal Brain Surgeon)")
    p.add_argument("--finetune", nargs="?", const=-1, type=int, metavar="STEPS",
                   help="fine-tune each level's kept weights on D_tune with its mask fixed (labels, or distillation to "
                        "the dense model without them); optionally the number of steps (default 200)")
    p.add_argument("--finetune-lr", type=float, metavar="LR",
                   help="relative fine-tuning rate: each layer's Adam step is LR × the RMS of its weights (default 0.02)")
    p.add_argument("--finetune-loss", choices=FINETUNE_LOSSES,
                   help="distill (to the dense model's logits; auto, the default) or labels (cross-entropy)")
    p.add_argument("--bn-statistics", choices=BN_STATISTICS,
                   help="choose (default: per level the dense, re-estimated or blended BatchNorm statistics, whichever "
                        "a held-out half of D_tune prefers) or reestimate (always re-estimate on D_tune)")
    p.add_argument("--pattern", choices=PATTERNS,
                   help="semi-structured sparsity: the levels are which layers are made 2:4 (no --sparsities)")
    p.add_argument("--output", metavar="INDEX_OR_KEY",
                   help="which entry of a tuple/list (an index) or dict (a key) output is the logits "
                        "(default: the first tensor, or the dict's 'logits')")
    p.add_argument("--config", help="JSON object with any config fields (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def finetune_from_args(steps: int | None, lr: float | None, loss: str | None) -> dict[str, Any] | None:
    """The ``finetune`` config object from ``--finetune [STEPS]``, ``--finetune-lr``, ``--finetune-loss``
    (either of the last two turns fine-tuning on)."""
    if steps is None and lr is None and loss is None:
        return None
    out: dict[str, Any] = {}
    if steps is not None and steps >= 0:
        out["steps"] = steps
    if lr is not None:
        out["lr"] = lr
    if loss is not None:
        out["loss"] = loss
    return out


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(args.config) if args.config else {}
    for key in ("criterion", "scope", "risk", "epsilon", "delta", "bound", "procedure", "tune_fraction",
                "seed", "batch_size", "device", "precision"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.sparsities:
        try:
            cfg["sparsities"] = [float(s) for s in args.sparsities.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"--sparsities must be comma-separated numbers; got {args.sparsities!r}")
    if args.full_curve:
        cfg["full_curve"] = True
    if args.exclude_first_last:
        cfg["exclude_first_last"] = True
    if args.prune_include:
        cfg["prune_include"] = list(args.prune_include)
    if args.prune_exclude:
        cfg["prune_exclude"] = list(args.prune_exclude)
    if args.reconstruct:
        cfg["reconstruct"] = True
    if args.pattern:
        cfg["pattern"] = args.pattern
    if args.no_bn_recalibration:
        cfg["bn_recalibration"] = False
    if args.bn_statistics:
        cfg["bn_statistics"] = args.bn_statistics
    finetune = finetune_from_args(args.finetune, args.finetune_lr, args.finetune_loss)
    if finetune is not None:
        cfg["finetune"] = finetune
    if args.output is not None:
        text = args.output.strip()
        cfg["output"] = int(text) if text.lstrip("-").isdigit() else text
    return cfg


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
