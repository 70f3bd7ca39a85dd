"""What the deployment tests (tests/test_deploy_*.py) share.

Skips for a missing validator package or binary (a failure under
SYNCLOCK_REQUIRE_BACKENDS=1), the compose values from .env.example, the two
compose replicas, and what a replica's process sees: the final Dockerfile stage's
ENV, then compose's.
"""

from __future__ import annotations

import importlib
import shutil
from types import ModuleType

from tests import deployfiles as df
from tests.servers import missing

REPLICAS = ("synclock-1", "synclock-2")


def need(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{package} is not installed (pip install -e '.[dev]')"
        missing(message)


def need_binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed"
        missing(message)
    return found


def compose_values(**overrides: str) -> dict[str, str]:
    return {**df.read_env_file(), **overrides}


def final_stage() -> df.Stage:
    stages = df.dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile should be multi-stage"
    return stages[-1]


def replica_environment(service: str, values: dict[str, str]) -> dict[str, str]:
    """What a compose replica's process sees: the image's ENV, then compose's."""
    compose = df.load_compose(values)
    return {**final_stage().env(), **df.environment(compose["services"][service])}
