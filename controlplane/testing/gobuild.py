"""Test peers built from Go modules: etcd, Porcupine, the Kubernetes API server.

Each peer is a wrapper Go module in the repository (``tests/peers/<name>/`` or another
directory) whose ``go.mod`` and ``go.sum`` pin the real project. :func:`build_go` compiles
one package of it into a cache directory outside the repository,
``~/.cache/controlplane-test-peers/<name>-<hash>/`` (``$XDG_CACHE_HOME`` is honoured,
``CONTROLPLANE_TEST_PEERS_CACHE`` overrides the root), keyed by the hash of the module's
files, the package and the build flags, so only the first run on a machine pays the build.
It needs only ``go`` and the Go module proxy; concurrent builds of one peer wait on a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "GO_FALLBACKS",
    "KUBERNETES_VERSION",
    "PEERS_SOURCE",
    "GoMissingError",
    "build_go",
    "build_peer",
    "cache_root",
    "find_go",
]

PEERS_SOURCE = Path(__file__).resolve().parent.parent.parent / "tests" / "peers"
"""The wrapper modules of the test peers (in a source checkout)."""
GO_FALLBACKS = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go", "~/go/bin/go", "~/sdk/go/bin/go")
"""Where ``go`` is looked for when it is not on ``PATH`` (nor in ``$GOROOT/bin``)."""
BUILD_TIMEOUT = 2400.0
"""Seconds one build may take (the Kubernetes API server takes minutes on two cores)."""

KUBERNETES_VERSION = "v1.36.3"
"""The Kubernetes release pinned by ``tests/peers/kube-apiserver`` (its ``/version``)."""

_PEER_PACKAGES = {
    "etcd": "go.etcd.io/etcd/server/v3",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
}
"""The package built for each wrapper module under :data:`PEERS_SOURCE`."""


def _kubernetes_ldflags(version: str) -> list[str]:
    """The linker flags of Kubernetes' own build (hack/lib/version.sh), so that ``/version``
    answers the pinned release rather than ``v0.0.0-master``."""
    major, minor = version.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",  # fixed: the build stays reproducible
    }
    settings = [
        f"-X k8s.io/{package}.{key}={value}"
        for package in ("component-base/version", "client-go/pkg/version")
        for key, value in values.items()
    ]
    return ["-ldflags=" + " ".join(["-s", "-w", *settings])]


_PEER_FLAGS: dict[str, list[str]] = {"kube-apiserver": _kubernetes_ldflags(KUBERNETES_VERSION)}
"""Extra build flags per peer."""


class GoMissingError(RuntimeError):
    """No ``go`` command: a test peer cannot be built."""


def find_go() -> str:
    """The ``go`` command; :class:`GoMissingError` (with what to do) if there is none."""
    found = shutil.which("go")
    if found:
        return found
    candidates = [os.path.expanduser(p) for p in GO_FALLBACKS]
    if os.environ.get("GOROOT"):
        candidates.insert(0, os.path.join(os.environ["GOROOT"], "bin", "go"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise GoMissingError(
        "the Go toolchain ('go') was not found on PATH, in $GOROOT/bin or in "
        f"{', '.join(GO_FALLBACKS)}: it builds the test peers (install Go; the build fetches "
        "the pinned modules through the Go module proxy)"
    )


def cache_root() -> Path:
    """Where test peers built from Go modules are cached."""
    if override := os.environ.get("CONTROLPLANE_TEST_PEERS_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "controlplane-test-peers"


def _source_hash(source: Path, package: str, flags: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join([package, *flags]).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_go(
    source: Path,
    name: str,
    *,
    package: str = ".",
    flags: Sequence[str] = (),
    timeout: float = BUILD_TIMEOUT,
) -> Path:
    """The binary ``name`` built from ``package`` of the Go module in ``source``; built first
    (with CGO off, ``-trimpath`` and ``flags``) if the cache does not hold it yet.

    Raises :class:`GoMissingError` without Go, ``RuntimeError`` (with Go's output) when the
    build fails.
    """
    directory = cache_root() / f"{name}-{_source_hash(source, package, flags)}"
    binary = directory / name
    if binary.is_file():
        return binary
    go = find_go()
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory / ".lock"):
        if binary.is_file():  # built by someone else meanwhile
            return binary
        env = {
            **os.environ,
            "GOFLAGS": "-mod=readonly",  # the committed go.sum is the pin
            "CGO_ENABLED": "0",
            "GOWORK": "off",
            "GOTOOLCHAIN": "local",  # build with the installed Go; never fetch another
        }
        fd, partial = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
        os.close(fd)
        try:
            done = subprocess.run(
                [go, "build", "-trimpath", *flags, "-o", partial, package],
                cwd=source,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"building {name} failed ({go} build {package} in {source}, "
                    f"exit {done.returncode}):\n{done.stdout}{done.stderr}"
                )
            os.chmod(partial, 0o755)
            os.replace(partial, binary)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    return binary


def build_peer(name: str) -> Path:
    """A test peer of :data:`PEERS_SOURCE` by name (``"etcd"``, ``"kube-apiserver"``), built
    on first use."""
    try:
        package = _PEER_PACKAGES[name]
    except KeyError:
        raise ValueError(f"unknown test peer {name!r}; known: {sorted(_PEER_PACKAGES)}") from None
    return build_go(PEERS_SOURCE / name, name, package=package, flags=_PEER_FLAGS.get(name, ()))
