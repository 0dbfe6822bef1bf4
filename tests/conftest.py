"""KVM tests are marked ``kvm``: skipped (with the reason) where /dev/kvm is unusable,
and *failed* instead when EXITLESS_REQUIRE_KVM=1, so CI can never pass them vacuously."""
import os

import pytest


def kvm_unusable_reason() -> str:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm is not usable: {e.strerror}"
    os.close(fd)
    return ""


@pytest.fixture(autouse=True)
def _kvm_guard(request):
    if request.node.get_closest_marker("kvm") is None:
        return
    why = kvm_unusable_reason()
    if why:
        if os.environ.get("EXITLESS_REQUIRE_KVM") == "1":
            pytest.fail(f"EXITLESS_REQUIRE_KVM=1 but {why}")
        pytest.skip(why)


# The virtqueue, virtio-blk and virtio-net cases run under both implementations of the data plane (issue 8): the
# pure-Python one, and the C fast path (exitless/devices/virtio/_vring.c) that takes the valid common
# case and leaves everything else to Python.  tests/test_vring_paths.py checks that the two agree.
VRING_PATH_MODULES = ("test_virtqueue", "test_virtio_blk", "test_virtio_net")


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rsplit(".", 1)[-1] in VRING_PATH_MODULES and "vring_path" in metafunc.fixturenames:
        metafunc.parametrize("vring_path", ["python", "c"], indirect=True)


@pytest.fixture(autouse=True)
def vring_path(request):
    """``python`` or ``c`` for the modules above (queues validated during the test use that path), else None."""
    path = getattr(request, "param", None)
    if path is None:
        yield None
        return
    from exitless.devices.virtio import queue

    if path == "c" and queue._vring is None:
        pytest.fail("the C fast path exitless.devices.virtio._vring is not built "
                    "(python3 setup.py build_ext --inplace)")
    saved = queue.C_VRING
    queue.C_VRING = path == "c"
    try:
        yield path
    finally:
        queue.C_VRING = saved


@pytest.fixture(scope="session")
def linux_io(tmp_path_factory):
    """One Linux boot with an NVMe controller and a virtio-net NIC per I/O path, every check run by its
    initramfs (see tests/linux_io.py): shared by test_nvme_linux.py and test_net_linux.py, since on a
    kvm_pvm host a boot to userspace takes minutes."""
    why = kvm_unusable_reason()
    if why:     # a session fixture is set up before the function-scoped guard above could skip
        if os.environ.get("EXITLESS_REQUIRE_KVM") == "1":
            pytest.fail(f"EXITLESS_REQUIRE_KVM=1 but {why}")
        pytest.skip(why)
    try:
        from linux_io import boot_linux_io
    except ImportError:  # pragma: no cover - tests/ as a package
        from tests.linux_io import boot_linux_io
    return boot_linux_io(tmp_path_factory.mktemp("linux-io"))


# -- fd leaks --------------------------------------------------------------------------------------------
# Leaks of a few fds per test once pushed a whole CI session past select()'s FD_SETSIZE (1024) and 55
# unrelated tests failed.  The session records the open-fd count after every test; if it grew by more than
# FD_GROWTH_LIMIT, the session fails and names the tests where it grew most.
FD_GROWTH_LIMIT = 256
_fd_counts: list[tuple[str, int]] = []


def pytest_sessionstart(session):
    _fd_counts.append(("(session start)", len(os.listdir("/proc/self/fd"))))


def pytest_runtest_logfinish(nodeid, location):
    _fd_counts.append((nodeid, len(os.listdir("/proc/self/fd"))))


def _fd_growth() -> tuple[int, list[tuple[int, str]]]:
    deltas = [(b[1] - a[1], b[0]) for a, b in zip(_fd_counts, _fd_counts[1:])]
    return _fd_counts[-1][1] - _fd_counts[0][1], sorted((d for d in deltas if d[0] > 0), reverse=True)[:10]


def pytest_sessionfinish(session, exitstatus):
    growth, _ = _fd_growth()
    if growth > FD_GROWTH_LIMIT and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    growth, top = _fd_growth()
    if growth > FD_GROWTH_LIMIT:
        terminalreporter.section("file descriptors leaked", red=True)
        terminalreporter.write_line(f"the test process holds {growth} more fds than at the start "
                                    f"(limit {FD_GROWTH_LIMIT}); largest steps:")
        for d, nodeid in top:
            terminalreporter.write_line(f"  +{d}  {nodeid}")
