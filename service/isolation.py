"""OS isolation of the untrusted child that runs an uploaded model: a bubblewrap sandbox.

Why bubblewrap (``bwrap``, Debian package ``bubblewrap``) and not nsjail: it is packaged by every
major distribution (Flatpak's sandbox), needs no daemon, no configuration file and no root (it
uses unprivileged user namespaces), builds its mount tree from an empty tmpfs so that only what
is named is visible, and takes already-open directory descriptors (``--ro-bind-fd``), which lets
a root supervisor hand a child running as an unprivileged uid a view of paths that uid could not
even traverse (a Python under ``/root/.pyenv``). nsjail adds seccomp policies and cgroups but is
not packaged in Debian stable.

What the child sees (:func:`bwrap_argv`):

- new user, mount, PID, IPC, UTS and cgroup namespaces and an empty network namespace (only
  ``lo``, down): no network at all; ``--die-with-parent``, ``--new-session`` (no TIOCSTI onto the
  server's terminal), no further user namespaces inside;
- an unprivileged uid: 65534 inside. When the supervisor runs as root, the sandbox is entered as
  65534 (*nobody*) outside too, so even an escape from the namespaces lands on an account that
  owns nothing (:func:`outside_uid`); otherwise as the server's own uid, mapped to 65534 inside;
- read-only: the system's ``/usr``, ``/lib*``, ``/bin``, the dynamic-linker cache, the Python
  installation and the installed ``calibration``/``service`` packages; read-only ``/in`` with the
  job's verified input copies and nothing else of the data dir: either the files one by one, or
  (``SandboxView.inputs_dir``, what the supervisor uses) the run's private staging folder, bound
  while it is still empty so the child can import while the supervisor stages; only this job's
  files ever go into that folder, each under its name only once verified; a private ``/tmp`` and ``/out``
  (tmpfs, each capped at a size): the child writes nowhere on disk — the supervisor receives the
  artifact over a pipe and writes it itself;
- a fresh ``/proc`` (its own PID namespace only) and a minimal ``/dev``; with CUDA, only the
  device nodes of the job's own GPU plus the driver's control nodes;
- an empty environment except what it needs (no API keys, no database URL, no S3 keys).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("certiprune.isolation")

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora/RHEL: dnf install "
                "bubblewrap), and allow unprivileged user namespaces (kernel.unprivileged_userns_clone=1)")

#: System paths the child's Python needs (read-only). Missing ones are skipped.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
                "/etc/localtime", "/etc/nsswitch.conf")
NVIDIA_CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
CHILD_UID = 65534


def bwrap_binary() -> str | None:
    return shutil.which("bwrap")


@dataclass(frozen=True)
class SandboxView:
    """What one child may see: read-only inputs by name under /in, and the size caps of its tmpfs."""

    inputs: dict[str, Path]  # name under /in → verified local copy
    tmp_bytes: int
    out_bytes: int
    gpu_devices: tuple[str, ...] = ()  # /dev/nvidiaN of the job's GPU, when it has one
    env: dict[str, str] = field(default_factory=dict)
    #: A folder bound read-only as /in itself (instead of ``inputs``): the run's private staging folder, which
    #: holds this job's files only and may still be filling when the child starts (service.supervisor).
    inputs_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.inputs and self.inputs_dir is not None:
            raise ValueError("bind the inputs one by one or their folder, not both")


def python_paths() -> list[Path]:
    """The Python installation and the installed packages the child imports (outside the system paths)."""
    import calibration
    import service

    candidates = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent,
                  Path(calibration.__file__).resolve().parent, Path(service.__file__).resolve().parent]
    out: list[Path] = []
    for path in candidates:
        path = path.resolve()
        if any(str(path).startswith(s + "/") or str(path) == s for s in SYSTEM_PATHS):
            continue
        if any(path == p or p in path.parents for p in out):
            continue
        out = [p for p in out if path not in p.parents] + [path]
    return out


def forbidden_overlap(data_dir: str) -> Path | None:
    """A read-only path of the sandbox that contains the data dir (the child could read every tenant's files)."""
    if "://" in data_dir and not data_dir.startswith("file://"):
        return None
    root = Path(data_dir.removeprefix("file://")).expanduser().resolve()
    for path in python_paths():
        if root == path or path in root.parents:
            return path
    return None


def bwrap_argv(view: SandboxView, command: list[str]) -> list[str]:
    """The bwrap command line that runs ``command`` inside ``view``."""
    binary = bwrap_binary()
    if binary is None:
        raise RuntimeError(f"bubblewrap is not installed: {INSTALL_HINT}")
    argv = [binary, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--disable-userns",
            "--uid", str(CHILD_UID), "--gid", str(CHILD_UID), "--hostname", "sandbox", "--clearenv",
            # the private /tmp first: a Python or package installed below /tmp is bound on top of it
            "--size", str(view.tmp_bytes), "--tmpfs", "/tmp"]
    for path in SYSTEM_PATHS:
        if os.path.lexists(path):
            if os.path.islink(path):  # merged /usr: /lib -> usr/lib
                argv += ["--symlink", os.readlink(path), path]
            else:
                argv += ["--ro-bind", path, path]
    for path in python_paths():
        argv += ["--ro-bind", str(path), str(path)]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    for node in view.gpu_devices + (NVIDIA_CONTROL_NODES if view.gpu_devices else ()):
        if os.path.exists(node):
            argv += ["--dev-bind", node, node]
    argv += ["--size", str(view.out_bytes), "--tmpfs", "/out"]
    if view.inputs_dir is not None:
        argv += ["--ro-bind", str(view.inputs_dir), "/in"]
    else:
        argv += ["--dir", "/in"]
        for name, path in view.inputs.items():
            argv += ["--ro-bind", str(path), f"/in/{name}"]
    argv += ["--remount-ro", "/", "--chdir", "/out"]
    for key, value in view.env.items():
        argv += ["--setenv", key, value]
    return argv + ["--", *command]


def traversable_by(uid: int, path: Path) -> bool:
    """Whether ``uid`` (no groups) can reach ``path``: every folder above it is searchable by others or owned by uid."""
    for folder in [*reversed(path.resolve().parents), path.resolve()]:
        try:
            st = folder.stat()
        except OSError:
            return False
        if folder.is_dir() and not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return False
    return True


def outside_uid(view: SandboxView, uid: int = CHILD_UID) -> int | None:
    """The uid a root supervisor should enter the sandbox as, or None to enter as itself.

    As root, the child is started as ``uid`` outside too (an account that owns nothing) when ``uid`` can
    reach every path it binds. Otherwise (e.g. a Python installed under /root) it enters as root, and the
    user namespace maps it to ``uid`` without any capability outside: only its mounts confine it.
    """
    if os.getuid() != 0:
        return None
    paths = [*python_paths(), *view.inputs.values(), *([view.inputs_dir] if view.inputs_dir is not None else [])]
    if all(traversable_by(uid, p) for p in paths):
        return uid
    blocked = next(p for p in paths if not traversable_by(uid, p))
    log.debug("uid %d cannot reach %s; the sandbox is entered as root mapped to an unprivileged uid", uid, blocked)
    return None


def drop_to(uid: int | None) -> None:
    """preexec_fn: a root supervisor enters the sandbox as an unprivileged uid (no groups)."""
    if uid is not None and os.getuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


@functools.lru_cache(maxsize=4)
def probe(uid: int = CHILD_UID) -> str | None:
    """None when a sandbox can be started here; else why not (cached per process)."""
    binary = bwrap_binary()
    if binary is None:
        return f"bubblewrap (bwrap) is not installed; {INSTALL_HINT}"
    view = SandboxView(inputs={}, tmp_bytes=1 << 20, out_bytes=1 << 20)
    try:
        argv = bwrap_argv(view, [sys.executable, "-I", "-c", "import sys; sys.exit(0)"])
        proc = subprocess.run(argv, capture_output=True, timeout=60,
                              preexec_fn=functools.partial(drop_to, outside_uid(view, uid)))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap could not start a sandbox ({exc}); {INSTALL_HINT}"
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        return (f"bubblewrap is installed but could not start a sandbox ({detail[-1] if detail else proc.returncode}); "
                f"{INSTALL_HINT}")
    return None


def gpu_device_nodes(visible: str | None) -> tuple[str, ...]:
    """/dev/nvidiaN for the GPUs in ``visible`` (physical CUDA indices in PCI-bus order), from the driver's /proc."""
    if not visible:
        return ()
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*"))
    nodes = []
    for index in (v.strip() for v in visible.split(",") if v.strip()):
        if not index.isdigit() or int(index) >= len(gpus):
            continue
        try:
            info = (gpus[int(index)] / "information").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("Device Minor:"):
                nodes.append(f"/dev/nvidia{line.split(':', 1)[1].strip()}")
    return tuple(nodes)


__all__ = ["CHILD_UID", "INSTALL_HINT", "SandboxView", "bwrap_argv", "bwrap_binary", "drop_to", "forbidden_overlap",
           "gpu_device_nodes", "outside_uid", "probe", "python_paths", "traversable_by"]
