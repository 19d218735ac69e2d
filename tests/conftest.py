import os

import pytest

from verdicts import kernel_netns  # noqa: F401  (a fixture for every test module)

from bpfilter_lab import namespaces


def pytest_sessionstart(session):
    # Everything here drives the real kernel; without root it would only prove mocks.
    if os.geteuid() != 0:
        pytest.exit("bpfilter's tests need root (BPF, network namespaces, iptables-legacy)",
                    returncode=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A test that cannot run must fail loudly: a skip is reported as a failure.
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped tests are not allowed here: {report.longrepr}"


@pytest.fixture
def fresh_netns():
    """A new, empty network namespace (loopback up), deleted afterwards."""
    with namespaces.scratch() as name:
        yield name
