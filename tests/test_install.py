"""The installs as they are made: from the lock files alone, and nothing else.

- The dev environment this suite runs in holds exactly what ``requirements/dev.lock`` names.
- The runtime install is tested on its own, as the Dockerfile makes it: a new venv from
  ``requirements/runtime.lock`` (hashes required), tlsrelay installed without dependencies from a
  copy of the source, then one message end to end through that venv's ``tlsrelay run`` — so a
  package the services import but only a dev tool brings in (kombu's Redis transport needs
  ``packaging``: issue #14) fails here, not in production.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker

from services.common.redisserver import free_port
from tests.peers import Sink
from tests.world import metrics_ports, port_open, wait_until
from tools import lockcheck

ROOT = Path(__file__).resolve().parent.parent


def applicable(lock: Path) -> dict[str, str]:
    """name → version of every pin of ``lock`` whose marker holds on this interpreter."""
    return {
        pin.name: pin.version
        for pin in lockcheck.pins(lock).values()
        if pin.marker is None or Marker(pin.marker).evaluate()
    }


def installed(python: Path | None = None) -> dict[str, str]:
    """name → version of every distribution in this environment or in ``python``'s."""
    if python is None:
        dists = {(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()}
    else:
        out = subprocess.run(
            [str(python), "-m", "pip", "list", "--format=json"],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip
        dists = {(d["name"], d["version"]) for d in json.loads(out)}
    return {lockcheck.normalise(name): version for name, version in dists if name != "tlsrelay"}


def test_locks_match_their_inputs() -> None:
    assert lockcheck.problems() == []


def test_runtime_pins_are_the_dev_pins() -> None:
    runtime = lockcheck.pins(lockcheck.RUNTIME_LOCK)
    dev = lockcheck.pins(lockcheck.DEV_LOCK)
    assert {n: p.version for n, p in runtime.items()} == {n: dev[n].version for n in runtime}
    assert "packaging" in runtime, "kombu's Redis transport imports packaging at start-up"
    assert "pytest" not in runtime


def test_dev_environment_is_exactly_the_lock() -> None:
    assert installed() == applicable(lockcheck.DEV_LOCK)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv made as the Dockerfile makes one: the runtime lock, then tlsrelay (no deps)."""
    root = tmp_path_factory.mktemp("runtime")
    source = root / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "services", source / "services",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    venv = root / "venv"
    # --no-compile: no bytecode written ahead (a third of the install's CPU time); what runs
    # compiles on import, and pip would not fail on a file that does not compile anyway.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-qq", "--no-compile"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "--require-hashes", "-r", str(lockcheck.RUNTIME_LOCK)],
        [*pip, "--no-deps", "--no-build-isolation", str(source)],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(step)}:\n{proc.stdout}\n{proc.stderr}"
    return venv


def test_runtime_install_is_exactly_the_runtime_lock(runtime_venv: Path) -> None:
    assert installed(runtime_venv / "bin" / "python") == applicable(lockcheck.RUNTIME_LOCK)


def test_runtime_install_delivers_a_message(runtime_venv: Path, tmp_path: Path) -> None:
    port = free_port()
    metrics = metrics_ports(avoid={port})
    with Sink("starttls") as sink:
        config = tmp_path / "tlsrelay.yaml"
        config.write_text(
            f"hostname: relay.test\ndata_dir: ./var\n"
            f"ingest:\n  listen: 127.0.0.1:{port}\n"
            f"delivery:\n  routes:\n    example.org: {sink.address_text}\n"
            "policy:\n  concurrency: 1\n"
            + "metrics:\n"
            + "".join(f"  {name}: {where}\n" for name, where in metrics.items())
        )
        log_path = tmp_path / "run.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(runtime_venv / "bin" / "tlsrelay"), "run", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                env={"PATH": f"{runtime_venv / 'bin'}:/usr/bin:/bin"},
            )  # fmt: skip
        try:
            wait_until(
                lambda: port_open("127.0.0.1", port) or proc.poll() is not None, 60, "ingest"
            )
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("a@origin.test", ["b@example.org"], b"Subject: lock\r\n\r\nx\r\n")
            (got,) = sink.wait_messages(1, timeout=60)
            assert got.tls is not None
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        assert code == 0, log_path.read_text()[-3000:]
