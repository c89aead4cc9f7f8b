"""``tlsrelay check DOMAIN``: real peers of every kind behind the test DNS server, probed through
the real command line. Each gets the right verdict per mode, the exit status follows the mode
the rules give the domain, and no peer ever sees a MAIL command (the check sends no mail). DANE
(RFC 7672): the test DNS server answers with the AD bit and TLSA records, as in
tests/test_dane_delivery.py; the verdicts follow from the planner's mode ``dane``."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import cli
from services.common.redisserver import free_port
from tests.dnsserver import LocalDns
from tests.peers import Sink, served_key_digest

# domain → (sink options, verdict per mode: would deliver?)
PEERS: dict[str, tuple[dict[str, Any], tuple[bool, bool, bool]]] = {
    "good.test": ({"extensions": ("REQUIRETLS",)}, (True, True, True)),
    "selfsigned.test": ({"cert": "selfsigned"}, (True, True, False)),
    "wrongname.test": ({"cert_names": ["somebody-else.test"]}, (True, True, False)),
    "expired.test": ({"cert": "expired"}, (True, True, False)),
    "plain.test": ({"kind": "plain"}, (True, False, False)),
    "broken.test": ({"kind": "broken"}, (True, False, False)),
    "tls10.test": ({"max_tls_version": ssl.TLSVersion.TLSv1}, (True, True, False)),
}


@dataclass
class Lab:
    sinks: dict[str, Sink]
    config: Path
    dns: LocalDns

    def check(
        self, capsys: pytest.CaptureFixture[str], domain: str, *extra: str
    ) -> tuple[int, Any]:
        code = cli.main(["check", domain, "--json", "--config", str(self.config), *extra])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip().startswith("{") else out


def _start_sinks(stack: contextlib.ExitStack) -> tuple[int, dict[str, Sink]]:
    """One sink per kind, each on its own loopback address, all on one port (the MX port)."""
    for _ in range(5):
        port = free_port("127.0.0.21")
        sinks: dict[str, Sink] = {}
        try:
            for n, (domain, (options, _)) in enumerate(PEERS.items()):
                names = options.pop("cert_names", None) or [f"mx.{domain}"]
                sink = Sink(host=f"127.0.0.{21 + n}", port=port, cert_names=names, **options)
                options["cert_names"] = names if names != [f"mx.{domain}"] else None
                sinks[domain] = stack.enter_context(sink)
            return port, sinks
        except OSError:
            stack.close()
    raise RuntimeError("no port free on every loopback address")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("check")
    with contextlib.ExitStack() as stack:
        port, sinks = _start_sinks(stack)
        dns = stack.enter_context(LocalDns())
        for domain, sink in sinks.items():
            dns.add(domain, "MX", f"10 mx.{domain}.")
            dns.add(f"mx.{domain}", "A", sink.host)
        dns.add("_smtp._tls.good.test", "TXT", "v=TLSRPTv1; rua=mailto:tls@good.test")
        dns.add("nxmx.test", "MX", "0 .")
        ca = sinks["good.test"].write_ca_pem(root / "ca.pem")
        settings = {
            "hostname": "relay.test",
            "data_dir": str(root / "var"),
            "delivery": {
                "dns_servers": [f"127.0.0.1:{dns.port}"], "mx_port": port, "ca_file": ca,
                "connect_timeout": "3s", "command_timeout": "5s", "greeting_timeout": "5s",
                "mta_sts": False,
            },
            "rules": [{"name": "partners", "when": {"recipient_domain": ["*.test"]},
                       "unless": {"recipient_domain": ["good.test", "plain.test"]},
                       "tls": "verified"}],
        }  # fmt: skip
        config = root / "tlsrelay.yaml"
        config.write_text(yaml.safe_dump(settings))
        yield Lab(sinks, config, dns)


@pytest.mark.parametrize("domain", list(PEERS))
def test_verdict_per_mode_and_no_mail(
    lab: Lab, capsys: pytest.CaptureFixture[str], domain: str
) -> None:
    code, doc = lab.check(capsys, domain)
    verdicts = {v["mode"]: v["delivers"] for v in doc["verdicts"]}
    expected = PEERS[domain][1]
    assert (verdicts["opportunistic"], verdicts["enforced"], verdicts["verified"]) == expected, doc
    # The rules: verified for every *.test but good.test and plain.test (default opportunistic).
    at_rules = "opportunistic" if domain in ("good.test", "plain.test") else "verified"
    assert doc["rules"]["tls"] == at_rules
    assert code == (0 if verdicts[at_rules] else 1)
    assert doc["dane"]["applies"] is False and "delivery.dnssec is none" in doc["dane"]["why"]
    assert doc["hosts"][0]["tlsa"] is None
    sink = lab.sinks[domain]
    assert sink.mail_commands == [] and sink.messages == [], sink.summary()


def test_what_each_host_shows(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    _, good = lab.check(capsys, "good.test")
    (host,) = good["hosts"]
    assert host["starttls"] and host["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert host["requiretls"] is True and host["verification"] == {"ok": True, "why": None}
    assert host["certificate"]["names"] == ["mx.good.test"] and host["leaf_verdict"] == "ok"
    assert host["greeting"].startswith("220") and good["tlsrpt"]["rua"] == ["tls@good.test"]
    assert good["mta_sts"] == {"applies": False, "why": "delivery.mta_sts is off"}
    assert good["routing"] == [f"MX 10 mx.good.test:{host['port']} [127.0.0.21]"]
    _, expired = lab.check(capsys, "expired.test")
    assert expired["hosts"][0]["verification"]["why"] == "certificate has expired"
    assert expired["hosts"][0]["leaf_verdict"] == "expired"
    _, wrong = lab.check(capsys, "wrongname.test")
    assert wrong["hosts"][0]["leaf_verdict"] == "wrong_name"
    assert "does not name" in wrong["hosts"][0]["verification"]["why"]
    _, tls10 = lab.check(capsys, "tls10.test")
    assert tls10["hosts"][0]["tls_version"] == "TLSv1"
    assert "TLSv1 works only" in tls10["verdicts"][2]["how"]
    _, plain = lab.check(capsys, "plain.test")
    assert plain["hosts"][0]["starttls"] is False
    assert (
        "in clear" in plain["verdicts"][0]["how"] and "not_offered" in plain["verdicts"][1]["how"]
    )


def test_text_output_and_usage_errors(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check", "selfsigned.test", "--config", str(lab.config)])
    out = capsys.readouterr().out
    assert code == 1
    assert "verified: would defer: TLS required but not available" in out
    assert "self-signed certificate" in out and "DANE: not applied (delivery.dnssec is none" in out
    assert "DANE requires: nothing (delivery.dnssec is none" in out
    assert "not supported" not in out
    assert "cannot take mail at the mode the rules give it (verified)" in out
    with pytest.raises(SystemExit) as usage:
        cli.main(["check", "not a domain!", "--config", str(lab.config)])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as missing:
        cli.main(["check", "--config", str(lab.config)])
    assert missing.value.code == 2


def test_a_domain_that_takes_no_mail(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = lab.check(capsys, "nxmx.test")
    assert code == 1 and "null MX" in doc["refused"]
    assert all(not v["delivers"] and v["fate"] == "would bounce" for v in doc["verdicts"])


def test_mta_sts_is_looked_up_now_and_raises_the_mode(
    lab: Lab, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.certs import default_ca
    from tests.httpsserver import PolicyServer

    with PolicyServer(default_ca()) as web:
        for domain, mode in (("plain.test", "enforce"), ("wrongname.test", "testing")):
            lab.dns.set_txt(f"_mta-sts.{domain}", f"v=STSv1; id={mode}1;")
            lab.dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")
            web.publish(domain, f"version: STSv1\nmode: {mode}\nmx: mx.{domain}\nmax_age: 600\n")
        lab.dns.set_txt("_mta-sts.good.test", "v=STSv1; id=gone1;")  # no policy host: fetch fails
        settings = yaml.safe_load(lab.config.read_text())
        ca = settings["delivery"]["ca_file"]
        settings["delivery"].update(mta_sts=True, mta_sts_ca_file=ca, mta_sts_port=web.port)
        config = tmp_path / "sts.yaml"
        config.write_text(yaml.safe_dump(settings))
        lab = Lab(lab.sinks, config, lab.dns)
        code, plain = lab.check(capsys, "plain.test")
        _, testing = lab.check(capsys, "wrongname.test")
        code_good, good = lab.check(capsys, "good.test")
    # Enforce: every mode is raised to verified, and a server without STARTTLS cannot take it.
    assert code == 1 and plain["mta_sts"]["mode"] == "enforce"
    assert plain["mta_sts"]["mx"] == ["mx.plain.test"] and plain["mta_sts"]["max_age"] == 600
    assert {v["effective"] for v in plain["verdicts"]} == {"verified"}
    assert not any(v["delivers"] for v in plain["verdicts"])
    assert testing["mta_sts"]["requires"].startswith("nothing (testing")
    assert (
        testing["verdicts"][0]["delivers"]
        and testing["verdicts"][0]["effective"] == "opportunistic"
    )
    assert (
        code_good == 0
        and good["mta_sts"]["mode"] is None
        and "mta-sts.good.test" in good["mta_sts"]["error"]
    )
    assert lab.sinks["plain.test"].mail_commands == []


def test_the_relays_tls_broken_memory_is_read_never_written(
    lab: Lab, capsys: pytest.CaptureFixture[str], tmp_path: Path, valkey: Any, store: Any
) -> None:
    from services.common import spool

    sink = lab.sinks["broken.test"]
    store.set(spool.tls_broken_key(sink.host, sink.port), "mx.broken.test", ex=60)
    settings = yaml.safe_load(lab.config.read_text())
    settings["redis_url"] = valkey.url
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(settings))
    code, doc = Lab(lab.sinks, config, lab.dns).check(capsys, "broken.test")
    opportunistic, enforced = doc["verdicts"][0], doc["verdicts"][1]
    assert doc["hosts"][0]["remembered_broken"] is True
    assert opportunistic["delivers"] and "remembered_broken" in opportunistic["how"]
    assert not enforced["delivers"] and "handshake_failed" in enforced["how"]  # tried anyway
    assert code == 1  # the rules make broken.test verified
    assert [k.decode() for k in store.keys("*")] == [spool.tls_broken_key(sink.host, sink.port)]


def test_an_unreachable_relay_redis_is_a_note(
    lab: Lab, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = yaml.safe_load(lab.config.read_text())
    settings["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    config = tmp_path / "down.yaml"
    config.write_text(yaml.safe_dump(settings))
    code, doc = Lab(lab.sinks, config, lab.dns).check(capsys, "good.test")
    assert code == 0 and "could not be read" in doc["notes"][0]


# --------------------------------------------------------------------------- DANE

# domain → its sink's address; each serves a self-signed certificate (no CA vouches for it)
DANE_DOMAINS = {"danematch.test": "127.0.0.31", "danemismatch.test": "127.0.0.32"}
NOMATCH = "3 1 1 " + "00" * 32


@dataclass
class DaneLab:
    sinks: dict[str, Sink]
    dns: LocalDns
    root: Path
    port: int

    def config(self, dnssec: str) -> Path:
        """The rules make danematch.test ``verified``: met by DANE, not by its certificate."""
        settings = {
            "hostname": "relay.test",
            "data_dir": str(self.root / "var"),
            "delivery": {
                "dns_servers": [f"127.0.0.1:{self.dns.port}"], "mx_port": self.port,
                "dnssec": dnssec, "mta_sts": False, "connect_timeout": "3s",
                "command_timeout": "5s", "greeting_timeout": "5s",
            },
            "rules": [{"name": "partner", "when": {"recipient_domain": ["danematch.test"]},
                       "tls": "verified"}],
        }  # fmt: skip
        path = self.root / f"{dnssec}.yaml"
        path.write_text(yaml.safe_dump(settings))
        return path

    def check(
        self, capsys: pytest.CaptureFixture[str], domain: str, dnssec: str
    ) -> tuple[int, Any]:
        argv = ["check", domain, "--json", "--config", str(self.config(dnssec))]
        code = cli.main(argv)
        return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def dane_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaneLab]:
    """Both domains' MX, A and TLSA answers carry the AD bit: danematch.test publishes the
    ``3 1 1`` record of its sink's key, danemismatch.test one of no key."""
    with contextlib.ExitStack() as stack:
        port, sinks = _start_dane_sinks(stack)
        dns = stack.enter_context(LocalDns())
        for domain, sink in sinks.items():
            mx, tlsa = f"mx.{domain}", f"_{port}._tcp.mx.{domain}"
            dns.add(domain, "MX", f"10 {mx}.")
            dns.add(mx, "A", sink.host)
            record = f"3 1 1 {served_key_digest(sink)}" if domain == "danematch.test" else NOMATCH
            dns.add(tlsa, "TLSA", record)
            for name in (domain, mx, tlsa):
                dns.secure(name)
        yield DaneLab(sinks, dns, tmp_path_factory.mktemp("dane-check"), port)


def _start_dane_sinks(stack: contextlib.ExitStack) -> tuple[int, dict[str, Sink]]:
    for _ in range(5):
        port = free_port("127.0.0.31")
        with contextlib.ExitStack() as started:
            try:
                sinks = {
                    domain: started.enter_context(
                        Sink(
                            host=address, port=port, cert="selfsigned", cert_names=[f"mx.{domain}"]
                        )
                    )
                    for domain, address in DANE_DOMAINS.items()
                }
            except OSError:
                continue
            stack.push(started.pop_all())
            return port, sinks
    raise RuntimeError("no port free on every loopback address")


def no_mail(sink: Sink) -> None:
    assert sink.mail_commands == [] and sink.messages == [], sink.summary()


def test_a_matching_tlsa_record_delivers_dane_verified_in_every_mode(
    dane_lab: DaneLab, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = dane_lab.check(capsys, "danematch.test", "trust_resolver")
    assert code == 0, doc  # the rules' verified is met by DANE, not by the self-signed leaf
    dane = doc["dane"]
    assert dane["applies"] is True and dane["mx_secure"] is True
    assert [(h["host"], h["status"]) for h in dane["hosts"]] == [("mx.danematch.test", "usable")]
    assert "mx.danematch.test: TLS with a certificate matching its TLSA records" in dane["requires"]
    assert "DNSSEC: MX validated, addresses validated" in doc["routing"][0]
    (host,) = doc["hosts"]
    assert host["tlsa"]["status"] == "usable" and host["tlsa"]["tlsa"][0].startswith("3 1 1 ")
    assert "matches 3 1 1" in host["tlsa"]["match"] and "DANE-EE" in host["tlsa"]["match"]
    assert host["verification"]["why"] == "self-signed certificate"  # PKIX alone would fail
    for verdict in doc["verdicts"]:
        assert verdict["delivers"] and verdict["effective"] == "dane", verdict
        assert "over DANE-verified TLS at mx.danematch.test" in verdict["how"], verdict
    no_mail(dane_lab.sinks["danematch.test"])


def test_a_mismatching_tlsa_record_defers_in_every_mode(
    dane_lab: DaneLab, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = dane_lab.check(capsys, "danemismatch.test", "trust_resolver")
    assert code == 1, doc
    (host,) = doc["hosts"]
    assert host["tls_version"] is not None  # TLS itself works: only the TLSA match fails
    assert "no usable TLSA record matched" in host["tlsa"]["match"]
    for verdict in doc["verdicts"]:
        assert not verdict["delivers"] and verdict["fate"] == "would defer", verdict
        assert verdict["effective"] == "dane" and "dane_failed" in verdict["how"], verdict
        assert "in clear" not in verdict["how"]
    no_mail(dane_lab.sinks["danemismatch.test"])
    code = cli.main(
        ["check", "danemismatch.test", "--config", str(dane_lab.config("trust_resolver"))]
    )
    out = capsys.readouterr().out
    assert code == 1 and "DANE: applies; MX records validated" in out
    assert "certificate against TLSA: no usable TLSA record matched" in out
    assert "opportunistic (raised to dane): would defer" in out and "not supported" not in out


def test_without_dnssec_dane_is_not_applied(
    dane_lab: DaneLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """``delivery.dnssec: none``: the same "secure" answers, not believed — no DANE, so the
    self-signed certificate cannot meet the rules' verified and the mismatching record harms
    nothing."""
    code, doc = dane_lab.check(capsys, "danematch.test", "none")
    assert code == 1 and doc["dane"]["applies"] is False
    assert "delivery.dnssec is none" in doc["dane"]["why"] and doc["dane"]["mx_secure"] is None
    assert doc["hosts"][0]["tlsa"] is None
    verdicts = {v["mode"]: v for v in doc["verdicts"]}
    assert {v["effective"] for v in verdicts.values()} == {"opportunistic", "enforced", "verified"}
    assert verdicts["opportunistic"]["delivers"] and verdicts["enforced"]["delivers"]
    assert "self-signed" in verdicts["verified"]["how"] and not verdicts["verified"]["delivers"]
    code, mismatch = dane_lab.check(capsys, "danemismatch.test", "none")
    assert code == 0 and mismatch["verdicts"][0]["delivers"]
    for sink in dane_lab.sinks.values():
        no_mail(sink)
