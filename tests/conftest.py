"""Shared fixtures live in small plugin modules, one per concern, so each owner edits only its own."""

pytest_plugins = [
    "tests.fixtures.slurm",
    "tests.fixtures.multinode",
    "tests.fixtures.data",
    "tests.fixtures.torch_threads",
    "tests.fixtures.runs",
]
