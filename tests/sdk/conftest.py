"""What a failed SDK test reports besides its traceback: the end of the log of every `cove
server` running when it failed. CI keeps no data dir, so this is the only account of what the
server was doing (a call that timed out on the client says nothing of where it was stuck)."""

import pytest

from test_leap0_sdk import CoveServer

LOG_LINES = 80


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for srv in sorted(CoveServer.running, key=lambda s: str(s.data_dir)):
            report.sections.append((f"cove server log ({srv.data_dir.name}, last {LOG_LINES} lines)",
                                    srv.log_tail(LOG_LINES)))
    return report
