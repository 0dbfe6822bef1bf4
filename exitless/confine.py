"""Confinement of exitless's back-end processes (``serve blk``, ``serve net``, a sidecore process).

After its setup -- disk opened, socket bound, guest memory mapped -- a back-end process calls
:func:`confine`: it sets ``no_new_privs``, can drop to another user, and installs a seccomp
filter (through libseccomp's Python binding) that allows only the system calls its data plane
and control loop make.  Anything else -- ``execve``, ``fork``, a new socket, ``ptrace``,
``mount``, opening a file for writing -- kills the process with SIGSYS (``SCMP_ACT_KILL_PROCESS``):
a device model that was taken over cannot reach further than the fds it already holds, and the
VMM sees the death (``SidecoreProcess`` reports it).  ``EXITLESS_CONFINE=0`` (or ``serve
--no-confine``) turns it off for debugging, e.g. under strace or a profiler.

The binding: Debian's ``python3-seccomp`` (libseccomp's own) when it is importable, else PyPI's
``pyseccomp`` (the same API over ctypes).  Firecracker's jailer plays the same role for its VMM.
"""
from __future__ import annotations

import ctypes
import errno
import os
import pwd
import signal
from typing import Callable

from .errors import ExitlessError

#: System calls a confined back-end may make (x86-64 names; the Python runtime's own included).
ALLOWED = (
    # I/O on fds it already holds: the disk, the vhost-user socket, eventfds, guest memory
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "lseek", "close", "fstat", "newfstatat", "statx", "fcntl", "dup", "dup3", "fdatasync", "fsync", "fallocate",
    "recvmsg", "recvfrom", "sendmsg", "sendto", "accept4", "accept", "getsockopt", "getsockname", "getpeername",
    "shutdown",
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "eventfd2", "pipe2", "readlink", "readlinkat", "getdents64", "getcwd",
    # memory, threads, signals, time: the interpreter and libc
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk", "futex", "set_robust_list", "get_robust_list",
    "rseq", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "exit", "exit_group", "gettid", "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "tgkill",
    "sched_yield", "sched_getaffinity", "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday",
    "getrusage", "times", "sysinfo", "uname", "getrandom", "wait4",
)
PR_SET_NAME, PR_GET_NAME = 15, 16
CLONE_THREAD = 0x10000
IOCTLS = (0x5401, 0x5421, 0x5451, 0x5450)   # TCGETS, FIONBIO, FIOCLEX, FIONCLEX


class ConfinementError(ExitlessError, OSError):
    """Confinement was asked for and cannot be set up (no binding, unknown user, ...)."""


def _binding():
    try:
        import seccomp                       # libseccomp's own binding (Debian: python3-seccomp)
        return seccomp
    except ImportError:
        pass
    try:
        import pyseccomp                     # the same API over ctypes (PyPI)
        return pyseccomp
    except (ImportError, OSError):
        return None


def enabled() -> bool:
    """False when the environment opts out (``EXITLESS_CONFINE=0``)."""
    return os.environ.get("EXITLESS_CONFINE", "1") not in ("0", "no", "off")


def status(*, probe: bool = False) -> tuple[bool, str]:
    """(available, how or why not) -- for ``exitless doctor``.  With ``probe``, :func:`probe_filter` tries it
    for real in a child process (a container may forbid loading a filter although the kernel has
    seccomp)."""
    sc = _binding()
    if sc is None:
        return False, "no libseccomp binding (apt install python3-seccomp, or pip install pyseccomp)"
    if not os.path.exists("/proc/self/status") or "Seccomp:" not in open("/proc/self/status").read():
        return False, "the kernel does not support seccomp"
    how = f"seccomp filter via {sc.__name__}"
    if probe:
        ok, why = probe_filter()
        if not ok:
            return False, f"{how}: {why}"
        how += f"; {why}"
    return True, how + ("" if enabled() else " (disabled by EXITLESS_CONFINE=0)")


def probe_filter() -> tuple[bool, str]:
    """Confine a forked child and have it make a forbidden system call (``socket``): (True, what
    happened) if the filter killed it with SIGSYS, else (False, why not).  Call it from a process
    with one thread (``exitless doctor``): the child of a fork keeps only the calling thread."""
    pid = os.fork()
    if pid == 0:                                       # the child: never returns
        code = 0
        try:
            os.environ["EXITLESS_CONFINE"] = "1"       # a probe of what confinement can do here
            confine()
            import socket
            socket.socket().close()
            code = 3                                   # survived: the filter did not hold
        except ConfinementError:
            code = 4
        except BaseException:
            code = 5
        finally:
            os._exit(code)
    _, wstatus = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wstatus) and os.WTERMSIG(wstatus) == signal.SIGSYS:
        return True, "probed: a forbidden system call in a confined child ended it with SIGSYS"
    code = os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else -os.WTERMSIG(wstatus)
    return False, {3: "probed: a confined child made a forbidden call and lived",
                   4: "probed: the filter could not be installed (no_new_privs or seccomp refused)"}.get(
                       code, f"probed: the confined child ended with status {code}")


def _no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:      # PR_SET_NO_NEW_PRIVS
        e = ctypes.get_errno()
        raise ConfinementError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")


def drop_user(user: str) -> None:
    """Switch to ``user`` (name or uid) and its primary group, dropping supplementary groups."""
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfinementError(errno.EINVAL, f"--user {user!r}: no such user") from None
    try:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except PermissionError as e:
        raise ConfinementError(e.errno, f"--user {user!r}: {e.strerror} (dropping to a user needs root)") from None


def unlink_on_exit(path: str) -> Callable[[], None]:
    """Remove ``path`` (a unix socket we listen on) once we are done, although we may not unlink.

    Forks, before confinement, a helper that waits for EOF on a pipe -- the returned function
    closes it and waits for the helper, as does the kernel if this process dies -- and then
    unlinks ``path`` if it is still the file we created.
    """
    ino = os.stat(path).st_ino
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the helper: no fds but the pipe, deaf to ^C
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.closerange(3, r)
            os.closerange(r + 1, os.sysconf("SC_OPEN_MAX"))
            while os.read(r, 1):
                pass
            if os.stat(path).st_ino == ino:
                os.unlink(path)
        except BaseException:
            pass
        finally:
            os._exit(0)
    os.close(r)

    def done() -> None:
        os.close(w)
        os.waitpid(pid, 0)

    return done


def confine(*, user: str | None = None, extra: tuple[str, ...] = (),
            ioctls: tuple[tuple[int | None, int], ...] = ()) -> bool:
    """Confine the calling process from now on; returns False if opted out (EXITLESS_CONFINE=0).

    Call it once, after setup and before the process starts serving (threads started later
    inherit the filter; the filter is also synchronised to threads that already exist).
    ``extra`` names more system calls to allow; ``ioctls``, ``(fd, request)`` pairs, device
    ioctls allowed on exactly that fd (a TAP's TUNSETOFFLOAD on its own queue fds, not on any
    fd the process may hold); fd None: on any fd (the sidecore service's TAP fds arrive later, under
    numbers not known yet).  Raises :class:`ConfinementError` if it cannot.
    """
    sc = _binding() if enabled() else None      # imported before a user drop can hide the module
    if enabled() and sc is None:
        raise ConfinementError(errno.ENOSYS, status()[1])
    if user is not None:
        drop_user(user)
    if sc is None:
        return False
    _no_new_privs()
    f = sc.SyscallFilter(defaction=sc.KILL_PROCESS)
    try:
        f.set_attr(sc.Attr.CTL_TSYNC, 1)
    except (AttributeError, OSError, ValueError):
        pass
    for name in ALLOWED + tuple(extra):
        try:
            f.add_rule(sc.ALLOW, name)
        except (OSError, ValueError, RuntimeError):
            pass                             # a name this kernel/libseccomp does not know
    # threads yes, processes no: clone only with CLONE_THREAD; clone3 hides its flags in memory,
    # so it fails with ENOSYS and glibc falls back to clone
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # files: open for reading only (a traceback reads source lines); nothing is created or written
    write_bits = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    f.add_rule(sc.ALLOW, "openat", sc.Arg(2, sc.MASKED_EQ, write_bits, 0))
    for request in IOCTLS:                   # isatty() and fd flags; no device ioctls (no KVM, no TIOCSTI)
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, request))
    for fd, request in ioctls:               # the caller's device ioctls, each on its own fd only
        f.add_rule(sc.ALLOW, "ioctl", *([sc.Arg(0, sc.EQ, fd)] if fd is not None else []), sc.Arg(1, sc.EQ, request))
    # removing files: refused with EPERM (the server tolerates it) -- unlink_on_exit() does it instead
    for name in ("unlink", "unlinkat"):
        f.add_rule(sc.ERRNO(errno.EPERM), name)
    f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, PR_SET_NAME))
    f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, PR_GET_NAME))
    f.load()
    return True
