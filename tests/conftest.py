"""Fixtures, and the rule for privileged tests.

Privileged tests (marked ``privileged`` or ``e2e``) need root and network namespaces.
Without them they are skipped, except under ``CI=true``: there a privileged test that
does not run is a failure (the ``sandbox`` fixtures fail, and any other skip of such a
test is reported as a failure), because CI must run them. Everything the fixtures use
lives in ``tests/support``.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from netagent.cli.sandbox import Sandbox, check_privileges
from tests.support.daemon import Daemon
from tests.support.sandbox import open_sandbox, scratch_dir
from tests.support.seed import draw_seed, replay_hint

IN_CI = os.environ.get("CI", "").lower() == "true"
_SEED = pytest.StashKey[int]()


# ---- the CI=true rule ------------------------------------------------------------------
def _privileged(item: pytest.Item) -> bool:
    return "privileged" in item.keywords or "e2e" in item.keywords


def _require_privileges() -> None:
    why = check_privileges()
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI=true but privileged tests cannot run: {why}")
        pytest.skip(f"privileged test: {why}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without root, skip privileged tests, except under CI=true."""
    why = check_privileges()
    if why is None or IN_CI:
        return
    for item in items:
        if _privileged(item):
            item.add_marker(pytest.mark.skip(reason=f"privileged test: {why}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Under CI=true a privileged test that skipped (a missing tool, user or privilege)
    fails. A failed random test's report says its seed and how to replay it."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if IN_CI and report.skipped and _privileged(item) and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true: a privileged test must run, but it skipped: {reason}"
    seed = item.stash.get(_SEED, None)
    if seed is not None and report.failed:
        report.sections.append(("random seed", replay_hint(seed)))
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:  # the one-line summary (-ra) says it too
            crash.message = f"{crash.message} [{replay_hint(seed)}]"


#: the long-run mode (``make soak``) only when asked for
collect_ignore_glob = [] if os.environ.get("NETAGENT_SOAK") else ["soak/*"]


# ---- fixtures --------------------------------------------------------------------------
@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A fresh sandbox for one test, emptied and closed after it."""
    _require_privileges()
    with open_sandbox() as box:
        yield box


@pytest.fixture(scope="module")
def module_sandbox() -> Iterator[Sandbox]:
    """One sandbox for a module whose tests each check that nothing changed."""
    _require_privileges()
    with open_sandbox() as box:
        yield box


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_dir() as d:
        yield d


@pytest.fixture(scope="module")
def module_workdir() -> Iterator[Path]:
    with scratch_dir() as d:
        yield d


@pytest.fixture
def daemon(sandbox: Sandbox, workdir: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """The real daemon in the test's sandbox, ready; the firewall backend is the
    parameter (indirect), nftables by default."""
    firewall = getattr(request, "param", "nftables")
    d = Daemon(sandbox, workdir, firewall=firewall)
    d.start()
    try:
        yield d
    finally:
        if d.running():
            d.stop()


@pytest.fixture
def rng_seed(request: pytest.FixtureRequest) -> int:
    """The seed of a random test: printed as the test starts, in its failure report, and
    taken from NETAGENT_TEST_SEED to replay a failure."""
    seed = draw_seed()
    request.node.stash[_SEED] = seed
    print(f"{request.node.nodeid}: {replay_hint(seed)}")
    return seed
