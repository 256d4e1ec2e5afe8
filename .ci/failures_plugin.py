"""A pytest plugin that appends each failure's traceback to a file as it happens, so a run killed at
its time budget keeps every traceback so far (pytest, and xdist, print them only at the end).

    python -m pytest -p failures_plugin --failures-file OUT/failures.txt ...   (.ci on PYTHONPATH)

Each entry is `==== <nodeid> (<when>)` and the report's text: a failed setup, call or teardown, a
collection error, a test whose xdist worker crashed (`(worker crashed)`), a worker that went down.
Under pytest-xdist the controller writes: it receives the workers' reports through the same hooks,
and xdist reports a crashed worker's test there with when "???" (DSession.handle_crashitem).
"""

from __future__ import annotations

import pytest

HEADING = "==== "
CRASHED = "worker crashed"


def pytest_addoption(parser):
    parser.addoption("--failures-file", help="append each failure's traceback here as it happens")


def pytest_configure(config):
    path = config.getoption("failures_file")
    if path and not hasattr(config, "workerinput"):  # an xdist worker leaves it to the controller
        config.pluginmanager.register(FailureLog(path), "failure-log")


class FailureLog:
    def __init__(self, path: str):
        self.path = path

    def write(self, heading: str, text: str):
        with open(self.path, "a") as f:  # opened per entry: on disk before the next test
            f.write(f"{HEADING}{heading}\n{text.rstrip()}\n\n")

    def pytest_runtest_logreport(self, report):
        if report.failed:
            when = CRASHED if report.when == "???" else report.when
            self.write(f"{report.nodeid} ({when})", report.longreprtext)

    def pytest_collectreport(self, report):
        if report.failed:
            self.write(f"{report.nodeid or 'collection'} (collection)", report.longreprtext)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):  # xdist's hook: a worker ended
        if error:
            self.write(f"worker {node.gateway.id} down", str(error))
