"""The base of every analysis result: a frozen dataclass that renders through ``lmscope.views``.

A result names its view module in ``_view``; that module provides ``to_text(result)`` and
``to_html(result)``. Results never render themselves, so analyses stay pure and views stay
replaceable.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["Result", "plain"]


def plain(value: Any) -> Any:
    """``value`` as JSON-serializable Python (arrays to lists, NaN/inf to None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_") and f.repr
        }
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


class Result:
    """Mixin for frozen result dataclasses: text twin, self-contained HTML, JSON."""

    _view: ClassVar[str]

    def _view_module(self) -> Any:
        return importlib.import_module(self._view)

    def __str__(self) -> str:
        return self._view_module().to_text(self)

    def to_html(self) -> str:
        """A self-contained HTML fragment (JS and CSS inlined, nothing loaded from a network)."""
        return self._view_module().to_html(self)

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        """Write a standalone HTML page with this view (atomically: a temporary file, then a rename)."""
        from lmscope._files import write_atomic
        from lmscope.views import page

        return write_atomic(path, page(self.to_html(), title=type(self).__name__))

    def _repr_html_(self) -> str:
        return self.to_html()

    def show(self) -> None:
        """Display in a notebook, or print the text twin elsewhere."""
        try:
            from IPython import get_ipython
            from IPython.display import HTML, display
        except ImportError:
            print(self)
            return
        if get_ipython() is None:
            print(self)
        else:
            display(HTML(self.to_html()))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable Python (what ``--json`` prints)."""
        return {"kind": type(self).__name__, **plain(self)}
