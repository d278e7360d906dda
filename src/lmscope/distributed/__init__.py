"""Corpus jobs on Ray: ``lmscope.collect(..., engine="ray")`` and ``lmscope collect --engine ray``.

Nothing here imports ``ray`` until a job runs; without it, the Ray engine names the extra to
install (``pip install 'lmscope[distributed]'``).
"""

from lmscope.distributed._cluster import check_address, connect, require_ray
from lmscope.distributed._collect import collect_on_ray, plan_shards

__all__ = ["check_address", "collect_on_ray", "connect", "plan_shards", "require_ray"]
