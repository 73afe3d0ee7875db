"""CertifyConfig: the parameters of one certification, validated once at the boundary.

Validation follows scikit-learn's habit: a declared table of constraints, errors that name
the parameter, what was expected and what arrived. Internal code then trusts the values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

CRITERIA = ("magnitude", "mu", "obd", "random")
DATA_CRITERIA = ("mu", "obd")  # criteria whose scores need D_tune
SCOPES = ("global", "layerwise")
RISKS = ("accuracy_drop", "disagreement", "error_rate", "token_disagreement", "token_accuracy_drop")
LABELLED_RISKS = ("accuracy_drop", "error_rate", "token_accuracy_drop")
BOUNDS = ("auto", "binomial", "hb", "wsr", "paired_exact")
PROCEDURES = ("fixed_sequence", "bonferroni", "planned")
#: D_tune share when only the planned procedure needs it (magnitude without BN): planning needs few samples
PLANNING_TUNE_FRACTION = 0.1
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
PATTERNS = ("2:4",)  # semi-structured patterns (calibration.patterns)
BN_STATISTICS = ("choose", "reestimate")  # calibration.candidates.BatchNormChooser


FINETUNE_LOSSES = ("auto", "labels", "distill")  # calibration.finetune


@dataclass(frozen=True)
class FinetuneConfig:
    """How every level's candidate is fine-tuned on D_tune (``finetune`` in the job's config)."""

    steps: int = 50  # per level; with ``chain`` a level continues from the one below it
    lr: float = 0.02  # relative: each layer's Adam learning rate is lr × the RMS of its dense weights
    batch_size: int = 64
    chain: bool = True  # start each level from the previous level's fine-tuned weights (not with reconstruct)
    loss: str = "auto"  # auto = distill (to the dense model's outputs); labels: cross-entropy on D_tune's labels

    def resolved_loss(self, labelled_risk: bool, has_labels: bool) -> str:
        """``auto`` is distillation for every risk: on digits (4 seeds, ε 0.01 / 0.02, 299 tuning samples)
        it certified 0.855 / 0.955 (MLP) and 0.80 / 0.885 (CNN) against 0.70 / 0.94 and 0.00 / 0.86 for
        cross-entropy on labels, which drifts from the dense model even where little is pruned."""
        return "distill" if self.loss == "auto" else self.loss


def default_sparsities() -> tuple[float, ...]:
    """0.00, 0.01, …, 0.99 (λ = 0 is the dense model)."""
    return tuple(round(i / 100, 2) for i in range(100))


@dataclass(frozen=True)
class CertifyConfig:
    """Everything that fixes a certification before D_cal is looked at."""

    criterion: tuple[str, ...] = ("magnitude",)
    scope: str = "global"
    risk: str | None = None  # None: accuracy_drop with labels, disagreement without
    epsilon: float = 0.01
    delta: float = 0.1
    sparsities: tuple[float, ...] = field(default_factory=default_sparsities)
    bound: str = "auto"
    procedure: str = "fixed_sequence"
    tune_fraction: float | None = None  # None: 0.25 when something needs D_tune, else 0
    seed: int = 0
    batch_size: int = 512
    device: str = "auto"
    precision: str = "fp32"
    exclude_first_last: bool = False
    prune_include: tuple[str, ...] | None = None  # glob patterns over parameter names: only these (calibration.discovery)
    prune_exclude: tuple[str, ...] = ()  # glob patterns over parameter names: never these
    bn_recalibration: bool | None = None  # None: on when the model has BatchNorm
    bn_statistics: str = "choose"  # choose: dense/re-estimated/blended per level on D_tune; reestimate: always
    full_curve: bool = False  # evaluate every level, also after testing stopped
    mu_steps: int = 64  # re-created trajectory length for mu without uploaded statistics
    mu_lr: float = 1e-3
    obd_samples: int = 256  # per-sample gradients averaged for the Fisher diagonal
    reconstruct: bool = False  # re-fit kept weights on D_tune after masking (calibration.reconstruct)
    finetune: FinetuneConfig | None = None  # train kept weights on D_tune, mask fixed (calibration.finetune)
    pattern: str | None = None  # None: unstructured; "2:4": the grid is which layers are made 2:4
    cudnn_benchmark: bool | None = None  # None: cuDNN's autotuner only for jobs large enough (fast_eval)
    output: int | str | None = None  # the logits in a tuple/list (index) or dict (key) output; None: first tensor / 'logits'

    def resolved_risk(self, has_labels: bool) -> str:
        return self.risk or ("accuracy_drop" if has_labels else "disagreement")

    def needs_tune_data(self, has_batchnorm: bool) -> bool:
        bn = self.bn_recalibration if self.bn_recalibration is not None else has_batchnorm
        return (any(c in DATA_CRITERIA for c in self.criterion) or bool(bn and has_batchnorm) or self.reconstruct
                or self.finetune is not None)

    def resolved_tune_fraction(self, has_batchnorm: bool) -> float:
        if self.tune_fraction is not None:
            return self.tune_fraction
        if self.needs_tune_data(has_batchnorm):
            return 0.25
        return PLANNING_TUNE_FRACTION if self.procedure == "planned" else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["criterion"] = list(self.criterion)
        d["sparsities"] = list(self.sparsities)
        d["prune_include"] = None if self.prune_include is None else list(self.prune_include)
        d["prune_exclude"] = list(self.prune_exclude)
        d["finetune"] = None if self.finetune is None else asdict(self.finetune)
        return d


def _fail(name: str, expected: str, got: Any, fix: str = "") -> ConfigError:
    msg = f"The '{name}' parameter must be {expected}. Got {got!r}."
    return ConfigError(msg + (f" {fix}" if fix else ""))


def _option(name: str, value: Any, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        return_msg = "one of " + ", ".join(repr(o) for o in options)
        raise _fail(name, return_msg, value)
    return value


def _open_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, "a number in the open interval (0, 1)", value)
    if not 0.0 < float(value) < 1.0:
        raise _fail(name, "a number in the open interval (0, 1)", value)
    return float(value)


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"an integer ≥ {low}", value)
    if value < low or (high is not None and value > high):
        rng = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
        raise _fail(name, f"an integer {rng}", value)
    return value


def _bool_or_none(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _fail(name, "true, false or null", value)


def _criteria(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise _fail("criterion", f"one of {CRITERIA} or a non-empty list of them", value)
    out = tuple(_option("criterion", c, CRITERIA) for c in items)
    if len(set(out)) != len(out):
        raise _fail("criterion", "a list without duplicates", value)
    return out


def _sparsities(value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail("sparsities", "a non-empty, strictly increasing list of numbers in [0, 1)", value)
    out = []
    for s in value:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise _fail("sparsities", "a list of numbers in [0, 1)", value, f"Offending entry: {s!r}.")
        if not 0.0 <= float(s) < 1.0:
            raise _fail("sparsities", "a list of numbers in [0, 1)", value, f"Offending entry: {s!r}.")
        out.append(float(s))
    for a, b in zip(out, out[1:]):
        if not b > a:
            raise _fail("sparsities", "strictly increasing (sorted, no duplicates)", value,
                        f"{b!r} follows {a!r}.")
    if len(out) > 1000:
        raise _fail("sparsities", "at most 1000 levels", f"{len(out)} levels")
    return tuple(out)


def _name_patterns(name: str, value: Any) -> tuple[str, ...]:
    """Glob patterns over parameter names (``fnmatch``: ``*``, ``?``, ``[seq]``), e.g. ``["*.attn.*", "fc.weight"]``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or len(items) > 1000:
        raise _fail(name, "a list of at most 1000 glob patterns over parameter names (e.g. [\"encoder.*.weight\"])",
                    value)
    for item in items:
        if not isinstance(item, str) or not item.strip() or len(item) > 500:
            raise _fail(name, "a list of non-empty glob patterns (strings of at most 500 characters)", value,
                        f"Offending entry: {item!r}.")
    return tuple(items)


def _finetune(value: Any) -> FinetuneConfig | None:
    """``false``/``null``: off; ``true``: the defaults; an object with any of steps, lr, batch_size, loss."""
    if value is None or value is False:
        return None
    if value is True:
        return FinetuneConfig()
    if isinstance(value, int) and not isinstance(value, bool):
        return FinetuneConfig(steps=_int("finetune", value, 1, 1_000_000))
    expected = ("true, false, a number of steps, or an object with any of 'steps', 'lr', 'batch_size', "
                "'loss', 'chain'")
    if not isinstance(value, dict):
        raise _fail("finetune", expected, value)
    unknown = sorted(set(value) - {"steps", "lr", "batch_size", "loss", "chain"})
    if unknown:
        raise _fail("finetune", expected, value, f"Unknown key(s): {', '.join(map(repr, unknown))}.")
    kw: dict[str, Any] = {}
    if "steps" in value:
        kw["steps"] = _int("finetune.steps", value["steps"], 0, 1_000_000)
    if "batch_size" in value:
        kw["batch_size"] = _int("finetune.batch_size", value["batch_size"], 1, 1 << 16)
    if "lr" in value:
        lr = value["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 1:
            raise _fail("finetune.lr", "a number in (0, 1] (relative: a layer's step is lr × the RMS of its "
                        "weights)", lr)
        kw["lr"] = float(lr)
    if "loss" in value:
        kw["loss"] = _option("finetune.loss", value["loss"], FINETUNE_LOSSES)
    if "chain" in value:
        if not isinstance(value["chain"], bool):
            raise _fail("finetune.chain", "true or false", value["chain"])
        kw["chain"] = value["chain"]
    return FinetuneConfig(**kw)


def validate_config(raw: dict[str, Any] | CertifyConfig | None) -> CertifyConfig:
    """Turn user input (a JSON object) into a CertifyConfig, or raise ConfigError naming the field."""
    if raw is None:
        return CertifyConfig()
    if isinstance(raw, CertifyConfig):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"The config must be a JSON object. Got {type(raw).__name__}.")
    known = {f.name for f in fields(CertifyConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"Unknown config field(s): {', '.join(map(repr, unknown))}. Valid fields: {', '.join(sorted(known))}.",
            code="unknown_config_field",
        )
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "criterion":
            kw[key] = _criteria(value)
        elif key == "scope":
            kw[key] = _option(key, value, SCOPES)
        elif key == "risk":
            kw[key] = None if value is None else _option(key, value, RISKS)
        elif key in ("epsilon", "delta"):
            kw[key] = _open_unit(key, value)
        elif key == "sparsities":
            kw[key] = _sparsities(value)
        elif key == "bound":
            kw[key] = _option(key, value, BOUNDS)
        elif key == "procedure":
            kw[key] = _option(key, value, PROCEDURES)
        elif key == "tune_fraction":
            if value is None:
                kw[key] = None
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise _fail(key, "a number in [0, 1) or null", value)
            else:
                kw[key] = float(value)
        elif key == "seed":
            kw[key] = _int(key, value, 0, 2**63 - 1)
        elif key == "batch_size":
            kw[key] = _int(key, value, 1, 1 << 20)
        elif key == "device":
            kw[key] = _option(key, value, DEVICES)
        elif key == "precision":
            kw[key] = _option(key, value, PRECISIONS)
        elif key in ("exclude_first_last", "full_curve", "reconstruct"):
            if not isinstance(value, bool):
                raise _fail(key, "true or false", value)
            kw[key] = value
        elif key in ("bn_recalibration", "cudnn_benchmark"):
            kw[key] = _bool_or_none(key, value)
        elif key == "prune_include":
            if value is None:
                kw[key] = None
            else:
                kw[key] = _name_patterns(key, value)
                if not kw[key]:
                    raise _fail(key, "null or a non-empty list of glob patterns", value,
                                "An empty list would leave nothing to prune; use null for the default weights.")
        elif key == "prune_exclude":
            kw[key] = () if value is None else _name_patterns(key, value)
        elif key == "mu_steps":
            kw[key] = _int(key, value, 2, 100_000)
        elif key == "mu_lr":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 10:
                raise _fail(key, "a number in (0, 10)", value)
            kw[key] = float(value)
        elif key == "obd_samples":
            kw[key] = _int(key, value, 1, 1_000_000)
        elif key == "output":
            if value is None:
                kw[key] = None
            elif isinstance(value, int) and not isinstance(value, bool):
                kw[key] = _int(key, value, -64, 63)
            elif isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable():
                kw[key] = value
            else:
                raise _fail(key, "null, an index into a tuple/list output (an integer), or the key of a dict "
                            "output (a string, e.g. 'logits')", value)
        elif key == "pattern":
            kw[key] = None if value is None else _option(key, value, PATTERNS)
        elif key == "finetune":
            kw[key] = _finetune(value)
        elif key == "bn_statistics":
            kw[key] = _option(key, value, BN_STATISTICS)
    if kw.get("pattern") is not None and kw.get("sparsities", default_sparsities()) != default_sparsities():
        raise _fail("sparsities", "left at its default when 'pattern' is set", list(kw["sparsities"]),
                    f"With pattern {kw['pattern']!r} the levels are which layers are made {kw['pattern']}, "
                    "not a list of sparsities; remove 'sparsities' or set 'pattern' to null.")
    return CertifyConfig(**kw)


__all__ = ["CertifyConfig", "FinetuneConfig", "FINETUNE_LOSSES", "validate_config", "default_sparsities", "BN_STATISTICS", "CRITERIA", "RISKS", "BOUNDS",
           "PROCEDURES", "PATTERNS"]
