"""Where batch work runs: ``local`` (this process) or ``ray`` (a Ray Data actor pool, one machine or a cluster).

* :mod:`visionscale.engines.anomaly`: ``ad predict`` over files on either engine, same outputs;
* :mod:`visionscale.engines.faces`: ``face detect`` over files on Ray;
* :mod:`visionscale.engines.ray_engine`: the Ray mechanism (session, actor pool, failures);
* :mod:`visionscale.engines.resume`: the output folder that an interrupted job resumes.

This package sits above the domains (it imports ``anomaly`` and ``face``, they never import it)
and below the CLI. Ray is optional (``pip install 'visionscale[ray]'``) and imported only when the
ray engine runs. See docs/ray.md.
"""

from __future__ import annotations

ENGINES = ("local", "ray")

__all__ = ["ENGINES"]
