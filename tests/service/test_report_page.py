"""The HTML report: content negotiation and a page that states the guarantee and plots the curve."""

from __future__ import annotations

import pytest

from service.report_page import prefers_html, render_report


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


def test_page_has_guarantee_table_and_plot_with_epsilon_line() -> None:
    def level(s, risk, p, rejected, evaluated=True):
        return {"sparsity": s, "empirical_risk": risk, "p_value": p, "rejected": rejected, "evaluated": evaluated}

    result = {"certified_sparsity": 0.2, "certified": True, "epsilon": 0.05, "delta": 0.1,
              "guarantee": "With probability at least 0.9 <b>x</b>.",
              "levels": [level(0.1, 0.0, 0.01, True), level(0.2, 0.02, 0.05, True), level(0.3, 0.2, 0.9, False),
                         level(0.4, None, None, False, evaluated=False)]}
    page = render_report("job_1", result)
    assert "With probability at least 0.9 &lt;b&gt;x&lt;/b&gt;." in page  # escaped
    assert "<svg" in page and "ε = 0.05" in page
    assert page.count("<circle") == 3  # only evaluated levels are plotted
    assert page.count("<tr") >= 5
