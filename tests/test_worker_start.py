"""How a Celery worker of ours starts (services/common/celeryapp.py, ``run_worker``): Celery's
``worker`` command with our options, and not the ``celery`` umbrella command, whose other
subcommands' modules (an interactive shell among them) would cost every worker process memory;
and each pool process set to die with its parent without parsing C (``spare_cffi_parser``).

Each case runs in a fresh interpreter: what it has imported is what a worker would have.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import pytest

from bench.env import REPO, python_env
from services.common.celeryapp import set_pdeathsig

# A worker that records what Celery's command built it with, and starts nothing.
START = """
import json, os, sys
from celery import Celery
from services.common.celeryapp import run_worker, worker_argv

app = Celery("tlsrelay-test", set_as_current=True)
app.conf.worker_prefetch_multiplier = 1  # an option whose default comes from the app
seen = {}

class Worker:
    exitcode = 0

    def __init__(self, **options):
        seen.update(options)

    def start(self):
        seen["started"] = True

app.Worker = Worker
if sys.argv[1] == "umbrella":  # how workers started before: `celery --quiet worker ...`
    app.worker_main(["--quiet", "worker", *worker_argv("deliver", 3, "relay.example")])
else:
    run_worker(app, "deliver", 3, "relay.example")
heavy = sorted(m for m in ("click_repl", "prompt_toolkit") if m in sys.modules)
broker = os.environ.get("CELERY_BROKER_URL")
print(json.dumps({"options": seen, "heavy": heavy, "broker_env": broker}, default=str))
"""


def start_worker(how: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", START, how],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=python_env(env),
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_worker_command_gets_our_options_without_the_umbrella_command() -> None:
    ours, umbrella = start_worker("ours"), start_worker("umbrella")
    options = ours["options"]
    assert options["started"]
    assert options["hostname"] == "deliver@relay.example"
    assert options["queues"] == ["deliver"]
    assert options["concurrency"] == 3
    assert options["pool"] == "<class 'celery.concurrency.prefork.TaskPool'>"
    assert options["without_gossip"] and options["without_mingle"]
    assert options["without_heartbeat"]
    assert options["loglevel"] == 20  # INFO
    assert options["prefetch_multiplier"] == 1
    assert options["quiet"] is True  # no banner on stdout
    # Built as the umbrella command builds it, every option alike...
    assert options == umbrella["options"]
    # ...without importing every other subcommand, `celery amqp`'s shell among them.
    assert ours["heavy"] == []
    assert umbrella["heavy"] == ["click_repl", "prompt_toolkit"]


def test_the_umbrellas_environment_variables_are_not_read() -> None:
    """The umbrella command's options read unprefixed environment variables: ``APP`` (another
    application: the worker did not start), ``BROKER_URL`` (copied to ``CELERY_BROKER_URL``,
    which overrides the configured broker). The worker command reads none: the configuration
    alone says which Redis a worker consumes."""
    env = {"APP": "no_such_module", "BROKER_URL": "redis://elsewhere.invalid:6379/0"}
    ours = start_worker("ours", env)
    assert ours["options"]["started"]
    assert ours["broker_env"] is None
    with pytest.raises(subprocess.CalledProcessError):
        start_worker("umbrella", env)  # "Unable to load celery application"


# What Celery runs first in each pool process it forks, in a bare app.
POOL_PROCESS = """
import ctypes, json, sys
from celery import Celery
from celery.concurrency.prefork import process_initializer
from services.common.celeryapp import spare_cffi_parser

if sys.argv[1] == "ours":
    spare_cffi_parser()
process_initializer(Celery("tlsrelay-test", set_as_current=True), "deliver@relay.example")
signum = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(signum))  # PR_GET_PDEATHSIG
print(json.dumps({"pdeathsig": signum.value, "pycparser": "pycparser" in sys.modules}))
"""


def pool_process(how: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", POOL_PROCESS, how],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=python_env(),
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_pool_process_dies_with_its_parent_without_parsing_c() -> None:
    ours, billiards = pool_process("ours"), pool_process("billiard")
    assert ours["pdeathsig"] == billiards["pdeathsig"] == signal.SIGKILL
    assert not ours["pycparser"]
    assert billiards["pycparser"]  # billiard's call through cffi: what spare_cffi_parser spares


def test_set_pdeathsig_refused_is_an_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Celery ignores, as it ignores billiard's: refused by the kernel, or not Linux."""
    if sys.platform.startswith("linux"):
        with pytest.raises(OSError, match="Invalid argument"):
            set_pdeathsig(1000)  # no such signal: EINVAL
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(OSError, match="only supported on linux"):
        set_pdeathsig(signal.SIGKILL)
