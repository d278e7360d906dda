"""The web app (``lmscope serve``): FastAPI over the library, and a static front end reusing the views' JS.

Needs the ``app`` extra (FastAPI, uvicorn); importing this package without them says so.
"""

try:
    import fastapi  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("the lmscope web app needs FastAPI and uvicorn: pip install 'lmscope[app]'") from error

from lmscope.app.config import AppConfig, load_config
from lmscope.app.server import create_app

__all__ = ["AppConfig", "create_app", "load_config"]
