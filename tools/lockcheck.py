"""The lock files and what they were made from: ``make lock`` stamps, ``make test`` checks.

``requirements/runtime.lock`` pins every package a runtime install needs (with hashes, for
``pip install --require-hashes``); ``requirements/dev.lock`` pins those plus the development
tools. Both are resolved by ``make lock`` from ``pyproject.toml`` and ``requirements/build.in``.
Each lock's first line records a digest of those inputs (the dependency lists, not comments or
formatting), so a change to the inputs that was not followed by ``make lock`` is caught here:

    python -m tools.lockcheck stamp   # after resolving: write the digest line (make lock)
    python -m tools.lockcheck check   # exit 1, naming `make lock`, when inputs and locks disagree

Failure: ``check`` prints one line per stale or unstamped lock and exits 1; a missing file is
reported the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
BUILD_IN = ROOT / "requirements" / "build.in"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"
DEV_LOCK = ROOT / "requirements" / "dev.lock"
LOCKS = (RUNTIME_LOCK, DEV_LOCK)
STAMP = "# inputs-sha256: "
REFRESH = "make lock"

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$"
)


@dataclass(frozen=True)
class Pin:
    name: str  # normalised (PEP 503)
    version: str
    marker: str | None


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def inputs_digest() -> str:
    """sha256 of what the locks are resolved from: dependency lists and build requirements."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    build = [
        line.split("#", 1)[0].strip()
        for line in BUILD_IN.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build": build,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def pins(lock: Path) -> dict[str, Pin]:
    """Every ``name==version`` line of ``lock``, by normalised name."""
    found = {}
    for line in lock.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            name = normalise(match["name"])
            found[name] = Pin(name, match["version"], match["marker"])
    return found


def problems() -> list[str]:
    want = inputs_digest()
    out = []
    for lock in LOCKS:
        where = lock.relative_to(ROOT)
        if not lock.is_file():
            out.append(f"{where} is missing: run `{REFRESH}`")
            continue
        first = lock.read_text().split("\n", 1)[0]
        if first != STAMP + want:
            out.append(
                f"{where} does not match pyproject.toml / requirements/build.in: run `{REFRESH}`"
            )
    return out


def stamp() -> None:
    line = STAMP + inputs_digest()
    for lock in LOCKS:
        lines = lock.read_text().split("\n")
        if lines and lines[0].startswith(STAMP):
            lines = lines[1:]
        lock.write_text("\n".join([line, *lines]))


def main(argv: list[str]) -> int:
    if argv == ["stamp"]:
        stamp()
        return 0
    if argv == ["check"]:
        found = problems()
        for problem in found:
            print(f"lockcheck: {problem}", file=sys.stderr)
        return 1 if found else 0
    print("usage: python -m tools.lockcheck stamp|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
