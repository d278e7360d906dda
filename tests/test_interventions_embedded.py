"""Interventions on the embedded model: causal tracing finds where " Paris" is recalled, and the
flow graph's strongest edges matter more than random ones (the full table over 10 prompts with
timings is ``benchmarks/bench_interventions.py``)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.embedded


def test_causal_tracing_of_the_capital_of_france(embedded) -> None:
    result = embedded.causal_trace("The capital of France is", "France", " Paris", samples=1)
    (subject,) = result.subject
    assert result.tokens[subject] == " France" and result.clean_prob > 5 * result.corrupted_prob
    resid, attn, mlp = result.scores
    # Restoring the subject's embedding is the clean run; restoring the last state is too.
    assert resid[0, subject] == pytest.approx(result.clean_prob, rel=1e-3)
    assert resid[-1, -1] == pytest.approx(result.clean_prob, rel=1e-3)
    # Later at the subject, restoration helps less and less: what the layers read from it has moved on.
    assert resid[-1, subject] < resid[1, subject]
    # Nothing before the subject was corrupted; restoring there changes nothing.
    np.testing.assert_allclose(resid[:, :subject], result.corrupted_prob, rtol=1e-3)
    assert np.nanmax(mlp[:, subject]) > result.corrupted_prob and np.nanmax(attn[:, -1]) > result.corrupted_prob


def test_the_flow_graphs_top_edges_matter_more_than_random_edges(embedded) -> None:
    """Not on every prompt: on "The keys to the cabinet are on the" (→ " top") ablating the top edges
    raises the logit (their weight is a proximity, not a sign); the benchmark counts the prompts."""
    result = embedded.faithfulness("The capital of France is", ks=(1, 4, 16), draws=2)
    assert result.target == " Paris" and result.beats_random, (result.top_auc, result.random_auc)
    assert result.top_logit[-1] < result.random_logit[-1]
