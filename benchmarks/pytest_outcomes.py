"""pytest plugin of the GPU check: every test's outcome appended to a JSON-lines file as it finishes.

    python -m pytest -p pytest_outcomes --outcomes-jsonl PATH ...      (benchmarks/ on PYTHONPATH)

One line per test phase that did not simply pass (setup/teardown errors, failures, skips), one per
test module that failed to import (``when: collect``) and one per passed test call: ``{"nodeid", "when", "outcome", "seconds", "message"}``. Written as the run goes,
so that a run cut off by a timeout still says which tests passed and which failed. Under pytest-xdist
only the controller writes (the workers' reports reach it).
"""

from __future__ import annotations

import json

_STATE: dict = {}  # the pytest config, set at configure time


def pytest_addoption(parser):
    parser.addoption(
        "--outcomes-jsonl", default=None, help="append each test outcome to this JSON-lines file"
    )


def _first_line(report) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):  # (path, line, "Skipped: why")
        return str(report.longrepr[2])[:200]
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]  # the assertion / exception lines
    return (errors[0] if errors else (lines[-1] if lines else ""))[:300]


def pytest_runtest_logreport(report):
    if report.passed and report.when != "call":
        return
    _write(
        {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "seconds": round(float(report.duration), 3),
            "message": _first_line(report),
        }
    )


def _write(record: dict) -> None:
    config = _STATE.get("config")
    if config is None or hasattr(config, "workerinput"):  # an xdist worker: the controller writes
        return
    path = config.getoption("outcomes_jsonl")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collectreport(report):
    """A test module that fails to import (an optional dependency missing on the machine): recorded as a
    collect error, so that the summary says which tests never ran."""
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed", "seconds": 0.0,
                "message": _first_line(report)})  # fmt: skip


def pytest_configure(config):
    _STATE["config"] = config
