"""How a Celery worker of ours starts (services/common/celeryapp.py, ``run_worker``): Celery's
``worker`` command with our options, and not the ``celery`` umbrella command, whose other
subcommands' modules (an interactive shell among them) would cost every worker process memory.

Each case runs in a fresh interpreter: what it has imported is what a worker would have.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench.env import REPO, python_env

# A worker that records what Celery's command built it with, and starts nothing.
START = """
import json, sys
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
print(json.dumps({"options": seen, "heavy": heavy}, default=str))
"""


def start_worker(how: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", START, how],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=python_env(),
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
