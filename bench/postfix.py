"""Postfix as a benchmark target: a private instance on loopback, never on port 25.

:func:`ensure_installed` installs Debian's ``postfix`` package when it is missing (as root,
``DEBIAN_FRONTEND=noninteractive``, preseeded to "No configuration" so the system instance gets no
``main.cf``; while apt runs, a ``policy-rc.d`` that denies service starts is put in place unless
one exists). :class:`PostfixRelay` then runs an instance of its own: a config directory, queue
and data directory under the benchmark's work directory, ``inet_interfaces = 127.0.0.1``, and a
``master.cf`` whose only ``inet`` service is ``smtpd`` on a free high port — there is no
``smtp inet`` line, so nothing listens on 25. Mail for the benchmark domains goes to the sinks
through ``transport_maps``; outgoing TLS is ``smtp_tls_security_level = may`` (Postfix's
opportunistic TLS, the counterpart of tlsrelay's default) with Debian's TLS session cache, and
``smtp_tls_connection_reuse`` as asked (it needs ``tlsproxy`` and ``scache``, both in
``master.cf``). Everything else keeps Postfix's defaults (20 parallel deliveries per
destination, queue files fsync'ed before "250").

The master runs in the foreground (``postfix start-fg``) as our child, so it is reaped when
stopped; its daemons are its children (measured as one tree).

Failure: :class:`PostfixUnavailable` (with what to do) when Postfix is missing and cannot be
installed; :class:`bench.relay.TargetError` when the instance does not start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from bench.relay import TargetError, wait_listening
from services.common.redisserver import free_port

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
INSTALL_TIMEOUT = 900


class PostfixUnavailable(RuntimeError):
    pass


def installed() -> bool:
    return all(p.exists() for p in (POSTFIX, POSTCONF, SMTP_SOURCE))


def ensure_installed() -> None:
    """Install Debian's postfix (with smtp-source) unless it is there; explain when impossible."""
    if installed():
        return
    if os.geteuid() != 0:
        raise PostfixUnavailable(
            "Postfix is not installed and installing it needs root: run "
            "'sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix' (choose "
            "'No configuration'), then 'make bench-compare' again"
        )
    if shutil.which("apt-get") is None or shutil.which("debconf-set-selections") is None:
        raise PostfixUnavailable("Postfix is not installed and this is not a Debian system (apt)")
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
    )
    guard = not POLICY_RC.exists()
    if guard:  # apt must not start a system Postfix (it would have no main.cf, but be sure)
        POLICY_RC.write_text("#!/bin/sh\n# bench/postfix.py: no starts during install\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        ok = _apt_install() or (_apt(["apt-get", "update"]) and _apt_install())
    finally:
        if guard:
            POLICY_RC.unlink(missing_ok=True)
    if not ok or not installed():
        raise PostfixUnavailable(
            "could not install Debian's postfix package (no network to the Debian mirrors?); "
            "see the apt output above. 'make bench' (tlsrelay alone) does not need it."
        )


def _apt_install() -> bool:
    return _apt(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"])


def _apt(argv: list[str]) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(argv, env=env, timeout=INSTALL_TIMEOUT).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _transport(address: str) -> str:
    """``127.0.0.1:2601`` → ``smtp:[127.0.0.1]:2601`` (brackets: no MX lookup)."""
    host, _, port = address.rpartition(":")
    return f"smtp:[{host}]:{port}"


# Postfix's own services; chroot off ("n") so the instance needs no chroot set-up.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsproxy  unix  -       -       n       -       0       tlsproxy
"""


class PostfixRelay:
    """Context manager for one private Postfix instance (see the module docstring)."""

    def __init__(self, root: Path, routes: dict[str, str], connection_reuse: bool) -> None:
        self.root = root
        self.routes = routes
        self.connection_reuse = connection_reuse
        self.name = f"postfix (reuse={'yes' if connection_reuse else 'no'})"
        self.smtp_port = free_port()
        self.etc, self.spool, self.data = root / "etc", root / "spool", root / "data"
        self.master: subprocess.Popen[bytes] | None = None
        self.master_pid = 0

    def main_cf(self) -> str:
        transports = ", ".join(f"{d}={_transport(a)}" for d, a in self.routes.items())
        return "\n".join(
            [
                "compatibility_level = 3.6",
                f"queue_directory = {self.spool}",
                f"data_directory = {self.data}",
                "mail_owner = postfix",
                "setgid_group = postdrop",
                "myhostname = postfix.bench.test",
                "mydestination =",
                "inet_interfaces = 127.0.0.1",
                "inet_protocols = ipv4",
                "mynetworks = 127.0.0.0/8",
                f"transport_maps = inline:{{ {transports} }}",
                "local_transport = error:local delivery is disabled",
                "alias_maps =",
                "smtp_tls_security_level = may",
                "smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache",
                f"smtp_tls_connection_reuse = {'yes' if self.connection_reuse else 'no'}",
                f"maillog_file = {self.root / 'maillog'}",
                f"maillog_file_prefixes = {self.root}",
                "",
            ]
        )

    def __enter__(self) -> PostfixRelay:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postfix user reaches its queue and data below
        for parent in self.root.parents:
            if not parent.stat().st_mode & 0o001:
                raise TargetError(
                    f"the postfix user cannot enter {parent} (mode "
                    f"{parent.stat().st_mode & 0o777:o}): use a --workdir it can reach"
                )
        self.etc.mkdir(exist_ok=True)
        self.spool.mkdir(exist_ok=True)  # data_directory is created by Postfix, owned by postfix
        (self.etc / "main.cf").write_text(self.main_cf())
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.smtp_port}"))
        (self.root / "maillog").touch()
        with (self.root / "postfix.out").open("ab") as out:
            self.master = subprocess.Popen(
                [str(POSTFIX), "-c", str(self.etc), "start-fg"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            master = self.master
            wait_listening(self.smtp_port, lambda: master.poll() is None, "postfix")
            self.master_pid = int((self.spool / "pid" / "master.pid").read_text().split()[0])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def processes(self) -> dict[str, int]:
        return {"postfix": self.master_pid}

    def check_alive(self) -> None:
        if self.master is None or self.master.poll() is not None:
            raise TargetError(f"the Postfix master exited; see {self.root / 'maillog'}")

    def stop(self) -> None:
        if self.master is None:
            return
        if self.master.poll() is None:
            subprocess.run([str(POSTFIX), "-c", str(self.etc), "stop"], capture_output=True)
            try:
                self.master.wait(timeout=30)
            except subprocess.TimeoutExpired:
                subprocess.run([str(POSTFIX), "-c", str(self.etc), "abort"], capture_output=True)
                self.master.wait(timeout=10)
        self.master = None
        time.sleep(0.2)  # daemons finish exiting after the master
