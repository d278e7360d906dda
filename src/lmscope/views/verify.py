"""Views of a fidelity report (``VerifyReport``): a table of checks, each pass, fail or n/a."""

from __future__ import annotations

from lmscope.analysis.verify import Check, VerifyReport
from lmscope.views._html import fragment
from lmscope.views._text import table

__all__ = ["to_html", "to_text"]


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _row(check: Check) -> list[str]:
    return [check.name, check.measure, _number(check.value), _number(check.tolerance), check.status, check.detail]


def _verdict(report: VerifyReport) -> str:
    if report.passed:
        return "PASSED: every check is within its tolerance"
    return f"FAILED: {'; '.join(report.failed)}"


def to_text(report: VerifyReport) -> str:
    head = (
        f"lmscope verify {report.model} ({report.model_type}, {report.dtype} on {report.device}): "
        f"{report.n_tokens} tokens\nlayout: {report.layout}"
    )
    rows = [_row(check) for check in report.checks]
    body = table(["check", "measure", "value", "tolerance", "status", "detail"], rows)
    return f"{head}\n{body}\n{_verdict(report)}"


def to_html(report: VerifyReport) -> str:
    data = {
        "title": f"lmscope verify {report.model} ({report.model_type}, {report.dtype} on {report.device})",
        "layout": report.layout,
        "verdict": _verdict(report),
        "passed": report.passed,
        "header": ["check", "measure", "value", "tolerance", "status", "detail"],
        "rows": [_row(check) for check in report.checks],
    }
    return fragment("verify", data, scripts=("verify.js",), styles=("verify.css",), text=to_text(report))
