"""Build the repository's Dockerfile with podman and run the image's ENTRYPOINT from its filesystem.

No container engine runs on the development machines or CI (no cgroup control, so `podman run` fails),
but podman builds images (`--isolation chroot`) and mounts them. `RootfsProcess` starts what
`docker run IMAGE ARGS...` would: the image's ENTRYPOINT + ARGS, its ENV, USER and WORKDIR, with the
root directory switched to a writable container filesystem of the image (`podman create` +
`podman mount`). It runs in a private mount namespace (`unshare --mount`) that gets /proc, /dev and
/sys, and shares the host's network, so the server answers on 127.0.0.1. Needs root.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_SCRIPT = os.path.join(REPO, "tests", "deploy", "make_base_image.sh")
DEFAULT_BASE_TAG = "localhost/jaxllm-test-base:bookworm"


def missing_tools() -> list[str]:
    """What this machine lacks to build and run the image (empty when all is there)."""
    missing = [tool for tool in ("podman", "debootstrap", "unshare", "chroot") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (podman mount, chroot)")
    return missing


def _run(argv: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited with {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def ensure_base_image(tag: str = DEFAULT_BASE_TAG, timeout: float = 1200) -> str:
    _run(["bash", BASE_SCRIPT, tag], timeout)
    return tag


def build_image(tag: str, base_image: str, *, extras: str = "", log_path: Optional[str] = None,
                timeout: float = 3600) -> float:
    """`podman build` of the repository's Dockerfile; returns the seconds it took.

    `--format docker` keeps HEALTHCHECK (the OCI image format has no field for it).
    """
    argv = ["podman", "build", "--isolation", "chroot", "--format", "docker", "--build-arg",
            f"BASE_IMAGE={base_image}", "--build-arg", f"JAXLLM_EXTRAS={extras}", "-t", tag, REPO]
    start = time.monotonic()
    result = _run(argv, timeout)
    if log_path:
        with open(log_path, "w") as f:
            f.write(result.stdout + result.stderr)
    return time.monotonic() - start


def image_config(tag: str) -> dict:
    """The image's run configuration (Entrypoint, Cmd, Env, User, WorkingDir, Healthcheck, ...)."""
    [info] = json.loads(_run(["podman", "image", "inspect", tag], 60).stdout)
    config = dict(info["Config"])
    # podman reports a docker-format image's HEALTHCHECK beside Config rather than inside it.
    if "Healthcheck" not in config and info.get("Healthcheck"):
        config["Healthcheck"] = info["Healthcheck"]
    return config


def _passwd_ids(root: str, user: str) -> tuple[int, int]:
    """uid:gid of USER (a name or uid[:gid]) from the image's own /etc/passwd."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    if name.isdigit():
        return int(name), int(group) if group.isdigit() else int(name)
    with open(os.path.join(root, "etc", "passwd")) as f:
        for line in f:
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3])
    raise RuntimeError(f"user {name!r} of the image is not in its /etc/passwd")


class RootfsProcess:
    """`docker run` of an image, approximated by a chroot into a writable container filesystem.

    Use as a context manager; `start(args)` runs ENTRYPOINT + args, `exec(argv)` runs another
    command (e.g. the HEALTHCHECK) in the same filesystem, as the same user, with the same env.
    """

    def __init__(self, tag: str):
        self.tag = tag
        self.config = image_config(tag)
        self.container: Optional[str] = None
        self.root: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "RootfsProcess":
        self.container = _run(["podman", "create", self.tag], 120).stdout.strip()
        self.root = _run(["podman", "mount", self.container], 120).stdout.strip()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.container:
            subprocess.run(["podman", "umount", self.container], capture_output=True, timeout=120)
            subprocess.run(["podman", "rm", "-f", self.container], capture_output=True, timeout=120)

    def _argv(self, command: Sequence[str], extra_env: dict) -> list[str]:
        """unshare -> mount /proc, /dev, /sys -> chroot as USER -> cd WORKDIR -> env -i IMAGE_ENV command."""
        uid, gid = _passwd_ids(self.root, self.config.get("User") or "")
        env = list(self.config.get("Env") or []) + [f"{k}={v}" for k, v in extra_env.items()]
        if not any(e.startswith("HOME=") for e in env):
            home = "/root" if uid == 0 else self._home(uid)
            env.append(f"HOME={home}")
        workdir = self.config.get("WorkingDir") or "/"
        setup = ('set -e; r="$1"; shift; mount -t proc proc "$r/proc"; mount --rbind /dev "$r/dev"; '
                 'mount --rbind /sys "$r/sys"; exec chroot --userspec="$UG" "$r" "$@"')
        inner = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', workdir, "/usr/bin/env", "-i", *env, *command]
        return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", setup, "sh", self.root, *inner], \
            {"UG": f"{uid}:{gid}"}

    def _home(self, uid: int) -> str:
        with open(os.path.join(self.root, "etc", "passwd")) as f:
            for line in f:
                fields = line.split(":")
                if fields[2] == str(uid):
                    return fields[5]
        return "/"

    def start(self, args: Sequence[str], log_path: str, extra_env: Optional[dict] = None) -> subprocess.Popen:
        entrypoint = list(self.config.get("Entrypoint") or [])
        argv, env = self._argv(entrypoint + list(args), extra_env or {})
        log = open(log_path, "w")
        # The exec chain (unshare, sh, chroot, sh, env) ends in the entrypoint itself, so this pid is
        # the server's and a signal sent to it reaches the server, as `docker stop` does.
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **env))
        log.close()
        return self.proc

    def exec(self, command: Sequence[str], timeout: float = 60,
             extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
        argv, env = self._argv(list(command), extra_env or {})
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **env))

    def stop(self, timeout: float = 60) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
