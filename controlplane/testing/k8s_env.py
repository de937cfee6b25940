"""A real Kubernetes API server for tests: etcd and kube-apiserver on 127.0.0.1.

The equivalent of controller-runtime's envtest. :class:`KubeEnv` starts etcd (random loopback
ports, ``--unsafe-no-fsync``) and then kube-apiserver with secure serving on a random port, a
CA and serving certificate generated for the run (with subject and authority key identifiers,
so that strict X.509 verification accepts them), client-certificate authentication (an admin
in ``system:masters``), RBAC authorization, a service-account signing key and issuer, and a
service cluster IP range. It writes a kubeconfig for the admin and offers the helpers tests
need: :meth:`KubeEnv.api_client`, :meth:`KubeEnv.create_namespace`,
:meth:`KubeEnv.install_crds` and :meth:`KubeEnv.service_account_token`; and for fault tests
:meth:`KubeEnv.restart_apiserver` (same port, same etcd) and :meth:`KubeEnv.compact_etcd`
(through etcd's HTTP/JSON gateway, so that old resourceVersions answer 410 Gone).

There is no controller-manager: namespaces are not finalized after deletion, no
``default`` service account appears by itself, and the admission plugins that depend on
controllers (``ServiceAccount``) are disabled, as envtest does.

The binaries come from :func:`build_binaries` (Go wrapper modules under ``tests/peers``,
built once into a cache outside the repository). Every process runs in its own process group
and is killed by :meth:`KubeEnv.stop` (also when start-up fails, and at interpreter exit as a
last resort); logs go to files in the environment's directory and their tail is part of the
error when start-up fails. Every wait is bounded. Needs the ``k8s`` extra
(``kubernetes-asyncio``) and ``cryptography``.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from .gobuild import KUBERNETES_VERSION, build_peer, cache_root

__all__ = [
    "HOST",
    "KUBERNETES_VERSION",
    "KubeEnv",
    "KubeEnvError",
    "build_binaries",
]

HOST = "127.0.0.1"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "controlplane-test-admin"


class KubeEnvError(RuntimeError):
    """The test API server could not be started (the message carries the logs' tail)."""


def build_binaries() -> tuple[Path, Path]:
    """``(etcd, kube-apiserver)``, built from their pinned Go modules on first use.

    Raises :class:`~controlplane.testing.gobuild.GoMissingError` without Go.
    """
    return build_peer("etcd"), build_peer("kube-apiserver")


# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: x509.Name,
    *,
    issuer: _Issued | None = None,
    ca: bool = False,
    usages: Sequence[x509.ObjectIdentifier] = (),
    sans: Sequence[x509.GeneralName] = (),
) -> _Issued:
    """A certificate for a fresh P-256 key, signed by ``issuer`` (self-signed without one),
    with the extensions strict verifiers require (key identifiers, critical constraints)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), False
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), False)
    return _Issued(builder.sign(signer_key, hashes.SHA256()), key)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


# -- processes -------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"--- {path.name}: (no log)\n"
    return f"--- {path.name} (last {lines} lines):\n" + "\n".join(text.splitlines()[-lines:])


_log = logging.getLogger("controlplane.testing.k8s_env")

_LIVE_GROUPS: set[int] = set()
"""Process groups started and not yet reaped: killed at interpreter exit as a last resort."""


@atexit.register
def _kill_leftovers() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _running_record(pgid).unlink(missing_ok=True)


def _running_dir() -> Path:
    """Where each running test peer is recorded as ``<owner pid>.<its pid>`` (its command
    line inside): a process killed with SIGKILL runs no ``atexit``, so the next environment
    started on this machine reaps what it left."""
    return cache_root() / "running"


def _running_record(pid: int) -> Path:
    return _running_dir() / f"{os.getpid()}.{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans() -> list[int]:
    """Kill the test peers whose owning process is gone; return their pids.

    A peer is killed only if its command line is still the one recorded when it started
    (a pid the kernel has reused for something else is left alone).
    """
    reaped: list[int] = []
    directory = _running_dir()
    if not directory.is_dir():
        return reaped
    for record in directory.iterdir():
        owner, _, pid_text = record.name.partition(".")
        if not (owner.isdigit() and pid_text.isdigit()) or _alive(int(owner)):
            continue
        pid = int(pid_text)
        with contextlib.suppress(OSError):
            recorded = record.read_bytes()
            if recorded and Path(f"/proc/{pid}/cmdline").read_bytes() == recorded:
                os.killpg(pid, signal.SIGKILL)
                reaped.append(pid)
        record.unlink(missing_ok=True)
    return reaped


class _Process:
    """One child in a process group of its own, its output appended to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE_GROUPS.add(self.popen.pid)
        with contextlib.suppress(OSError):
            _running_dir().mkdir(parents=True, exist_ok=True)
            _running_record(self.popen.pid).write_bytes(
                b"\0".join(os.fsencode(a) for a in argv) + b"\0"
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds, and reap the child."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + wait
            while self.popen.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if self.popen.poll() is not None:
                break
        # the leader is gone; anything left in its group goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        _LIVE_GROUPS.discard(self.pid)
        _running_record(self.pid).unlink(missing_ok=True)


# -- the environment -------------------------------------------------------------------------


class KubeEnv:
    """etcd + kube-apiserver on 127.0.0.1 for one test session.

    ``async with KubeEnv() as env:`` starts both (building the binaries on first use unless
    ``etcd``/``kube_apiserver`` are given) and stops them at the end, whatever happens.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        etcd: Path | None = None,
        kube_apiserver: Path | None = None,
        start_timeout: float = 120.0,
        extra_apiserver_args: Sequence[str] = (),
    ) -> None:
        self._given_directory = directory
        self._etcd_binary = etcd
        self._apiserver_binary = kube_apiserver
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.directory = Path()
        self.port = 0
        self.etcd_url = ""
        self._processes: list[_Process] = []
        self.started_pids: list[int] = []
        """Every process id this environment started (for checks that they are gone)."""
        self._owns_directory = False
        self._started = False
        self._installed_crds: dict[str, Mapping[str, Any]] = {}

    # lifecycle --------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The API server's URL."""
        return f"https://{HOST}:{self.port}"

    @property
    def kubeconfig_path(self) -> Path:
        """A kubeconfig for the admin user (client certificate, group ``system:masters``)."""
        return self.directory / "kubeconfig"

    @property
    def ca_path(self) -> Path:
        return self.directory / "pki" / "ca.crt"

    @property
    def pids(self) -> list[int]:
        """The process ids of the running children (etcd, kube-apiserver)."""
        return [p.pid for p in self._processes]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start etcd, then kube-apiserver; return once ``/readyz`` answers ``ok``.

        Raises :class:`KubeEnvError` (with the logs' tail) when either does not come up
        within ``start_timeout``; nothing is left running then.
        """
        if self._started:
            raise RuntimeError("KubeEnv already started")
        for pid in reap_orphans():
            _log.warning("killed test peer %d: the process that started it is gone", pid)
        if self._etcd_binary is None or self._apiserver_binary is None:
            etcd, apiserver = await asyncio.to_thread(build_binaries)
            self._etcd_binary = self._etcd_binary or etcd
            self._apiserver_binary = self._apiserver_binary or apiserver
        if self._given_directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="controlplane-kube-env-"))
            self._owns_directory = True
        else:
            self.directory = self._given_directory
            self.directory.mkdir(parents=True, exist_ok=True)
        self._started = True
        try:
            self._write_pki()
            deadline = time.monotonic() + self.start_timeout
            for attempt in range(3):  # a port picked at random may be taken meanwhile
                try:
                    await self._start_processes(deadline)
                    break
                except _PortTakenError:
                    await self._stop_processes()
                    if attempt == 2:
                        raise KubeEnvError("no free ports after 3 attempts") from None
            self._write_kubeconfig()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop kube-apiserver, then etcd (SIGTERM, then SIGKILL), and remove the directory
        this environment created."""
        await self._stop_processes()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_directory = False
        self._started = False

    async def _stop_processes(self) -> None:
        try:
            for process in reversed(self._processes):
                await process.stop()
        finally:
            for process in self._processes:  # cancelled midway: no group left behind
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                if process.popen.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.popen.wait(5.0)
                _LIVE_GROUPS.discard(process.pid)
            self._processes.clear()

    async def restart_apiserver(
        self, *, kill: bool = False, grace: float = 3.0, within: float | None = None
    ) -> None:
        """Stop kube-apiserver (SIGTERM, SIGKILL after ``grace`` seconds; SIGKILL at once with
        ``kill``) and start it again on the same port with the same arguments and etcd (the
        data survives); return once ``/readyz`` answers ``ok`` and every CRD installed through
        :meth:`install_crds` lists again (:class:`KubeEnvError` after ``within`` seconds, by
        default ``start_timeout``). Open watches end; clients see connection errors meanwhile.

        On SIGTERM, kube-apiserver v1.36.3 closes its listener and its watches at once, but
        its process lingers for more than ten seconds: ``grace`` bounds that wait.
        """
        apiserver = next((p for p in self._processes if p.name == "kube-apiserver"), None)
        if apiserver is None:
            raise RuntimeError("KubeEnv is not running")
        await apiserver.stop(grace=0.0 if kill else grace)
        self._processes.remove(apiserver)
        deadline = time.monotonic() + (self.start_timeout if within is None else within)
        await self._start_apiserver(deadline)
        # /readyz says ok before the custom resources' paths are back (503 "the request has
        # been made before all known HTTP paths have been installed"): wait for them too
        if self._installed_crds:
            async with self.api_client() as api:
                extensions = k8s.ApiextensionsV1Api(api)
                for crd in self._installed_crds.values():
                    await self._wait_crd_served(extensions, crd, deadline)

    async def etcd_request(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A request to etcd's HTTP/JSON gateway (``/v3/kv/range``, ``/v3/kv/compaction``,
        ...): keys and values in the body are base64, integers are strings."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as session,
            session.post(self.etcd_url + path, json=dict(body)) as response,
        ):
            answer = await response.json(content_type=None)
            if response.status != 200:
                raise KubeEnvError(f"etcd {path}: HTTP {response.status}: {answer}")
            return dict(answer)

    async def etcd_revision(self) -> int:
        """etcd's current revision (the newest resourceVersion of the API server)."""
        answer = await self.etcd_request(
            "/v3/kv/range", {"key": base64.b64encode(b"/").decode(), "limit": "1"}
        )
        return int(answer["header"]["revision"])

    async def compact_etcd(self, revision: int | None = None) -> int:
        """Compact etcd's history up to ``revision`` (default: the current one), as the API
        server does every five minutes: watches and continue tokens from older
        resourceVersions then fail with 410 Gone (where the watch cache does not serve them).
        Returns the revision compacted at."""
        if revision is None:
            revision = await self.etcd_revision()
        await self.etcd_request("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def logs_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each process's log."""
        return "\n".join(_tail(p.log, lines) for p in self._processes)

    # start-up ---------------------------------------------------------------------------

    def _write_pki(self) -> None:
        pki = self.directory / "pki"
        pki.mkdir(exist_ok=True)
        ca = _issue(_name("controlplane-test-ca"), ca=True)
        serving = _issue(
            _name("kube-apiserver"),
            issuer=ca,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=[
                x509.IPAddress(ipaddress.ip_address(HOST)),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1")),  # the kubernetes Service
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"),
                x509.DNSName("kubernetes.default.svc.cluster.local"),
            ],
        )
        admin = _issue(
            _name(ADMIN_USER, "system:masters"),
            issuer=ca,
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        signing = ec.generate_private_key(ec.SECP256R1())
        files = {
            "ca.crt": ca.cert_pem(),
            "ca.key": ca.key_pem(),
            "serving.crt": serving.cert_pem(),
            "serving.key": serving.key_pem(),
            "admin.crt": admin.cert_pem(),
            "admin.key": admin.key_pem(),
            "sa.key": _key_pem(signing),
            "sa.pub": signing.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        for name, data in files.items():
            path = pki / name
            path.write_bytes(data)
            path.chmod(0o600)

    async def _start_processes(self, deadline: float) -> None:
        assert self._etcd_binary is not None and self._apiserver_binary is not None
        client_port, peer_port, self.port = _free_ports(3)
        self.etcd_url = f"http://{HOST}:{client_port}"
        peer_url = f"http://{HOST}:{peer_port}"
        data = self.directory / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        etcd = _Process(
            "etcd",
            [
                str(self._etcd_binary),
                "--name=kube-env",
                f"--data-dir={data}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kube-env={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            self.directory / "etcd.log",
        )
        self._processes.append(etcd)
        self.started_pids.append(etcd.pid)
        await self._wait_http(etcd, f"{self.etcd_url}/health", deadline)
        await self._start_apiserver(deadline)

    async def _start_apiserver(self, deadline: float) -> None:
        assert self._apiserver_binary is not None
        pki = self.directory / "pki"
        apiserver = _Process(
            "kube-apiserver",
            [
                str(self._apiserver_binary),
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={HOST}",
                f"--advertise-address={HOST}",
                f"--secure-port={self.port}",
                f"--cert-dir={self.directory / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'serving.crt'}",
                f"--tls-private-key-file={pki / 'serving.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--profiling=false",
                "--endpoint-reconciler-type=none",  # 127.0.0.1 is no valid Endpoints address
                *self.extra_apiserver_args,
            ],
            self.directory / "kube-apiserver.log",
        )
        self._processes.append(apiserver)
        self.started_pids.append(apiserver.pid)
        await self._wait_http(apiserver, f"{self.server}/readyz", deadline)

    async def _wait_http(self, process: _Process, url: str, deadline: float) -> None:
        """Poll ``url`` until it answers 200, the process exits or the deadline passes."""
        last = "no answer yet"
        ssl_context = self._ssl_context() if url.startswith("https") else None
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if (code := process.exited()) is not None:
                    log = process.log.read_text(errors="replace")
                    if "address already in use" in log:
                        raise _PortTakenError
                    raise KubeEnvError(
                        f"{process.name} exited with {code} during start-up\n{self.logs_tail()}"
                    )
                try:
                    async with session.get(url, ssl=ssl_context or False) as response:
                        body = await response.text()
                        if response.status == 200:
                            return
                        last = f"HTTP {response.status}: {body[-500:]}"
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise KubeEnvError(
                        f"{process.name} not ready at {url} within {self.start_timeout:.0f} s "
                        f"(last: {last})\n{self.logs_tail()}"
                    )
                await asyncio.sleep(0.1)

    def _write_kubeconfig(self) -> None:
        pki = self.directory / "pki"

        def b64(name: str) -> str:
            return base64.b64encode((pki / name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kube-env",
                    "cluster": {"server": self.server, "certificate-authority-data": b64("ca.crt")},
                }
            ],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {
                        "client-certificate-data": b64("admin.crt"),
                        "client-key-data": b64("admin.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "kube-env", "context": {"cluster": "kube-env", "user": ADMIN_USER}}
            ],
            "current-context": "kube-env",
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig_path.chmod(0o600)

    # clients ----------------------------------------------------------------------------

    def _ssl_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if hasattr(ssl, "VERIFY_X509_STRICT"):
            context.verify_flags |= ssl.VERIFY_X509_STRICT  # as Python 3.13 does by default
        if client_cert:
            pki = self.directory / "pki"
            context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return context

    def configuration(self, token: str | None = None) -> Any:
        """A ``kubernetes_asyncio`` Configuration: the admin, or the bearer ``token``."""
        configuration = k8s.Configuration(host=self.server)
        configuration.ssl_ca_cert = str(self.ca_path)
        if token is None:
            configuration.cert_file = str(self.directory / "pki" / "admin.crt")
            configuration.key_file = str(self.directory / "pki" / "admin.key")
        else:
            configuration.api_key = {"BearerToken": token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return configuration

    def api_client(self, token: str | None = None) -> Any:
        """A ``kubernetes_asyncio`` ApiClient as the admin (or with a bearer ``token``).

        Create it inside a running event loop and close it: ``async with env.api_client() as
        api:`` (it owns an aiohttp session).
        """
        return k8s.ApiClient(configuration=self.configuration(token))

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> tuple[int, Any]:
        """A raw request to the API server as the admin (or with the bearer ``token``):
        ``(status, decoded JSON body or text)``. Patches need their ``content_type``
        (``application/merge-patch+json``, ...)."""
        headers = {"Accept": accept}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        context = self._ssl_context(client_cert=token is None)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as session,
            session.request(
                method, self.server + path, data=data, headers=headers, ssl=context
            ) as response,
        ):
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def create_namespace(self, prefix: str = "test") -> str:
        """A new namespace named ``<prefix>-<random>``."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        async with self.api_client() as api:
            await k8s.CoreV1Api(api).create_namespace(
                k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name))
            )
        return name

    async def delete_namespace(self, name: str) -> None:
        """Delete a namespace (without a controller-manager it stays ``Terminating``, but
        nothing can be created in it any more)."""
        async with self.api_client() as api:
            with contextlib.suppress(ApiException):
                await k8s.CoreV1Api(api).delete_namespace(name)

    async def install_crds(
        self, manifests: Iterable[Path | Mapping[str, Any]], *, within: float = 30.0
    ) -> list[str]:
        """Create (or replace) CustomResourceDefinitions from YAML files or dicts and wait
        until each is Established, served by discovery and listable (a new resource's watch
        cache answers 429 "storage is (re)initializing" for a moment). Returns the names."""
        documents: list[dict[str, Any]] = []
        for manifest in manifests:
            if isinstance(manifest, Path):
                documents.extend(d for d in yaml.safe_load_all(manifest.read_text()) if d)
            else:
                documents.append(dict(manifest))
        names = []
        async with self.api_client() as api:
            extensions = k8s.ApiextensionsV1Api(api)
            for document in documents:
                name = document["metadata"]["name"]
                names.append(name)
                try:
                    await extensions.create_custom_resource_definition(document)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    current = await extensions.read_custom_resource_definition(name)
                    replacement = json.loads(json.dumps(document))
                    replacement["metadata"]["resourceVersion"] = current.metadata.resource_version
                    await extensions.replace_custom_resource_definition(name, replacement)
            deadline = time.monotonic() + within
            for document in documents:
                await self._wait_crd_served(extensions, document, deadline)
                self._installed_crds[document["metadata"]["name"]] = document
        return names

    async def _wait_crd_served(
        self, extensions: Any, crd: Mapping[str, Any], deadline: float
    ) -> None:
        name = crd["metadata"]["name"]
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        versions = [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]
        while True:
            current = await extensions.read_custom_resource_definition(name)
            conditions = {c.type: c.status for c in (current.status.conditions or [])}
            if conditions.get("Established") == "True":
                served = True
                for version in versions:
                    status, body = await self.request("GET", f"/apis/{group}/{version}")
                    resources = body.get("resources", []) if isinstance(body, dict) else []
                    if status != 200 or not any(r.get("name") == plural for r in resources):
                        served = False
                if served:  # and listable: a new CRD's watch cache answers 429 at first
                    status, _ = await self.request("GET", f"/apis/{group}/{versions[0]}/{plural}")
                    if status == 200:
                        return
            if time.monotonic() >= deadline:
                raise KubeEnvError(f"CRD {name} not served by discovery in time: {conditions}")
            await asyncio.sleep(0.05)

    async def service_account_token(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> str:
        """A bearer token for the service account ``namespace/name`` (created if missing)
        from the TokenRequest API."""
        async with self.api_client() as api:
            core = k8s.CoreV1Api(api)
            try:
                await core.create_namespaced_service_account(
                    namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise
            request = k8s.AuthenticationV1TokenRequest(
                spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            )
            answer = await core.create_namespaced_service_account_token(name, namespace, request)
            return str(answer.status.token)


class _PortTakenError(Exception):
    """A randomly picked port was taken before the process bound it: try other ports."""
