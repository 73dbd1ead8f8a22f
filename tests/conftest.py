"""Shared fixtures live in small plugin modules, one per concern, so each owner edits only its own."""

pytest_plugins = [
    "tests.fixtures.slurm",
    "tests.fixtures.multinode",
    "tests.fixtures.data",
    "tests.fixtures.torch_threads",
    "tests.fixtures.runs",
]

def pytest_collection_modifyitems(config, items):
    """`-m "not integration"` is the fast set, so a test on a Slurm cluster must say it is an integration test."""
    import pytest

    unmarked = [item.nodeid for item in items if not item.get_closest_marker("integration")
                and (item.get_closest_marker("slurm") or item.get_closest_marker("multinode"))]
    if unmarked:
        raise pytest.UsageError(f"{len(unmarked)} slurm/multinode test(s) not marked integration, so the fast set "
                                f"would start Slurm: {', '.join(unmarked[:5])}; add @pytest.mark.integration")


# Under CI=true nothing may skip silently: a test that cannot run there (no Slurm, no shared data set, a
# missing package) fails the session, whatever its own fixture did about it.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    import os

    import pytest

    if os.environ.get("CI") == "true" and _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    import os

    if os.environ.get("CI") == "true" and _skipped:
        terminalreporter.write_line(f"CI=true: {len(_skipped)} test(s) skipped, which fails the run: "
                                    + ", ".join(_skipped[:10]))
