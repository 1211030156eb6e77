"""Run a built image with runc (no kubelet): unpack it into an OCI bundle and start it detached, in the
host's network namespace, as the image's user with a read-only root filesystem and no capabilities."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import oci


class RuncError(RuntimeError):
    """runc is missing or the container could not start."""


@dataclass
class Container:
    id: str
    bundle: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        proc = subprocess.run(["runc", "state", self.id], capture_output=True, text=True)
        return proc.returncode == 0 and json.loads(proc.stdout).get("status") == "running"


def unpack(ref: str, platform: str, dest: Path) -> dict:
    """The image's flattened root filesystem in dest/rootfs; returns its config (Env, Entrypoint, User)."""
    rootfs = dest / "rootfs"
    if not rootfs.exists():
        tmp = dest / "rootfs.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        crane = oci.components.binary_path("crane")
        cmd = f"{crane} export --insecure --platform {platform} {ref} - | tar -x -C {tmp}"
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)
        tmp.rename(rootfs)
    config = json.loads(oci.crane("config", "--platform", platform, ref))
    return config["config"]


def _spec(config: dict, args: list[str], mounts: list[tuple[str, str]], env: dict[str, str],
          writable: list[tuple[str, str]], rootfs: Path) -> dict:
    uid, _, gid = config.get("User", "0:0").partition(":")
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": int(uid), "gid": int(gid or uid)},
            "args": list(config.get("Entrypoint") or []) + args,
            "env": list(config.get("Env") or []) + [f"{k}={v}" for k, v in env.items()],
            "cwd": config.get("WorkingDir") or "/", "noNewPrivileges": True,
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "edgefleet",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf",
             "options": ["rbind", "ro"]},
            *({"destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro"]} for src, dst in mounts),
            *({"destination": dst, "type": "bind", "source": src, "options": ["rbind", "rw"]} for src, dst in writable),
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                  "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                  "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
    }


@contextlib.contextmanager
def run(ref: str, args: list[str], work: Path, platform: str = "linux/amd64",
        mounts: Sequence[tuple[str, str]] = (), env: dict[str, str] | None = None,
        writable: Sequence[tuple[str, str]] = (), entrypoint: list[str] | None = None) -> Iterator[Container]:
    """Start the image detached (host network); kill and delete it on exit."""
    if shutil.which("runc") is None:
        raise RuncError("runc is not on PATH: install it (Debian: apt-get install runc)")
    digest = ref.rsplit("@", 1)[-1].replace(":", "-")
    image_dir = work / "images" / digest
    config = unpack(ref, platform, image_dir)
    if entrypoint is not None:
        config = {**config, "Entrypoint": entrypoint}
    cid = f"edgefleet-{uuid.uuid4().hex[:10]}"
    bundle = work / "bundles" / cid
    bundle.mkdir(parents=True)
    spec = _spec(config, args, list(mounts), env or {}, list(writable), image_dir / "rootfs")
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    log = bundle / "output.log"
    with log.open("wb") as fh:
        proc = subprocess.run(["runc", "run", "-d", "--bundle", str(bundle), cid], stdin=subprocess.DEVNULL,
                              stdout=fh, stderr=fh)
    container = Container(cid, bundle, log)
    try:
        if proc.returncode != 0:
            raise RuncError(f"runc could not start {ref}: {container.output()[-800:]}")
        yield container
    finally:
        subprocess.run(["runc", "kill", cid, "KILL"], capture_output=True)
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)
