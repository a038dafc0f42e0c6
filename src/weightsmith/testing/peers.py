"""Peer tools (mergekit, ...) that parity tests compare against, each in its own virtualenv.

``bash .ci/peers.sh`` builds them under ``.cache/peers/<name>`` (``$<NAME>_VENV`` overrides).
Without one a parity test skips with the reason, except under ``WEIGHTSMITH_REQUIRE_PEERS=1``
(set by ``.ci/run``), where a missing peer is a failure: a parity test that skips in CI proves
nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/weightsmith/testing -> repo


def peer_python(name: str) -> Path:
    """The Python interpreter of peer ``name``'s virtualenv (may not exist)."""
    venv = os.environ.get(f"{name.upper()}_VENV") or REPO_ROOT / ".cache" / "peers" / name
    return Path(venv) / "bin" / "python"


def require_peer(name: str) -> Path:
    """``peer_python(name)``, or skip (fail under ``WEIGHTSMITH_REQUIRE_PEERS=1``) without it."""
    python = peer_python(name)
    if not python.exists():
        reason = f"{name} venv not found at {python} (run: bash .ci/peers.sh)"
        if os.environ.get("WEIGHTSMITH_REQUIRE_PEERS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return python
