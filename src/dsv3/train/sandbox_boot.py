"""Sandbox bootstrap: sets up isolation around one untrusted Python program, then runs it (standard library only).

Run by :mod:`dsv3.train.sandbox` as ``python -I -S sandbox_boot.py MODE WORKDIR PYTHON PREFIX SECONDS MEGABYTES``,
never imported by the trainer. WORKDIR holds ``box/`` (``box/main.py``) and ``root/`` (an empty mount point).
MODE ``namespaces``: new mount, network, PID, IPC and UTS namespaces, a chroot into a read-only tmpfs with the
system and Python directories bound read-only and a private writable ``/box``, a uid of its own, no_new_privs,
the limits, then exec. MODE ``rlimits``: the limits, the working directory, a clean environment and, as root,
uid 65534. Details: docs/rl.md ("Module notes").
"""

import ctypes
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = (
    0x20000,
    0x4000000,
    0x8000000,
    0x20000000,
    0x40000000,
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
NOBODY = 65534
SANDBOX_UIDS = 100000  # namespaces mode: uid 100000 + (bootstrap pid mod 100000), owned by no one
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _bind_readonly(src, root):
    target = root + src
    if os.path.islink(src):  # merged /usr: /lib -> usr/lib
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(src), target)
        return
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    _mount(src, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_namespaces(workdir, prefix, uid):
    """Unshare, build the read-only root with a private writable /box (a 64 MiB tmpfs of ``uid``), chroot."""
    with open(os.path.join(workdir, "box", "main.py"), "rb") as f:
        program = f.read()
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = os.path.join(workdir, "root")
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in dict.fromkeys(
        ["/usr", "/lib", "/lib64", "/bin", "/etc/alternatives", prefix, "/dev/null", "/dev/urandom"]
    ):
        if os.path.lexists(path):
            _bind_readonly(path, root)
    os.makedirs(root + "/box")
    _mount("tmpfs", root + "/box", "tmpfs", MS_NOSUID | MS_NODEV, f"size=64m,mode=700,uid={uid},gid={uid}")
    with open(root + "/box/main.py", "wb") as f:
        f.write(program)
    os.chown(root + "/box/main.py", uid, uid)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.chroot(root)
    os.chdir("/box")


def reachable_by_others(path):
    """Whether every directory on the way to ``path`` and the file itself are executable by any user."""
    parts = os.path.realpath(path).split(os.sep)
    return all(
        os.stat(os.sep + os.path.join(*parts[:i]) if i > 1 else os.sep).st_mode & 0o001
        for i in range(1, len(parts) + 1)
    )


def drop_privileges(seconds, megabytes, uid, nproc):
    """Become ``uid`` (when root), never regain privileges, set the time, memory, file and process limits."""
    if os.getuid() == 0 and uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for limit, value in (
        (resource.RLIMIT_CPU, int(seconds) + 1),
        (resource.RLIMIT_AS, megabytes << 20),
        (resource.RLIMIT_FSIZE, 16 << 20),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_CORE, 0),
    ):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass  # a limit this OS does not support (RLIMIT_AS on macOS); the wall-clock kill still holds


def main():
    mode, workdir, python, prefix, seconds, megabytes = sys.argv[1:7]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/box", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    argv = [python, "-I", "-S", "main.py"]
    if mode == "rlimits":
        os.chdir(os.path.join(workdir, "box"))
        drop_privileges(float(seconds), int(megabytes), NOBODY if reachable_by_others(python) else None, 64)
        os.execve(python, argv, env)
    uid = SANDBOX_UIDS + os.getpid() % SANDBOX_UIDS  # its own uid: its process limit is its own
    enter_namespaces(workdir, prefix, uid)
    pid = os.fork()  # the first child is PID 1 of the new PID namespace
    if pid == 0:
        drop_privileges(float(seconds), int(megabytes), uid, 16)
        os.execve(python, argv, env)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        print(f"sandbox: {e}", file=sys.stderr)
        sys.exit(97)
