"""Which tests depend on ../shared/data, and whether they ran: CI's output says so in a line.

One module instance holds the state: ``conftest.py`` is imported twice (as pytest's plugin and as
``tests.conftest`` by test modules), this module once, as ``tests.data_usage``.
"""

from __future__ import annotations

import collections
import inspect
from pathlib import Path

_running: dict[str, object] = {}  # the test being set up or run
_fixtures_of: dict[str, set[str]] = {}  # nodeid -> its fixture names
_data_fixtures: set[str] = set()  # fixtures that called shared_path
_data_tests: set[str] = set()  # tests that called shared_path themselves
_outcomes: dict[str, tuple[str, str]] = {}  # nodeid -> ("ran" | "skipped", skip reason)


def test_starts(item) -> None:
    _running["item"] = item
    _fixtures_of[item.nodeid] = set(item.fixturenames)


def note_use() -> None:
    """Called by ``shared_path``: the running test, or the fixture calling it, needs the data."""
    item = _running.get("item")
    if item is None:
        return
    _data_tests.add(item.nodeid)
    for frame in inspect.stack()[2:8]:  # a fixture function that called shared_path
        if frame.function in item.fixturenames:
            _data_fixtures.add(frame.function)


def record(report) -> None:
    uses_data = report.nodeid in _data_tests or bool(_fixtures_of.get(report.nodeid, set())
                                                     & _data_fixtures)
    if not uses_data:
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _outcomes[report.nodeid] = ("skipped", reason.removeprefix("Skipped: "))
    elif report.when == "call" or report.failed:
        _outcomes.setdefault(report.nodeid, ("ran", ""))


def summary_lines(shared_data: Path) -> list[str]:
    ran = sum(outcome == "ran" for outcome, _ in _outcomes.values())
    reasons = collections.Counter(r for o, r in _outcomes.values() if o == "skipped")
    head = (f"data-dependent tests (real images in {shared_data}): {ran} ran, "
            f"{sum(reasons.values())} skipped")
    lines = [head]
    lines += [f"  {count} skipped: {reason}" for reason, count in reasons.most_common()]
    return lines
