"""Cleanup for the service tests: before a sandbox is torn down, stop what runs in it
gracefully (SIGTERM to each process the test started, by pid), then kill, by pid, whatever
those processes left in the sandbox (a daemon killed with -9 leaves its ``nft monitor``,
which would otherwise hold the sandbox's network namespace forever)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netagent.cli.sandbox import Sandbox

from .helpers import stop_everything_in


@pytest.fixture
def sandbox(sandbox: Sandbox) -> Iterator[Sandbox]:
    try:
        yield sandbox
    finally:
        stop_everything_in(sandbox)
