"""Shared fixtures: tiny random models of every family, and the embedded model (loaded once)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools

import pytest

import lmscope

CAUSAL_FAMILIES = ("gpt2", "gpt-neox", "opt", "llama", "qwen2", "mistral", "gemma", "phi")
MASKED_FAMILIES = ("bert", "roberta")
FAMILIES = CAUSAL_FAMILIES + MASKED_FAMILIES


@functools.cache
def tiny(family: str) -> lmscope.LM:
    """A tiny random model, built once per test session (tests must not modify it)."""
    return lmscope.from_pretrained(f"tiny-{family}")


@pytest.fixture(scope="session")
def embedded() -> lmscope.LM:
    return lmscope.from_pretrained()


@pytest.fixture(params=FAMILIES)
def any_family(request: pytest.FixtureRequest) -> lmscope.LM:
    return tiny(request.param)


@pytest.fixture(params=CAUSAL_FAMILIES)
def causal_family(request: pytest.FixtureRequest) -> lmscope.LM:
    return tiny(request.param)


from browser import browser  # noqa: E402, F401  (session fixture: headless Chromium)
