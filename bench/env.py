"""How the benchmark starts Python children: from this checkout, whatever the current directory.

Every child (services, sink, load client) runs ``sys.executable -m ...`` with ``cwd`` at the
repository root and the root first on ``PYTHONPATH``, so the services measured are the code
next to this ``bench`` package (not another installed copy).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    env.update(extra or {})
    return env
