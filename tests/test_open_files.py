"""A deliver worker raises its soft open-file limit to what ``delivery.sessions_per_process``
needs (issue #20: 1 000 sessions in one process need more than the common 1 024), within the hard
limit, never lowering it, and says so when the hard limit is too low. The limits are simulated
(``resource.getrlimit``/``setrlimit`` replaced): nothing of this process changes."""

from __future__ import annotations

import logging
import resource

import pytest

from services.deliver.tasks import FILES_BESIDES_SESSIONS, raise_open_files


class Limits:
    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard
        self.set: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def put(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.set.append(limits)
        self.soft, self.hard = limits


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> Limits:
    fake = Limits(1024, 524288)
    monkeypatch.setattr(resource, "getrlimit", fake.get)
    monkeypatch.setattr(resource, "setrlimit", fake.put)
    return fake


def test_a_thousand_sessions_raise_the_soft_limit_within_the_hard_one(limits: Limits) -> None:
    assert raise_open_files(1000) == 1000 + FILES_BESIDES_SESSIONS
    assert limits.set == [(1000 + FILES_BESIDES_SESSIONS, 524288)]


def test_the_default_five_sessions_change_nothing(limits: Limits) -> None:
    assert raise_open_files(5) == 1024 and limits.set == []


def test_a_higher_soft_limit_is_never_lowered(limits: Limits) -> None:
    limits.soft = 65536
    assert raise_open_files(1000) == 65536 and limits.set == []


def test_a_hard_limit_too_low_is_used_up_and_logged(
    limits: Limits, caplog: pytest.LogCaptureFixture
) -> None:
    limits.hard = 1040
    with caplog.at_level(logging.WARNING, logger="tlsrelay.deliver"):
        assert raise_open_files(1000) == 1040
    assert limits.set == [(1040, 1040)]
    assert "hard limit is 1040" in caplog.text and "sessions_per_process 1000" in caplog.text
