"""The HTML report and the pages for people: content negotiation, escaping, the plot's geometry, the CSP."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from service.report_page import plot_ranges, prefers_html, render_report, risk_plot_svg

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = '<img src=x onerror="alert(1)">'


def level(s: float, risk: float | None, ucb: float | None, rejected: bool, evaluated: bool = True) -> dict[str, Any]:
    return {"sparsity": s, "empirical_risk": risk, "upper_bound": ucb, "p_value": 0.01 if rejected else 0.5,
            "rejected": rejected, "evaluated": evaluated}


def make_result(**changes: Any) -> dict[str, Any]:
    magnitude = [level(0.1, 0.0, 0.01, True), level(0.2, 0.02, 0.04, True), level(0.3, 0.05, 0.09, False),
                 level(0.4, None, None, False, evaluated=False)]
    obd = [level(0.1, 0.0, 0.005, True), level(0.2, 0.01, 0.03, True), level(0.3, 0.03, 0.06, False),
           level(0.4, None, None, False, evaluated=False)]
    result = {
        "certified_sparsity": 0.2, "certified": True, "epsilon": 0.05, "delta": 0.1, "risk": "accuracy_drop",
        "bound": "binomial", "procedure": "fixed_sequence", "criterion": "magnitude", "scope": "global",
        "n_calibration": 500, "n_tune": 0, "dense_accuracy": 0.95, "pruned_accuracy": 0.9312,
        "prunable_parameters": 1000, "zeroed_parameters": 200, "total_parameters": 1010, "artifact_bytes": 20480,
        "artifact_sha256": "ab" * 32, "guarantee": "With probability at least 0.9 the risk is at most 0.05.",
        "levels": magnitude,
        "criteria": [{"criterion": "magnitude", "delta": 0.05, "certified_sparsity": 0.2, "certified": True,
                      "levels": magnitude},
                     {"criterion": "obd", "delta": 0.05, "certified_sparsity": 0.2, "certified": True,
                      "levels": obd}],
        "layers": [{"name": "0.weight", "type": "Linear", "parameters": 800, "zeroed": 180, "sparsity": 0.225},
                   {"name": "2.weight", "type": "Linear", "parameters": 200, "zeroed": 20, "sparsity": 0.1}],
    }
    result.update(changes)
    return result


def svg_of(page: str) -> ET.Element:
    match = re.search(r"<svg.*?</svg>", page, re.DOTALL)
    assert match, "no <svg> in the page"
    return ET.fromstring(match.group(0))  # well-formed XML, or this raises


def points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points", "").split()]  # type: ignore[misc]


@pytest.mark.parametrize("accept, html", [
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # a browser
    ("application/json", False),
    ("*/*", False),
    (None, False),
    ("application/json, text/html;q=0.5", False),
    ("text/html", True),
])
def test_html_only_when_preferred(accept, html) -> None:
    assert prefers_html(accept) is html


def test_plot_draws_risk_and_upper_bound_per_criterion_with_epsilon_and_lambda_hat() -> None:
    svg = svg_of(render_report("job_1", make_result()))
    risk = svg.findall(f".//{SVG}polyline[@class='risk']")
    ucb = svg.findall(f".//{SVG}polyline[@class='ucb']")
    assert [p.get("data-criterion") for p in risk] == ["magnitude", "obd"]
    assert [p.get("data-criterion") for p in ucb] == ["magnitude", "obd"]
    assert all(len(points(p)) == 3 for p in risk + ucb)  # the unevaluated level is left out
    assert len(svg.findall(f".//{SVG}circle")) >= 6

    (eps,) = svg.findall(f".//{SVG}line[@class='epsilon']")
    (lam,) = svg.findall(f".//{SVG}line[@class='lambda-hat']")
    # Geometry: magnitude's risk at 0.3 equals ε, so that point lies on the ε line; λ̂ sits at x(0.2).
    magnitude = points(risk[0])
    assert magnitude[2][1] == pytest.approx(float(eps.get("y1")), abs=0.06)
    assert float(lam.get("x1")) == pytest.approx(magnitude[1][0], abs=0.06)
    # The upper bound lies on or above the risk (smaller y in SVG coordinates) at every level.
    assert all(u[1] <= r[1] + 1e-6 for u, r in zip(points(ucb[0]), magnitude))
    text = ET.tostring(svg, encoding="unicode")
    assert "ε = 0.05" in text and "λ̂ = 20.00%" in text and "upper bound" in text


def test_upper_bounds_near_one_do_not_flatten_the_region_around_epsilon() -> None:
    lv = [level(0.1, 0.01, 0.03, True), level(0.2, 0.03, 0.045, True), level(0.3, 0.2, 1.0, False)]
    result = make_result(levels=lv, criteria=None, certified_sparsity=0.2)
    _, _, _, y_hi, cut = plot_ranges(result)
    assert 0.2 <= y_hi < 0.5 and cut  # shows the failing level's risk, cuts the bound of 1.0
    assert "cut off" in risk_plot_svg(result)


def test_page_states_the_guarantee_numbers_layers_and_download() -> None:
    page = render_report("job_1", make_result(), model_bytes=30000)
    assert "With probability at least 0.9 the risk is at most 0.05." in page
    assert "In plain words" in page and "5 percentage points" in page and "90% sure" in page
    assert "95.00%" in page and "93.12%" in page  # dense and pruned accuracy
    assert "1,000" in page and "1,010" in page and "20.0 KB" in page and "29.3 KB" in page
    assert page.count("<tr") >= 2 + 2 + 4  # layers, criteria, levels
    assert 'href="/v1/jobs/job_1/artifact"' in page and 'download="job_1-pruned.pt"' in page
    assert "obd" in page and "magnitude (used)" in page


def test_everything_from_the_job_is_escaped() -> None:
    result = make_result(
        guarantee=f"fine {HOSTILE}", criterion=HOSTILE,
        layers=[{"name": f"{HOSTILE}.weight", "type": "</td><script>alert(2)</script>", "parameters": 1,
                 "zeroed": 0, "sparsity": 0.0}],
    )
    result["criteria"][0]["criterion"] = HOSTILE
    page = render_report('job_"><script>alert(3)</script>', result)
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.weight" in page
    assert "&lt;/td&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "/v1/jobs/job_%22%3E%3Cscript%3Ealert%283%29%3C%2Fscript%3E/artifact" in page  # URL-quoted id
    svg_of(page)  # still well-formed


def test_report_runs_no_scripts_under_a_strict_policy() -> None:
    page = render_report("job_1", make_result())
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp and "default-src &#x27;none&#x27;" in csp.group(1)
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_nothing_certified_says_so_without_a_lambda_line() -> None:
    lv = [level(0.1, 0.2, 0.3, False), level(0.2, None, None, False, evaluated=False)]
    page = render_report("job_1", make_result(certified=False, certified_sparsity=0.0, levels=lv, criteria=None))
    assert "Nothing certified" in page and "original" in page
    svg = svg_of(page)
    assert svg.findall(f".//{SVG}line[@class='lambda-hat']") == []
    assert len(svg.findall(f".//{SVG}line[@class='epsilon']")) == 1


def test_older_or_sparse_results_still_render() -> None:
    minimal = {"certified_sparsity": 0.1, "certified": True, "epsilon": 0.05, "delta": 0.1, "guarantee": "g",
               "levels": [{"sparsity": 0.1, "empirical_risk": 0.01, "p_value": 0.01, "rejected": True}]}
    page = render_report("job_1", minimal)
    svg = svg_of(page)
    assert len(svg.findall(f".//{SVG}polyline[@class='risk']")) == 1
    assert svg.findall(f".//{SVG}polyline[@class='ucb']") == []  # no upper bounds recorded
    assert "— (no labels)" in page


# -- the pages router -----------------------------------------------------------------------

@pytest.fixture
def get(tmp_path: Path):
    """GET through the real app in-process (no lifespan, so no executor starts)."""
    import asyncio

    import httpx

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=str(tmp_path / "data")))

    async def fetch(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return await c.get(path, headers={"Accept": "text/html"})

    return lambda path: asyncio.run(fetch(path))


@pytest.mark.parametrize("path, scripts", [("/?key=s3cret-key-value", ["common.js", "jobs.js"]),
                                           ("/jobs/job_0123?key=s3cret-key-value", ["common.js", "report_viewer.js"])])
def test_pages_admit_only_their_own_scripts_and_never_echo_the_query(get, path: str, scripts: list[str]) -> None:
    r = get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "s3cret" not in r.text and "job_0123" not in r.text  # static: nothing from the request
    assert re.findall(r"<script>", r.text) == []  # no inline script: the policy admits none
    tags = re.findall(r'<script src="/static/([a-z_]+\.js)" integrity="(sha384-[A-Za-z0-9+/=]+)"></script>', r.text)
    assert [name for name, _ in tags] == scripts and r.text.count("<script") == len(scripts)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"
    for name, integrity in tags:
        script = get(f"/static/{name}")
        assert script.status_code == 200
        digest = base64.b64encode(hashlib.sha384(script.content).digest()).decode()
        assert integrity == f"sha384-{digest}"  # the integrity attribute matches what is served
        assert "innerHTML" not in script.text and "document.write" not in script.text  # data goes in as text only


@pytest.mark.parametrize("path", ["/", "/jobs/job_1"])
def test_pages_link_only_same_origin_styles(get, path: str) -> None:
    r = get(path)
    links = re.findall(r'<link rel="stylesheet" href="([^"]+)">', r.text)
    assert links == ["/static/base.css", "/static/pages.css"]
    assert "<style" not in r.text and "style=" not in r.text  # the jobs page's style-src is 'self' alone
    assert "style-src 'self';" in get("/").headers["content-security-policy"]


@pytest.mark.parametrize("name, media", [("base.css", "text/css"), ("pages.css", "text/css"),
                                         ("report.css", "text/css"), ("common.js", "javascript"),
                                         ("jobs.js", "javascript"), ("report_viewer.js", "javascript")])
def test_static_files_are_served_with_their_content_type(get, name: str, media: str) -> None:
    r = get(f"/static/{name}")
    assert r.status_code == 200 and r.text
    ctype = r.headers["content-type"]
    assert ctype.startswith("text/css") if media == "text/css" else ctype.split(";")[0] in (
        "text/javascript", "application/javascript")
    assert r.headers["x-content-type-options"] == "nosniff"  # never sniffed into something else


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/../app.py", "/static/%2e%2e/app.py",
                                  "/static/../templates/base.html"])
def test_static_serves_nothing_outside_its_folder(get, path: str) -> None:
    r = get(path)
    assert r.status_code == 404 and "create_app" not in r.text and "{%" not in r.text


HOSTILE_STRINGS = ('<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "'><svg onload=alert(2)>")


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_hostile_strings_are_escaped_in_every_field_the_report_shows(hostile: str) -> None:
    """Every string the report shows from a job — its id, the guarantee, criteria, layers, settings values,
    the reconstruction's reason — is escaped, in the text, in attributes and in the SVG."""
    result = make_result(guarantee=hostile, criterion=hostile, procedure=hostile, scope=hostile, pattern=hostile,
                         device=hostile, precision=hostile, bound=hostile, risk=hostile, artifact_sha256=hostile,
                         bn_recalibration=hostile,
                         reconstruction={"layers": [], "skipped": {}, "unavailable": hostile},
                         layers=[{"name": hostile, "type": hostile, "parameters": 1, "zeroed": 0, "sparsity": 0.0}])
    for crit in result["criteria"]:
        crit["criterion"] = hostile
    page = render_report(hostile, result)
    lowered = page.lower()
    assert "<script" not in lowered and "<img" not in lowered and "<svg onload" not in lowered
    assert hostile not in page  # nowhere raw: neither as markup nor closing an attribute
    assert page.count(html.escape(hostile, quote=True)) >= 10  # but shown, escaped, in each field
    svg_of(page)  # still well-formed XML


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_hostile_addresses_are_not_echoed_by_the_pages(get, hostile: str) -> None:
    from urllib.parse import quote

    for path in (f"/jobs/{quote(hostile, safe='')}", f"/?key={quote(hostile, safe='')}&x={quote(hostile)}"):
        r = get(path)
        if r.status_code == 404:  # a "/" inside the id leaves the route: a JSON error, never a page
            assert r.headers["content-type"].startswith("application/json")
            continue
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "alert" not in r.text and "onerror" not in r.text and "onload" not in r.text


def test_templates_and_static_files_are_package_data() -> None:
    """Every file the pages need is covered by pyproject's package-data, so a wheel or ``pip install -e .``
    carries them, and is found next to the package (not relative to the working directory)."""
    import fnmatch
    import tomllib

    import service
    from service.web import STATIC_DIR, TEMPLATES_DIR

    root = Path(service.__file__).resolve().parent
    assert STATIC_DIR == root / "static" and TEMPLATES_DIR == root / "templates"
    globs = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    files = [f for d in (STATIC_DIR, TEMPLATES_DIR) for f in d.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"base.html", "report.html", "risk_plot.svg", "jobs.html", "report_viewer.html",
                                       "base.css", "report.css", "pages.css", "common.js", "jobs.js",
                                       "report_viewer.js"}
    for f in files:
        rel = f.relative_to(root).as_posix()
        assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel


def test_the_page_plot_and_the_png_share_one_plot_description() -> None:
    """The SVG and calibration.report's matplotlib figure draw the same risk_plot_data: same series and colours,
    same y range, the same λ̂."""
    from calibration.report import risk_curve_figure, risk_plot_data

    result = make_result()
    data = risk_plot_data(result)
    svg = svg_of(render_report("job_1", result))
    risk = svg.findall(f".//{SVG}polyline[@class='risk']")
    assert [(p.get("data-criterion"), p.get("stroke")) for p in risk] == [
        (s["criterion"], s["colour"]) for s in data["series"]]
    ax = risk_curve_figure(result).axes[0]
    assert ax.get_ylim() == pytest.approx(data["y_range"]) and ax.get_xlim() == pytest.approx(data["x_range"])
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["magnitude: empirical risk"].get_color() == data["series"][0]["colour"]
    assert set(lines["certified λ̂ = 20% (magnitude)"].get_xdata()) == {data["certified_sparsity"]}


def test_reconstruction_is_described_and_its_fallback_explained() -> None:
    used = render_report("job_1", make_result(reconstruction={"layers": ["a.weight", "b.weight"],
                                                              "skipped": {"c.weight": "x"}, "unavailable": None}))
    assert "2 layers reconstructed on the tuning split, 1 masked only" in used
    reason = f"this graph could not be probed: {HOSTILE}"
    fallback = render_report("job_1", make_result(reconstruction={"layers": [], "skipped": {}, "unavailable": reason}))
    assert "unavailable, plain masks: this graph could not be probed" in fallback
    assert "<img" not in fallback.lower()  # the reason is escaped like everything else
    assert "reconstruction" not in render_report("job_1", make_result())


def test_the_next_level_estimate_is_shown_as_an_estimate() -> None:
    more = {"sparsity": 0.75, "empirical_risk": 0.042, "p_value": 0.17, "n_calibration": 897,
            "n_calibration_needed": 1593, "note": "x"}
    page = render_report("job_1", make_result(more_data=more))
    assert "75.00% was not certified with 897 samples; about 1,593 would likely certify it" in page
    assert "not part of the guarantee" in page
    hopeless = render_report("job_1", make_result(more_data={**more, "n_calibration_needed": None}))
    assert "more data alone would not certify it" in hopeless
    assert "next level" not in render_report("job_1", make_result())


def test_the_planned_procedure_shows_d_tune_estimates_and_which_planned_levels_d_cal_tested() -> None:
    """A planned job: diamonds at D_tune's risk for the levels the bisection evaluated, one tick per planned
    level (solid where D_cal tested it, faint where the walk stopped before it), in the SVG and the PNG; the
    levels table says why a level was not tested."""
    from calibration.report import risk_curve_figure

    levels = [level(0.1, None, None, False, evaluated=False), level(0.2, 0.01, 0.02, True),
              level(0.3, 0.03, 0.06, False), level(0.4, None, None, False, evaluated=False),
              level(0.5, None, None, False, evaluated=False)]
    plan = {"sequence": [1, 2, 3], "sparsities": [0.2, 0.3, 0.4], "tune_evaluated": [2, 4, 3],
            "tune_sparsities": [0.3, 0.5, 0.4], "tune_risks": [0.02, 0.2, 0.04], "estimate": 2}
    result = make_result(procedure="planned", levels=levels, certified_sparsity=0.2,
                         criteria=[{"criterion": "magnitude", "delta": 0.1, "certified_sparsity": 0.2,
                                    "certified": True, "levels": levels, "plan": plan}])
    page = render_report("job_p", result)
    svg = svg_of(page)
    diamonds = svg.findall(f".//{SVG}path[@class='tune-estimate']")
    assert len(diamonds) == 3 and all("on D_tune" in d.find(f"{SVG}title").text for d in diamonds)
    ticks = svg.findall(f".//{SVG}line[@data-criterion='magnitude']")
    planned = [t for t in ticks if "planned-level" in (t.get("class") or "")]
    assert len(planned) == 3
    assert [t.get("class") for t in planned] == ["planned-level tested", "planned-level tested", "planned-level"]
    xs = [float(t.get("x1")) for t in planned]
    assert xs == sorted(xs) and xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])  # evenly spaced 0.2, 0.3, 0.4
    cells = re.findall(r"<td[^>]*>(not on the plan|not tested)</td>", page)
    assert cells == ["not on the plan", "not tested", "not on the plan"], cells  # 0.1, 0.4 (past the failure), 0.5
    labels = {line.get_label(): line for line in risk_curve_figure(result).axes[0].get_lines()}
    tune = labels["magnitude: D_tune estimate (planning)"]
    assert list(tune.get_xdata()) == [0.3, 0.5, 0.4] and list(tune.get_ydata()) == [0.02, 0.2, 0.04]
    assert list(labels["magnitude: planned levels, tested on D_cal"].get_xdata()) == [0.2, 0.3]
    assert list(labels["magnitude: planned levels, not reached on D_cal"].get_xdata()) == [0.4]
    # Not planned: none of these marks.
    plain = svg_of(render_report("job_f", make_result()))
    assert not plain.findall(f".//{SVG}path[@class='tune-estimate']")
    assert "not on the plan" not in render_report("job_f", make_result())
