"""One Linux boot under exitless's own VMM that drives Linux's nvme and virtio_net drivers on every I/O path.

Why one boot: on a ``kvm_pvm`` host guest ring-0 code runs through KVM's instruction emulator and a
boot to userspace takes minutes, so a session-scoped fixture (:func:`linux_io`, made available to
every test module by ``tests/conftest.py``) boots Debian's cloud kernel once, with 1 vCPU and

* one NVMe controller per I/O path (:data:`NVME_PATHS`; Linux's nvme driver is built into that
  kernel), each backed by its own image file, and one more (``sidecore``: io=adaptive) whose I/O queue
  pairs an ``exitless sidecore`` service process serves (``run --nvme …,io=adaptive --sidecore PATH``);
* one virtio-net NIC per I/O path (:data:`NET_PATHS`), each on its own TAP in one network namespace
  the fixture creates (subnet 10.0.<i>.0/24, host end 10.0.<i>.1), when this process may create
  namespaces (root, /dev/net/tun, pyroute2); else no NIC and the net tests skip with the reason;
* one more NIC (:data:`SERVICE_NIC`, io=adaptive) whose queue pair an ``exitless sidecore --mode
  adaptive`` process serves (``run --sidecore``; the VMM keeps its control queue): its log is kept.

Polling devices share one sidecore per mode (as ``run --one-sidecore``), so one thread spins, not five.
The initramfs's command (:func:`guest_script`) runs every check and prints one line per result:

* ``NVME-DEV <ctrl> <pci address> <sectors>``, ``NVME-FS <ctrl> <md5 written> <md5 read back>`` after
  ``mkfs.ext4`` (the host's e2fsprogs, copied in with its libraries: busybox's mke2fs makes ext2
  only), a mount, a file written, caches dropped and the file read again;
* ``NET-IF <i> <ifname>``, ``NET-PING <i> <received>``, ``NET-UP <i> <md5 sent> <md5 the host
  acknowledged>``, ``NET-DOWN <i> <md5 received>``;
* ``EXL-SNAP <label>``: the console hook records every device's counters at that moment, so that
  the tests can read what one phase (Linux's I/O on the namespaces) cost in doorbell writes.

The devices' counters, the console and the images stay for the tests to check after poweroff.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import netns as N
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import netns as N

#: the NVMe controllers: one per I/O path, and "sidecore": io=adaptive, its I/O queues served by an
#: ``exitless sidecore`` process (SIDECORE_SERVED's path)
NVME_PATHS = ("trap", "ioeventfd", "shared", "poll", "adaptive", "sidecore")
SIDECORE_SERVED = "adaptive"
NET_PATHS = ("trap", "ioeventfd", "shared", "poll", "adaptive")
#: the key of the NIC served by the sidecore service in ``LinuxIo.net`` (its index: len(NET_PATHS))
SERVICE_NIC = "sidecore"
NVME_IMAGE_BYTES = 32 << 20
#: bytes of the file written on each ext4 filesystem, and moved over TCP each way per NIC
FILE_BYTES = 256 << 10
NET_BYTES = 512 << 10
UP_PORT, DOWN_PORT = 5001, 5002
#: seconds for the boot and every check (kvm_pvm: ring-0 code is emulated; minutes)
PVM_TIMEOUT = 3000.0
OTHER_TIMEOUT = 300.0
#: nice value of the polling sidecore threads during this boot (0: leave them at the VMM's priority)
SIDECORE_NICE = int(os.environ.get("EXITLESS_LINUX_IO_SIDECORE_NICE", "19"))


def nic_mac(i: int) -> str:
    return f"52:54:00:e1:00:{i:02x}"


def nic_subnet(i: int) -> str:
    return f"10.0.{10 + i}"


def host_tools() -> dict[str, bytes | tuple[bytes, int]]:
    """The host's ``mke2fs`` (as ``/sbin/mkfs.ext4``) with the shared libraries and loader it needs, at
    the same paths in the guest: e2fsprogs is a test dependency (scripts/setup.sh), busybox makes ext2 only."""
    mke2fs = shutil.which("mke2fs")
    if mke2fs is None:
        pytest.fail("e2fsprogs (mke2fs, e2fsck, debugfs) is needed: scripts/setup.sh installs it")
    files: dict[str, bytes | tuple[bytes, int]] = {"/usr/local/sbin/mkfs.ext4": (Path(mke2fs).read_bytes(), 0o755)}
    out = subprocess.run(["ldd", mke2fs], capture_output=True, text=True, check=True).stdout
    for lib in re.findall(r"(/\S+\.so[.\d]*)", out):
        real = Path(lib).resolve()
        files[lib] = (real.read_bytes(), 0o755)
        if str(real) != lib and not lib.startswith("/lib64"):
            files[str(real)] = (real.read_bytes(), 0o755)
    if os.path.exists("/etc/mke2fs.conf"):
        files["/etc/mke2fs.conf"] = Path("/etc/mke2fs.conf").read_bytes()
    return files


def guest_script(nvme_count: int, nics: int) -> str:
    """The initramfs command: every check, one result line each (see the module docstring)."""
    lines = [
        "export PATH=/usr/local/sbin:$PATH",
        "ip link set lo up",
        # nvme probes asynchronously (built in): wait for every namespace's block device
        f"i=0; while [ $(ls /dev | grep -c '^nvme[0-9]*n1$') -lt {nvme_count} ] && [ $i -lt 300 ]; do "
        "sleep 1; i=$((i+1)); done",
        "for d in /sys/class/nvme/nvme*; do c=${d##*/}; "
        "echo NVME-DEV $c $(basename $(readlink $d/device)) $(cat /sys/block/${c}n1/size); done",
        "echo EXL-SNAP nvme-begin",
        "for d in /sys/class/nvme/nvme*; do c=${d##*/}; dev=/dev/${c}n1; mkdir -p /mnt/$c; "
        "mkfs.ext4 -q -F $dev || echo NVME-ERR $c mkfs; "
        # noinit_itable: no background zeroing of the inode tables (minutes of emulated ring 0 on kvm_pvm)
        "mount -t ext4 -o noinit_itable $dev /mnt/$c || echo NVME-ERR $c mount; "
        f"dd if=/dev/urandom of=/mnt/$c/data bs=65536 count={FILE_BYTES >> 16} 2>/dev/null; "
        "w=$(md5sum < /mnt/$c/data); sync; echo 3 > /proc/sys/vm/drop_caches; "
        "r=$(md5sum < /mnt/$c/data); umount /mnt/$c || echo NVME-ERR $c umount; "
        "echo NVME-FS $c ${w%% *} ${r%% *}; done",
        "echo EXL-SNAP nvme-end",
    ]
    for i in range(nics):
        net, mac = nic_subnet(i), nic_mac(i)
        lines += [
            f"ifc=; for a in /sys/class/net/*; do [ \"$(cat $a/address)\" = {mac} ] && ifc=${{a##*/}}; done",
            f"echo NET-IF {i} $ifc",
            f"ip addr add {net}.2/24 dev $ifc; ip link set $ifc up",
            f"echo NET-PING {i} $(ping -c 3 -W 5 {net}.1 | grep -o '[0-9]* packets received')",
            f"dd if=/dev/urandom of=/tmp/up bs=65536 count={NET_BYTES >> 16} 2>/dev/null",
            f"echo NET-UP {i} $(md5sum < /tmp/up | cut -d' ' -f1) $(nc {net}.1 {UP_PORT} < /tmp/up)",
            f"echo NET-DOWN {i} $(nc {net}.1 {DOWN_PORT} < /dev/null | md5sum | cut -d' ' -f1)",
            "rm -f /tmp/up",
        ]
    lines += [
        "echo EXL-SNAP end",
        "dmesg | grep -i -E 'nvme|virtio|eth[0-9]|blk_update|I/O error|timeout|call trace|BUG' | "
        "sed 's/^/DMESG /'",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class LinuxIo:
    """What the boot left: the console text, the exit, per-device counters and snapshots, the images."""

    console: str
    exit: object
    seconds: float
    ready_at: float | None
    nvme: dict[str, dict] = field(default_factory=dict)          # path -> final stats (+ "slot", "image")
    net: dict[str, dict] = field(default_factory=dict)           # path -> final stats (+ "index", "slot")
    snaps: dict[str, dict[str, dict]] = field(default_factory=dict)   # label -> {"nvme-<path>": stats}
    responders: list = field(default_factory=list)
    net_skip: str | None = None
    down_md5: list[str] = field(default_factory=list)
    service_log: str = ""                                        # the sidecore service's log, once it stopped

    def lines(self, tag: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.console.splitlines() if line.startswith(tag + " ")]


class SnapshotConsole:
    """A console sink: on a line ``EXL-SNAP <label>`` record ``counters()`` under that label."""

    def __init__(self, counters, copy_to: str | None = None):
        self.counters = counters
        self.snaps: dict[str, dict] = {}
        self._line = bytearray()
        self.copy = open(copy_to, "ab", buffering=0) if copy_to else None   # to watch a long boot live

    def __call__(self, data: bytes) -> None:
        if self.copy is not None:
            self.copy.write(data)
        for b in data:
            if b == 0x0A:
                text = self._line.decode(errors="replace").strip()
                if text.startswith("EXL-SNAP "):
                    self.snaps[text.split()[1]] = self.counters()
                self._line.clear()
            elif len(self._line) < 256:
                self._line.append(b)


def boot_linux_io(tmp: Path) -> LinuxIo:
    """Boot once with every device (see the module docstring) and return what the checks need."""
    from exitless.boot import linux as LX
    from exitless.boot.bzimage import parse_bzimage
    from exitless.boot.initramfs import DEFAULT_APPLETS, build_initramfs
    from exitless.disk import sidecore_group
    from exitless.doctor import kvm_flavour
    from exitless.guest.fetch import fetch_guest
    from exitless.net.spec import NetSpec, add_nic
    from exitless.nvme import NvmeSpec, add_nvme
    from exitless.vm import Machine, VmConfig

    try:
        from serveproc import ServeProcess
    except ImportError:  # pragma: no cover - tests/ as a package
        from tests.serveproc import ServeProcess

    pvm = kvm_flavour() == "pvm"
    guest = fetch_guest()
    net_skip = N.can_make_netns()
    nics = 0 if net_skip else len(NET_PATHS) + 1        # + the service's NIC
    rd = build_initramfs(guest.busybox, modules=["virtio_pci", "virtio_net"], modules_root=guest.modules_root,
                         kver=guest.kernel_version, command=guest_script(len(NVME_PATHS), nics),
                         applets=(*DEFAULT_APPLETS, "ping", "nc", "basename", "readlink"), extra_files=host_tools(),
                         compress=not pvm)       # kvm_pvm: gunzip in emulated ring 0 takes minutes
    vmlinux = tmp / "vmlinux"
    vmlinux.write_bytes(LX.extract_vmlinux(parse_bzimage(guest.vmlinuz.read_bytes())))
    cmdline = LX.add_params("console=ttyS0 panic=-1 quiet", LX.host_kernel_params(kvm_flavour()))[0]
    timeout = PVM_TIMEOUT if pvm else OTHER_TIMEOUT

    result = LinuxIo("", None, 0.0, None, net_skip=net_skip)
    with contextlib.ExitStack() as stack:
        ns = None
        if nics:
            ns = stack.enter_context(N.netns_only())
            rnd = random.Random(11)
            for i in range(nics):
                from exitless.net.tap import create_tap

                create_tap(f"exlio{i}", ns, address=f"{nic_subnet(i)}.1/24")
                down = rnd.randbytes(NET_BYTES)
                result.down_md5.append(hashlib.md5(down).hexdigest())
                r = N.TcpResponder(ns, down, ip=f"{nic_subnet(i)}.1", up_port=UP_PORT, down_port=DOWN_PORT,
                                   timeout=timeout)
                stack.callback(r.close)
                result.responders.append(r)
        # one service for the sixth NVMe controller's I/O queue pairs and the last NIC's queue pairs;
        # adaptive: it sleeps while Linux boots (a spinning process would take a loaded host's CPU)
        sock = tmp / "sidecore.sock"
        service = ServeProcess(None, ["--socket", str(sock), "--mode", "adaptive"], tmp / "sidecore.log",
                               command=("sidecore",))
        stack.callback(lambda: setattr(result, "service_log", (service.stop(), service.text())[1]))
        nvme_devs, net_devs = {}, {}
        snap = SnapshotConsole(lambda: {**{f"nvme-{p}": d.stats() for p, d in nvme_devs.items()},
                                        **{f"net-{p}": dict(d.device.stats) for p, d in net_devs.items()}},
                                copy_to=os.environ.get("EXITLESS_LINUX_IO_CONSOLE"))
        console = LX.BootConsole(snap)
        t0 = time.monotonic()
        with Machine(VmConfig(mem_mib=384, cpus=1, console=console)) as m:
            LX.boot_linux(m, vmlinux, cmdline, rd, decompress="host")
            groups: dict = {}
            for path in NVME_PATHS:
                image = tmp / f"nvme-{path}.img"
                with open(image, "wb") as f:
                    f.truncate(NVME_IMAGE_BYTES)
                if path == "sidecore":
                    nvme_devs[path] = add_nvme(m, NvmeSpec(str(image), io=SIDECORE_SERVED, queues=2),
                                               service=str(sock))
                else:
                    nvme_devs[path] = add_nvme(m, NvmeSpec(str(image), io=path, queues=2),
                                               sidecore_group(groups, path))
                result.nvme[path] = {"image": image}
            for i, path in enumerate(NET_PATHS[:nics]):
                net_devs[path] = add_nic(m, NetSpec(f"exlio{i}", mac=bytes.fromhex(nic_mac(i).replace(":", "")),
                                                    io=path, netns=ns), sidecore_group(groups, path))
                result.net[path] = {"index": i}
            if nics:
                i = len(NET_PATHS)
                net_devs[SERVICE_NIC] = add_nic(m, NetSpec(f"exlio{i}", mac=bytes.fromhex(nic_mac(i).replace(":", "")),
                                                           io="adaptive", netns=ns), service=str(sock))
                result.net[SERVICE_NIC] = {"index": i}
            for group in groups.values():
                group.start_on(m)
                if group.mode != "notify" and SIDECORE_NICE:
                    # A spinning sidecore at the vCPU's priority takes half of what this VMM gets of a
                    # loaded host (the scheduler shares a core between the session's threads), and the
                    # vCPU runs Linux's ring 0 through an emulator on kvm_pvm: let the vCPU go first.
                    # The sidecore still gets every cycle the vCPU leaves (Linux waiting on I/O: HLT).
                    os.setpriority(os.PRIO_PROCESS, group.worker.thread.native_id, SIDECORE_NICE)
            result.exit = m.run(timeout=timeout)
            for path, dev in nvme_devs.items():
                result.nvme[path].update(dev.stats(), slot=dev.slot)
            for path, dev in net_devs.items():
                result.net[path].update(dev.device.stats, slot=dev.slot)
        result.seconds = time.monotonic() - t0
        deadline = time.monotonic() + 30      # the VM is gone: the service logs each connection's detach
        while service.text().count(" detached ") < service.text().count(" connected ") and time.monotonic() < deadline:
            time.sleep(0.1)
        result.console = console.text
        result.ready_at = console.ready_at
        result.snaps = snap.snaps
    return result
