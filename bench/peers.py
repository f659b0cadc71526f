"""The benchmark's real peers: Debian's Postfix (a private instance), smtp-sink, smtp-source.

Nothing here is Postwarden: these are the yardstick and the load. All of it runs on
loopback addresses with ports chosen per run, from a scratch directory.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SBIN = ("/usr/sbin", "/usr/lib/postfix/sbin", "/sbin")
DEBIAN_PACKAGES = ("postfix",)


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def ensure_postfix() -> None:
    """Install Debian's postfix (smtp-source, smtp-sink, the MTA) when missing."""
    if which("smtp-source") and which("smtp-sink") and which("postfix"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("bench: installing Debian's postfix (smtp-source, smtp-sink, the peer MTA)")
    for line in (
        "postfix postfix/main_mailer_type select No configuration",
        "postfix postfix/mailname string localhost",
    ):
        subprocess.run([*sudo, "debconf-set-selections"], input=line.encode(), check=True)
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )
    subprocess.run([*sudo, "postfix", "stop"], check=False, capture_output=True)


# ---------------------------------------------------------------------- smtp-sink


@dataclass
class SinkFarm:
    """One ``smtp-sink`` per address, all on one port.

    Completion is taken from the MTAs' own delivery records, not from smtp-sink's
    ``-c`` counters: those were seen counting 2182 messages for 2000 sent.
    """

    hosts: list[str]
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[Path] = field(default_factory=list)

    def start(self, scratch: Path) -> None:
        binary = which("smtp-sink")
        assert binary, "smtp-sink not installed"
        for host in self.hosts:
            log = scratch / f"sink-{host}.out"
            argv = [binary]
            if os.geteuid() == 0:
                argv += ["-u", "nobody"]
            # Backlog 1024: the MTAs open dozens of connections at once.
            argv += [f"{host}:{self.port}", "1024"]
            with log.open("wb") as fh:
                self.procs.append(subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT))
            self._logs.append(log)
        time.sleep(0.3)
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self._logs[0].read_text()[-500:]}")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


# ---------------------------------------------------------------------- Postfix


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
transport_maps = inline:{{ {transports} }}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {maillog}
maillog_file_prefixes = {root}
default_process_limit = 200
"""


@dataclass
class PrivatePostfix:
    """A Postfix instance of its own (config, queue, log) that relays to the sinks.

    Recipient domains are routed with a transport map to ``[sink]:port``: Postfix
    does no DNS lookups, which only favours it.
    """

    root: Path
    port: int
    routes: dict[str, str]  # domain -> "host:port"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        binary = which("postfix")
        assert binary
        return subprocess.run(
            [binary, "-c", str(self.config_dir), *args], capture_output=True, check=check
        )

    def setup(self) -> None:
        etc, queue, data = self.config_dir, self.root / "queue", self.root / "data"
        for d in (etc, queue, data):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postfix")
        transports = ", ".join(f"{dom}=smtp:[{hp.split(':')[0]}]:{hp.split(':')[1]}"
                               for dom, hp in self.routes.items())  # fmt: skip
        (etc / "main.cf").write_text(
            MAIN_CF.format(
                queue=queue, data=data, maillog=self.maillog, root=self.root, transports=transports
            )
        )
        master = Path("/etc/postfix/master.cf").read_text()
        lines = []
        for line in master.splitlines():
            fields = line.split()
            if len(fields) >= 8 and not line.startswith(("#", " ", "\t")):
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"  # no chroot: the private queue has no chroot files
                line = "  ".join(fields)
            lines.append(line)
        (etc / "master.cf").write_text("\n".join(lines) + "\n")
        self._postfix("set-permissions", check=False)
        self._postfix("check", check=False)

    def start(self) -> None:
        binary = which("postfix")
        assert binary
        # start-fg keeps the master as our child, so its CPU and its children's is ours
        # to measure.
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.config_dir), "start-fg"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError as exc:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"postfix exited: {self.maillog_text()[-2000:]}") from exc
                time.sleep(0.05)
        raise RuntimeError("postfix did not open its port")

    def maillog_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def stop(self) -> None:
        self._postfix("stop", check=False)
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def delivery_delays(self) -> list[float]:
        """Acceptance-to-delivery seconds of each delivered recipient (``delay=``)."""
        return [
            float(m.group(1))
            for m in re.finditer(r", delay=([\d.]+), [^\n]*status=sent", self.maillog_text())
        ]


# ---------------------------------------------------------------------- smtp-source


def smtp_source_argv(target: str, *, messages: int, size: int, sender: str, rcpt: str) -> list[str]:
    """One reused session sending ``messages`` of ``size`` bytes (``-s 1 -d``)."""
    binary = which("smtp-source")
    assert binary, "smtp-source not installed"
    return [
        binary, "-s", "1", "-d", "-m", str(messages), "-l", str(size),
        "-f", sender, "-t", rcpt, "-M", "load.bench.test", target,
    ]  # fmt: skip
