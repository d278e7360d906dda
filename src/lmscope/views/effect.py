"""The view of :class:`InterventionEffect`: the prediction before and after an intervention.

A summary line (the plain run's top token: logit and probability before → after, the logit
difference, KL) and the top tokens before and after side by side, each with its probability;
tokens that enter the top list after the intervention are marked. The text twin is the same.
"""

from __future__ import annotations

from typing import Any

from lmscope.views._html import fragment
from lmscope.views._text import percent, table, visible

__all__ = ["to_html", "to_text"]


def _summary(result: Any) -> str:
    return (
        f"{visible(result.target)}: logit {result.logit_before:.3f} → {result.logit_after:.3f} "
        f"(difference {result.logit_diff:+.3f}), probability {percent(result.prob_before)} → "
        f"{percent(result.prob_after)}; KL(before ‖ after) {result.kl:.4f} nats"
    )


def _title(result: Any) -> str:
    token = visible(result.tokens[result.position])
    return f"intervention at position {result.position} ({token}): {result.description}"


def to_text(result: Any) -> str:
    rows = [
        [str(i + 1), visible(b), percent(float(pb)), visible(a), percent(float(pa))]
        for i, (b, pb, a, pa) in enumerate(
            zip(result.top_before, result.top_before_probs, result.top_after, result.top_after_probs, strict=True)
        )
    ]
    header = ["rank", "before", "p", "after", "p"]
    return "\n".join([_title(result), _summary(result), table(header, rows)])


def to_html(result: Any) -> str:
    before = set(result.top_before)
    data = {
        "title": _title(result),
        "summary": _summary(result),
        "logit_diff": result.logit_diff,
        "before": [[t, float(p)] for t, p in zip(result.top_before, result.top_before_probs, strict=True)],
        "after": [
            [t, float(p), t not in before] for t, p in zip(result.top_after, result.top_after_probs, strict=True)
        ],
    }
    return fragment("effect", data, scripts=("effect.js",), styles=("effect.css",), text=to_text(result))
