"""Debian packages for an image's root filesystem: locked by version and sha256, fetched with apt into the
cache (a private apt state per architecture, so the host's own apt configuration is never changed), and
unpacked with dpkg-deb. No maintainer scripts run: the images carry no shell or package manager."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DROP = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
        "usr/share/bug", "usr/share/bash-completion")
KEEP_DOC = "copyright"  # licences stay: usr/share/doc/<pkg>/copyright


class PackageError(RuntimeError):
    """A Debian package could not be locked, fetched or verified; the message names it."""


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str
    sha256: str

    def line(self) -> str:
        return f"{self.name}={self.version} {self.arch} sha256:{self.sha256}"

    @classmethod
    def parse(cls, line: str) -> Deb:
        spec, arch, digest = line.split()
        name, version = spec.split("=", 1)
        return cls(name, version, arch, digest.removeprefix("sha256:"))


class Apt:
    """apt-get/apt-cache with a private state directory for one Debian architecture."""

    def __init__(self, root: Path, arch: str):
        self.arch, self.root = arch, root / arch
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        status = self.root / "status"
        status.touch()
        self.opts = [
            "-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures={arch}",
            "-o", f"Dir::State={self.root}", "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::State::status={status}", "-o", f"Dir::Cache={self.root}",
            "-o", f"Dir::Cache::archives={self.root / 'archives'}", "-o", "Debug::NoLocking=1",
        ]

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run([tool, *self.opts, *args], capture_output=True, text=True, cwd=cwd)
        if proc.returncode != 0:
            raise PackageError(f"{tool} {' '.join(args)} failed ({self.arch}): {proc.stderr.strip()[-800:]}")
        return proc.stdout

    def update(self) -> None:
        if shutil.which("apt-get") is None:
            raise PackageError("apt-get is not on PATH: images are built from Debian packages (run on Debian/Ubuntu)")
        self._run("apt-get", "-q", "update")

    def candidate(self, name: str) -> Deb:
        """The version apt would install now, with the sha256 from the signed index."""
        out = self._run("apt-cache", "show", "--no-all-versions", name) if self._known(name) else ""
        fields = dict(
            line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" ")
        )
        if "Version" not in fields:
            raise PackageError(f"Debian package {name!r} ({self.arch}) is not in the configured archive")
        return Deb(name, fields["Version"], fields.get("Architecture", self.arch), fields["SHA256"])

    def _known(self, name: str) -> bool:
        proc = subprocess.run(["apt-cache", *self.opts, "policy", name], capture_output=True, text=True)
        return "Candidate:" in proc.stdout and "Candidate: (none)" not in proc.stdout

    def fetch(self, deb: Deb, into: Path) -> Path:
        """Download one locked package (once) and check its sha256."""
        into.mkdir(parents=True, exist_ok=True)
        path = into / f"{deb.name}_{deb.version.replace(':', '%3a')}_{deb.arch}.deb"
        if not path.exists():
            try:
                self._run("apt-get", "-q", "download", f"{deb.name}={deb.version}", cwd=into)
            except PackageError as err:
                raise PackageError(f"cannot fetch Debian package {deb.name}={deb.version} ({self.arch}): "
                                   f"{err}") from err
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != deb.sha256:
            path.unlink()
            raise PackageError(f"Debian package {deb.name}={deb.version}: sha256 {got} does not match the lock "
                               f"{deb.sha256}; run `edgefleet images lock` if the archive changed")
        return path


def unpack(debs: list[Path], rootfs: Path) -> list[dict]:
    """Unpack packages into rootfs; returns their control fields (for the dpkg status and the SBOM)."""
    status_dir = rootfs / "var/lib/dpkg/status.d"
    status_dir.mkdir(parents=True, exist_ok=True)
    packages = []
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(rootfs)], check=True)
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True).stdout
        fields = dict(line.split(": ", 1) for line in control.splitlines() if ": " in line and line[0] != " ")
        (status_dir / fields["Package"]).write_text(control.rstrip("\n") + "\nStatus: install ok installed\n")
        packages.append(fields)
    _trim(rootfs)
    return packages


def _trim(rootfs: Path) -> None:
    for rel in DROP:
        path = rootfs / rel
        if not path.exists():
            continue
        if rel == "usr/share/doc":
            for doc in path.rglob("*"):
                if doc.is_file() and doc.name != KEEP_DOC:
                    doc.unlink()
            continue
        shutil.rmtree(path)


def ca_bundle(rootfs: Path) -> None:
    """What ca-certificates' maintainer script would make: /etc/ssl/certs/ca-certificates.crt."""
    certs = sorted((rootfs / "usr/share/ca-certificates").rglob("*.crt"))
    bundle = rootfs / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_bytes(b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs))
