"""release_freed_memory trims only when the resident set grew past the slack since the last
trim: a small model's per-layer working set is reused, not refaulted."""

from __future__ import annotations

import weightsmith.core.memory as M


class _Libc:
    def __init__(self):
        self.trims = 0

    def malloc_trim(self, pad):
        self.trims += 1


def test_trims_only_past_the_slack(monkeypatch):
    libc, rss = _Libc(), [500 << 20]
    monkeypatch.setattr(M, "_LIBC", libc)
    monkeypatch.setattr(M, "_trimmed_at", [None])
    monkeypatch.setattr(M, "resident_bytes", lambda: rss[0])
    M.release_freed_memory()  # the first call trims
    assert libc.trims == 1
    rss[0] += M.TRIM_SLACK  # grown by exactly the slack: let be
    M.release_freed_memory()
    assert libc.trims == 1
    rss[0] += 1  # past it: trim, and measure from here
    M.release_freed_memory()
    assert libc.trims == 2
    M.release_freed_memory()
    assert libc.trims == 2


def test_trims_every_time_when_the_resident_set_is_unknown(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(M, "_LIBC", libc)
    monkeypatch.setattr(M, "_trimmed_at", [None])
    monkeypatch.setattr(M, "resident_bytes", lambda: None)
    M.release_freed_memory()
    M.release_freed_memory()
    assert libc.trims == 2


def test_resident_bytes_is_positive_here():
    rss = M.resident_bytes()
    assert rss is None or rss > 1 << 20
