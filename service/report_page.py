"""The HTML report of a finished job: the view model of ``templates/report.html`` and its risk plot.

The page is deliberately plain: no scripts and no external assets, so it renders air-gapped, can be
saved as one file, and a Content-Security-Policy of ``default-src 'none'`` (in a ``<meta>``) holds it
to that. Its CSS lives in ``static/base.css`` and ``static/report.css`` and is inlined. Everything
that comes from a job — layer names read from the uploaded model above all — reaches the template as
plain values, which autoescaping escapes (:mod:`service.web`).

The plot is the same one as ``calibration.report``'s PNG: both draw
:func:`calibration.report.risk_plot_data` (series, ranges, ε, λ̂ and colours); here it is mapped to
SVG user units (:func:`plot_view`) for ``templates/risk_plot.svg``.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

from calibration.report import candidate_rows, evaluated_levels, finite_number, plot_ranges, risk_plot_data

from .web import env, static_text

#: No scripts, no fetches, no external anything: the report only needs its own inline CSS and SVG.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

# Plot geometry (SVG user units): the plot area, then a legend column on the right.
W, H = 850, 360
LEFT, TOP, PLOT_W, PLOT_H = 64, 16, 540, 290
LEGEND_X = LEFT + PLOT_W + 16


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value)


def _pct(value: Any, digits: int = 2) -> str:
    v = finite_number(value)
    return "—" if v is None else f"{v:.{digits}%}"


def _int(value: Any) -> str:
    v = finite_number(value)
    return "—" if v is None else f"{int(v):,}"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _c(value: float) -> str:
    """One SVG coordinate."""
    return f"{value:.1f}"


def human_bytes(n: Any) -> str:
    v = finite_number(n)
    if v is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TB"  # pragma: no cover


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


def _plan_view(crit: dict[str, Any], sx: Any, sy: Any) -> dict[str, Any]:
    """The planned procedure's marks in SVG units: diamonds at D_tune's risk for the levels the plan
    evaluated on D_tune, and ticks on the x axis for the planned levels (solid: tested on D_cal)."""
    plan, name = crit["plan"], crit["criterion"]
    if not plan:
        return {"tune_marks": [], "plan_ticks": []}
    tune = [{"x": _c(sx(p["sparsity"])), "y": _c(sy(p["risk"])),
             "tip": f"{name} at sparsity {p['sparsity']:.2%}: risk {p['risk']:.4g} on D_tune (used to plan, not tested)"}
            for p in plan["tune"]]
    ticks = [{"x": _c(sx(p["sparsity"])), "tested": p["tested"],
              "tip": f"{name}: {p['sparsity']:.2%} planned, {'tested' if p['tested'] else 'not reached'} on D_cal"}
             for p in plan["sequence"]]
    return {"tune_marks": tune, "plan_ticks": ticks}


def plot_view(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`calibration.report.risk_plot_data` in SVG user units: ticks, polylines, dots with tooltips,
    the ε and λ̂ lines and the legend, for ``templates/risk_plot.svg``."""
    data = risk_plot_data(result)
    epsilon = data["epsilon"]
    (x_lo, x_hi), (y_lo, y_hi) = data["x_range"], data["y_range"]

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * PLOT_W

    def sy(y: float) -> float:
        return TOP + (y_hi - y) / (y_hi - y_lo) * PLOT_H

    x_step = 0.1 if x_hi > 0.5 else 0.05
    x_ticks = [{"x": _c(sx(x)), "label": f"{x:.0%}"}
               for x in (x_lo + i * x_step for i in range(round((x_hi - x_lo) / x_step) + 1))]
    y_step = _nice_step(y_hi - y_lo)
    y_ticks = []
    y = math.ceil(y_lo / y_step) * y_step
    while y <= y_hi + 1e-12:
        y_ticks.append({"y": _c(sy(y)), "text_y": _c(sy(y) + 4), "label": f"{y:.3g}"})
        y += y_step

    series, legend = [], []
    ly = TOP + 8
    for crit in data["series"]:
        name, colour, levels = crit["criterion"], crit["colour"], crit["levels"]
        series.append({
            "name": name, "colour": colour,
            "ucb_points": " ".join(f"{_c(sx(p['sparsity']))},{_c(sy(p['upper_bound']))}" for p in levels
                                   if p["upper_bound"] is not None),
            "risk_points": " ".join(f"{_c(sx(p['sparsity']))},{_c(sy(p['risk']))}" for p in levels),
            "dots": [{"x": _c(sx(p["sparsity"])), "y": _c(sy(p["risk"])), "fill": colour if p["rejected"] else "#fff",
                      "tip": (f"{name} at sparsity {p['sparsity']:.2%}: risk {p['risk']:.4g}, upper bound "
                              f"{_fmt(p['upper_bound'])}, p = {_fmt(p['p_value'], 3)}, "
                              f"{'rejected (safe)' if p['rejected'] else 'not rejected'}")} for p in levels],
            **_plan_view(crit, sx, sy),
        })
        legend.append({"kind": "line", "y": ly, "colour": colour, "width": "1.8", "dash": None,
                       "text": f"{_text(name)}: empirical risk"})
        ly += 17
        legend.append({"kind": "line", "y": ly, "colour": colour, "width": "1.4", "dash": "5 3",
                       "text": f"{_text(name)}: {crit['confidence']}upper bound"})
        ly += 22
    if any(crit["plan"] for crit in data["series"]):
        legend.append({"kind": "diamond", "y": ly, "colour": "#566573", "text": "D_tune estimate (planning)"})
        ly += 17
        legend.append({"kind": "tick", "y": ly, "colour": "#566573", "text": "planned level (faint: not reached)"})
        ly += 22
    legend.append({"kind": "line", "y": ly, "colour": data["epsilon_colour"], "width": "1.5", "dash": "7 4",
                   "text": f"tolerance ε = {epsilon:g}"})
    ly += 20
    lambda_hat = None
    if data["certified"]:
        certified = data["certified_sparsity"]
        anchor = "end" if sx(certified) > LEFT + PLOT_W - 90 else "start"
        lambda_hat = {"x": _c(sx(certified)), "label_x": _c(sx(certified) + (-5 if anchor == "end" else 5)),
                      "anchor": anchor, "label": f"{certified:.2%}"}
        legend.append({"kind": "line", "y": ly, "colour": data["lambda_colour"], "width": "1.5", "dash": None,
                       "text": "certified λ̂"})
        ly += 20
    legend.append({"kind": "dot", "y": ly, "fill": "#566573", "text": "rejected: safe"})
    legend.append({"kind": "dot", "y": ly + 17, "fill": "#fff", "text": "not rejected"})

    return {
        "width": W, "height": H, "left": LEFT, "top": TOP, "plot_w": PLOT_W, "plot_h": PLOT_H,
        "right": LEFT + PLOT_W, "bottom": TOP + PLOT_H, "mid_y": TOP + PLOT_H / 2, "x_label_x": LEFT + PLOT_W / 2,
        "legend_x": LEGEND_X, "risk_name": data["risk"].replace("_", " "), "epsilon_label": f"{epsilon:g}",
        "epsilon_y": _c(sy(epsilon)), "epsilon_label_y": _c(sy(epsilon) - 5), "epsilon_colour": data["epsilon_colour"],
        "lambda_colour": data["lambda_colour"], "lambda_hat": lambda_hat,
        "cut": f"{y_hi:.3g}" if data["cut"] else None, "x_ticks": x_ticks, "y_ticks": y_ticks,
        "series": series, "legend": legend,
    }


def risk_plot_svg(result: dict[str, Any]) -> str:
    """Empirical risk (solid) and its upper confidence bound (dashed) per tested sparsity and criterion,
    the tolerance ε (red, dashed) and the certified sparsity λ̂ (green). Filled dots: levels the
    procedure rejected (certified safe); hollow dots: levels it did not."""
    return env.get_template("risk_plot.svg").render(p=plot_view(result))


def plain_words(result: dict[str, Any]) -> str:
    """The guarantee once more, for someone who has never heard of Learn then Test."""
    eps = finite_number(result.get("epsilon"))
    delta = finite_number(result.get("delta"))
    s = finite_number(result.get("certified_sparsity"))
    if not result.get("certified") or not s or eps is None or delta is None:
        return ("No tested sparsity passed the test, so nothing could be removed with the requested confidence: "
                "the downloadable model is the original one. A larger tolerance ε, a larger δ or more "
                "calibration samples can change that.")
    risk = result.get("risk")
    if risk == "accuracy_drop":
        cost = f"loses at most {eps * 100:g} percentage points of accuracy compared with the original"
    elif risk == "disagreement":
        cost = f"changes the original model's prediction on at most {eps:.2%} of inputs"
    elif risk == "error_rate":
        cost = f"gets at most {eps:.2%} of inputs wrong"
    elif risk == "token_disagreement":
        cost = (f"changes the original model's next-token choice on at most {eps:.2%} of the positions of a "
                "text, on average")
    elif risk == "token_accuracy_drop":
        cost = f"loses at most {eps * 100:g} percentage points of token accuracy compared with the original, on average"
    else:
        cost = f"has a {risk} of at most {eps:g}"
    return (f"In plain words: setting {s:.0%} of the prunable weights to zero, the pruned model {cost}, on data like "
            f"the calibration set. We are {1 - delta:.0%} sure of this; the {delta:.0%} left over is the chance that "
            "an unluckily drawn calibration set made a harmful level look safe.")


def _cards(result: dict[str, Any], model_bytes: int | None) -> list[dict[str, Any]]:
    dense, pruned = finite_number(result.get("dense_accuracy")), finite_number(result.get("pruned_accuracy"))
    delta = finite_number(result.get("delta"))
    cards = [
        ("Certified sparsity", _pct(result.get("certified_sparsity"), 0),
         f"of prunable weights, criterion {_text(result.get('criterion'))}"),
        ("Accuracy, dense → pruned", f"{_pct(dense, 1)} → {_pct(pruned, 1)}" if dense is not None else "— (no labels)",
         "on the calibration samples"),
        ("Weights set to zero", _int(result.get("zeroed_parameters")),
         f"of {_int(result.get('prunable_parameters'))} prunable"),
        ("Artifact size", human_bytes(result.get("artifact_bytes")),
         f"upload {human_bytes(model_bytes)}" if model_bytes is not None else "pruned TorchScript file"),
        ("Tolerance ε / confidence",
         f"{_fmt(result.get('epsilon'))} / {_pct(1 - delta if delta is not None else None, 0)}",
         str(result.get("risk") or "").replace("_", " ")),
    ]
    return [{"label": label, "value": value, "note": note, "long": len(value) > 10} for label, value, note in cards]


def _criteria(result: dict[str, Any]) -> list[dict[str, Any]]:
    chosen = result.get("criterion")
    return [{"name": c.get("criterion"), "chosen": c.get("criterion") == chosen,
             "delta": _fmt(finite_number(c.get("delta")), 3), "certified_sparsity": _pct(c.get("certified_sparsity")),
             "certified": _fmt(bool(c.get("certified"))), "levels": len(evaluated_levels(c.get("levels")))}
            for c in (result.get("criteria") or []) if isinstance(c, dict)]


def _layers(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for lyr in (result.get("layers") or []):
        if not isinstance(lyr, dict):
            continue
        frac = min(max(finite_number(lyr.get("sparsity")) or 0.0, 0.0), 1.0)
        rows.append({"name": lyr.get("name"), "type": lyr.get("type"), "parameters": _int(lyr.get("parameters")),
                     "zeroed": _int(lyr.get("zeroed")), "sparsity": f"{frac:.1%}", "bar_width": f"{frac * 100:.1f}%"})
    return rows


def _model_rows(result: dict[str, Any], model_bytes: int | None) -> list[tuple[str, str]]:
    rows = [
        ("accuracy of the original model", _pct(result.get("dense_accuracy"))),
        ("accuracy of the pruned model", _pct(result.get("pruned_accuracy"))),
        ("prunable parameters", _int(result.get("prunable_parameters"))),
        ("candidate weight matrices", _candidates(result.get("prunable_weights"))),
        ("zeroed parameters", _int(result.get("zeroed_parameters"))),
        ("all parameters of the model", _int(result.get("total_parameters"))),
        ("uploaded model file", human_bytes(model_bytes) if model_bytes is not None else None),
        ("pruned model file (artifact)", human_bytes(result.get("artifact_bytes"))),
    ]
    return [(label, value) for label, value in rows if value is not None]


SETTINGS_KEYS = ("risk", "epsilon", "delta", "bound", "procedure", "criterion", "scope", "pattern", "n_calibration",
                 "n_tune", "seed", "bn_recalibration", "device", "precision", "levels_evaluated",
                 "levels_evaluated_tune")


def _candidates(pw: Any) -> str | None:
    """How many of the model's weight matrices were candidates (``result.prunable_weights``)."""
    if not isinstance(pw, dict) or not all(isinstance(pw.get(k), int) for k in ("count", "of_count", "of_params")):
        return None
    return f"{pw['count']} of {pw['of_count']} ({_int(pw.get('params'))} of {_int(pw['of_params'])} parameters)"


def _settings_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(k.replace("_", " "), _fmt(result.get(k))) for k in SETTINGS_KEYS if k in result]
    rec = result.get("reconstruction")
    if isinstance(rec, dict):
        rows.append(("reconstruction",
                     f"unavailable, plain masks: {rec['unavailable']}" if rec.get("unavailable")
                     else f"{len(rec.get('layers') or [])} layers reconstructed on the tuning split, "
                          f"{len(rec.get('skipped') or {})} masked only"))
    rows += candidate_rows(result)
    more = result.get("more_data")
    if isinstance(more, dict) and finite_number(more.get("sparsity")) is not None:
        needed = more.get("n_calibration_needed")
        rows.append(("next level",
                     f"{_pct(more['sparsity'])} was not certified with {_fmt(more.get('n_calibration'))} samples; "
                     + (f"about {needed:,} would likely certify it at its observed risk (an estimate for planning, "
                        "not part of the guarantee)" if isinstance(needed, int) else
                        "at its observed risk, more data alone would not certify it")))
    timings = result.get("timings")
    total_s = finite_number(timings.get("total_s")) if isinstance(timings, dict) else None
    if total_s is not None:
        rows.append(("time", f"{total_s:.1f} s"))
    return rows


def _levels(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The chosen criterion's levels; one that was not tested says why: off the planned sequence (the
    planned procedure), or past the first failure (fixed-sequence stops there)."""
    chosen = next((c for c in (result.get("criteria") or []) if isinstance(c, dict)
                   and c.get("criterion") == result.get("criterion")), {})
    plan = chosen.get("plan") if isinstance(chosen.get("plan"), dict) else None
    planned = {finite_number(x) for x in (plan.get("sparsities") or [])} if plan else None

    def untested(lv: dict[str, Any]) -> str:
        if planned is not None and finite_number(lv.get("sparsity")) not in planned:
            return "not on the plan"
        return "not tested"

    return [{"ok": bool(lv.get("rejected")), "sparsity": _pct(lv.get("sparsity")),
             "risk": _fmt(finite_number(lv.get("empirical_risk"))),
             "upper_bound": _fmt(finite_number(lv.get("upper_bound"))),
             "p_value": _fmt(finite_number(lv.get("p_value")), 3),
             "rejected": "yes" if lv.get("rejected") else ("no" if lv.get("evaluated", True) else untested(lv))}
            for lv in (result.get("levels") or []) if isinstance(lv, dict)]


def report_view(job_id: str, result: dict[str, Any], *, model_bytes: int | None = None) -> dict[str, Any]:
    """Everything ``templates/report.html`` shows, as plain values (the template escapes them)."""
    certified = bool(result.get("certified")) and bool(finite_number(result.get("certified_sparsity")))
    s = finite_number(result.get("certified_sparsity"))
    job = quote(str(job_id), safe="")
    criteria = _criteria(result)
    return {
        "csp": REPORT_CSP,
        "css": Markup(static_text("base.css") + static_text("report.css")),  # our own files, inlined
        "job_id": job_id, "job_url": f"/v1/jobs/{job}",
        "verdict": (f"Certified: {s:.0%} of the prunable weights can be set to zero" if certified and s is not None
                    else "Nothing certified: the downloadable model is the original"),
        "certified": certified, "guarantee": result.get("guarantee", ""), "plain": plain_words(result),
        "cards": _cards(result, model_bytes),
        "artifact_url": f"/v1/jobs/{job}/artifact", "download_name": f"{job_id}-pruned.pt",
        "artifact_size": human_bytes(result.get("artifact_bytes")), "sha256": result.get("artifact_sha256") or "—",
        "plot": plot_view(result), "procedure": result.get("procedure"),
        "criteria": criteria,
        "criteria_note": ("Each criterion was tested with its share of δ (Bonferroni), so the guarantee holds for "
                          "the one that certified the most.") if len(criteria) > 1 else "",
        "layers": _layers(result), "model_rows": _model_rows(result, model_bytes),
        "settings_rows": _settings_rows(result), "levels": _levels(result), "criterion": result.get("criterion"),
    }


def render_report(job_id: str, result: dict[str, Any], *, model_bytes: int | None = None) -> str:
    """The whole page. ``model_bytes``: the size of the uploaded model, when the caller knows it."""
    view = report_view(job_id, result, model_bytes=model_bytes)
    return env.get_template("report.html").render(**view, p=view["plot"])


def prefers_html(accept: str | None) -> bool:
    """True when the Accept header ranks text/html above application/json (browsers do; API clients do not)."""
    if not accept:
        return False
    ranks: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        ranks[media.lower()] = max(q, ranks.get(media.lower(), 0.0))
    html = max(ranks.get("text/html", 0.0), ranks.get("application/xhtml+xml", 0.0))
    json_q = ranks.get("application/json", 0.0)
    return html > 0 and html > json_q


__all__ = ["REPORT_CSP", "human_bytes", "plain_words", "plot_ranges", "plot_view", "prefers_html", "render_report",
           "report_view", "risk_plot_svg"]
