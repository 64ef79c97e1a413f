"""A real control plane for the real-API tests: etcd and kube-apiserver as scripts/setup-kube
built them (their folder in $OVERLAY_VICI_KUBE_BIN), started on 127.0.0.1 with a generated
CA, a service-account signing key and the RBAC authorizer, and kubectl from the test
extras. Skipped, with the reason, where the binaries could not be built.

No kube-controller-manager runs: no pods, no garbage collection, no namespace deletion."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
NS = "overlay-vici"
MANIFEST = ROOT / "deploy" / "overlay-vici.yaml"
KUBECTL = Path(sys.executable).with_name("kubectl")
OVERLAY_VICI = Path(sys.executable).with_name("overlay-vici")
START_TIMEOUT = 90.0
TEST_NODE_LABEL = "overlay-vici.test/node"


def until(what: str, probe: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Pki:
    """PEM files of a throw-away CA, the API server's serving pair, an admin client
    (group system:masters) and the service-account signing pair."""

    dir: Path
    ca: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ca = self.dir / "ca.crt"
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "overlay-vici-test-ca")])
        ca_cert = self._sign(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True)
        self._write("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        for stem, subject, server in (
            ("apiserver", self._name("kube-apiserver"), True),
            ("admin", self._name("admin", "system:masters"), False),
        ):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._sign(subject, key.public_key(), ca_name, ca_key, server=server)
            self._write(f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
            self._write(f"{stem}.key", _private_pem(key))
        signer = ec.generate_private_key(ec.SECP256R1())
        self._write("sa.key", _private_pem(signer))
        self._write(
            "sa.pub",
            signer.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def path(self, name: str) -> Path:
        return self.dir / name

    @staticmethod
    def _name(common: str, org: str | None = None) -> x509.Name:
        parts = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
        if org:
            parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(parts)

    @staticmethod
    def _sign(
        subject: x509.Name,
        public_key: Any,
        issuer: x509.Name,
        issuer_key: ec.EllipticCurvePrivateKey,
        ca: bool = False,
        server: bool = False,
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            usage = (
                x509.ExtendedKeyUsageOID.SERVER_AUTH
                if server
                else (x509.ExtendedKeyUsageOID.CLIENT_AUTH)
            )
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> None:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Daemon:
    """One control-plane process, its output in a log file."""

    name: str
    argv: list[str]
    workdir: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.start()

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir
            )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class ControlPlane:
    """The running API server and how to reach it: as admin, or as a ServiceAccount."""

    server: str
    pki: Pki
    admin: Path
    workdir: Path
    daemons: list[Daemon]

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(kubeconfig or self.admin), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def get(self, *args: str) -> dict[str, Any] | None:
        """`kubectl get ... -o json` as admin; None if it does not exist."""
        result = self.kubectl("get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            pytest.fail(f"kubectl get {' '.join(args)} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def token(self, account: str) -> Path:
        """A TokenRequest token for the ServiceAccount, in a file (as a projected volume)."""
        token = self.kubectl("-n", NS, "create", "token", account, "--duration", "2h").stdout
        path = self.workdir / f"{account}.token"
        path.write_text(token.strip())
        return path

    def kubeconfig_for(self, account: str) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount with its token."""
        token = self.token(account).read_text()
        path = self.workdir / f"{account}.kubeconfig"
        path.write_text(json.dumps(_kubeconfig(self.server, self.pki.ca, {"token": token})))
        return path

    def alive(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is not None:
                pytest.fail(f"{daemon.name} exited ({daemon.process.returncode}):\n{daemon.tail()}")

    def wait_ready(self) -> float:
        """Seconds until /readyz answers 200; fail with the API server's log after a while."""
        started = time.monotonic()
        while not _ready(self.server, self.pki):
            self.alive()
            if time.monotonic() > started + START_TIMEOUT:
                pytest.fail(
                    f"kube-apiserver not ready in {START_TIMEOUT:.0f} s:\n{self.daemons[-1].tail()}"
                )
            time.sleep(0.5)
        return time.monotonic() - started

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same etcd: every watch breaks, and
        its new watch cache holds no history from before."""
        apiserver = self.daemons[-1]
        apiserver.stop()
        apiserver.start()
        self.wait_ready()


def _kubeconfig(server: str, ca: Path, user: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }


def _ready(server: str, pki: Pki) -> bool:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.path("admin.crt"), pki.path("admin.key"))
    try:
        with urllib.request.urlopen(f"{server}/readyz", context=context, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def binaries() -> Path:
    """The folder of kube-apiserver and etcd: $OVERLAY_VICI_KUBE_BIN (scripts/test builds
    them first, so that the build's output shows), else what scripts/setup-kube builds or
    finds cached now; skip, with its reason, if it cannot."""
    if not KUBECTL.is_file():
        pytest.skip("no kubectl in the venv: run scripts/setup (test extras)")
    folder = os.environ.get("OVERLAY_VICI_KUBE_BIN")
    if not folder:
        built = subprocess.run(
            [str(ROOT / "scripts" / "setup-kube")], capture_output=True, text=True, check=False
        )
        if built.returncode != 0:
            pytest.skip(
                built.stderr.strip().splitlines()[-1]
                if built.stderr.strip()
                else (f"scripts/setup-kube failed ({built.returncode})")
            )
        folder = built.stdout.strip()
    for name in ("kube-apiserver", "etcd"):
        if not (Path(folder) / name).is_file():
            pytest.skip(f"no {name} in {folder}: run scripts/setup-kube")
    return Path(folder)


@contextmanager
def running(binaries: Path, workdir: Path) -> Iterator[ControlPlane]:
    """etcd and kube-apiserver from `binaries`, their files in `workdir`, until the block ends."""
    pki = Pki(workdir)
    client, peer, secure = free_port(), free_port(), free_port()
    etcd = Daemon(
        "etcd",
        [
            str(binaries / "etcd"),
            "--name=test",
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=test=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        workdir,
    )
    apiserver = Daemon(
        "kube-apiserver",
        [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={secure}",
            f"--cert-dir={workdir / 'certs'}",
            f"--tls-cert-file={pki.path('apiserver.crt')}",
            f"--tls-private-key-file={pki.path('apiserver.key')}",
            f"--client-ca-file={pki.ca}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.path('sa.pub')}",
            f"--service-account-signing-key-file={pki.path('sa.key')}",
            "--authorization-mode=RBAC",
            # Configuration only: the Service IP range the "kubernetes" Service takes from.
            "--service-cluster-ip-range=10.96.0.0/24",
        ],
        workdir,
    )
    server = f"https://127.0.0.1:{secure}"
    admin = workdir / "admin.kubeconfig"
    admin.write_text(
        json.dumps(
            _kubeconfig(
                server,
                pki.ca,
                {
                    "client-certificate": str(pki.path("admin.crt")),
                    "client-key": str(pki.path("admin.key")),
                },
            )
        )
    )
    plane = ControlPlane(server, pki, admin, workdir, [etcd, apiserver])
    try:
        print(f"control plane ready in {plane.wait_ready():.1f} s", file=sys.stderr)
        yield plane
    finally:
        for daemon in reversed(plane.daemons):
            daemon.stop()
        shutil.rmtree(workdir / "etcd", ignore_errors=True)
