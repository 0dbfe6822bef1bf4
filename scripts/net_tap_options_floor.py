"""The host's cost per 64-byte frame through the bench's TAP (scripts/tap_io_floor.c, no VM) with one TAP option
changed: what lowers the per-write cost of the TX-only frames (docs/results/net-pps.md, session 5).

    PYTHONPATH=. python3 scripts/net_tap_options_floor.py VARIANT [MODE:N:B ...]   (default MODE tx:300000:32)

VARIANT: base; napi (a TAP made with IFF_NAPI: writes go through NAPI/GRO); xdp (an XDP program on the TAP
drops EtherType 0x88B5 -- the TX-only frames -- before an skb is built, passes the rest); qlenN (txqueuelen N);
nogro (ethtool -K gro off).  The napi TAP has its own subnet (10.0.1.0/24): run only tx modes with it.
Run as root (makes and removes its own namespace)."""
import ctypes, os, struct, subprocess, sys, tempfile
sys.path.insert(0, "tests")
import netns as N
from exitless.bench.net import Namespace, TAP_NAME
from exitless.net import tap as T

libc = ctypes.CDLL(None, use_errno=True)
def bpf_xdp_drop_88b5() -> int:
    """An XDP program (BPF_PROG_LOAD, 11 hand-assembled instructions): XDP_DROP for EtherType 0x88B5, else
    XDP_PASS; its fd."""
    ins = [(0x61, 2, 1, 0, 0), (0x61, 3, 1, 4, 0), (0xbf, 4, 2, 0, 0), (0x07, 4, 0, 0, 14), (0x2d, 4, 3, 4, 0),
           (0x69, 5, 2, 12, 0), (0x55, 5, 0, 2, 0xB588), (0xb7, 0, 0, 0, 1), (0x95, 0, 0, 0, 0), (0xb7, 0, 0, 0, 2),
           (0x95, 0, 0, 0, 0)]
    code = b"".join(struct.pack("<BBhi", c, d | (s << 4), off, imm) for c, d, s, off, imm in ins)
    insns = ctypes.create_string_buffer(code)
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    # union bpf_attr for BPF_PROG_LOAD: prog_type XDP, insn_cnt, insns, license, log level/size/buf, kern_version,
    # prog_flags, prog_name
    fields = (6, len(ins), ctypes.addressof(insns), ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0,
              b"drop88b5")
    attr = ctypes.create_string_buffer(struct.pack("<IIQQIIQII16s", *fields).ljust(128, b"\0"))
    fd = libc.syscall(321, 5, attr, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_LOAD: " + log.value.decode())
    return fd

src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tap_io_floor.c")
tmpdir = tempfile.mkdtemp()
exe = os.path.join(tmpdir, "tap_io_floor")
subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)

def arp_mac(fd, src_ip="10.0.0.2", target_ip="10.0.0.1"):
    mac = N.resolve_mac(fd, src_ip, target_ip)
    if mac is None:
        raise SystemExit("no ARP reply")
    return mac

def floor(fd, mac, modes):
    os.set_inheritable(fd, True)
    for spec in modes:
        mode, n, b = spec.split(":")
        subprocess.run([exe, str(fd), mode, n, b, mac.hex()], pass_fds=(fd,), check=False)
        while True:
            try: os.read(fd, 4096)
            except BlockingIOError: break

modes = sys.argv[2:] or ["tx:300000:32"]
variant = sys.argv[1]
ns = Namespace()
try:
    from pyroute2 import NetNS
    if variant == "napi":
        name = "exlnapi0"
        fds = T._in_netns(ns.name, lambda: T._attach_fds(name, T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR | 0x0010, 1))
        with NetNS(ns.name, flags=0) as ipr:
            (idx,) = ipr.link_lookup(ifname=name)
            ipr.addr("add", index=idx, address="10.0.1.1", prefixlen=24)
            ipr.link("set", index=idx, state="up")
        fd = fds[0]
        # ARP for 10.0.1.1 from 10.0.1.2
        mac = arp_mac(fd, "10.0.1.2", "10.0.1.1")
        floor(fd, mac, modes)
        os.close(fd)
    else:
        with T.Tap.open(TAP_NAME, netns=ns.name) as tap:
            fd = tap.fds[0]
            mac = arp_mac(fd)
            with NetNS(ns.name, flags=0) as ipr:
                (idx,) = ipr.link_lookup(ifname=TAP_NAME)
                if variant == "xdp":
                    pfd = bpf_xdp_drop_88b5()
                    ipr.link("set", index=idx, xdp_fd=pfd)
                    os.close(pfd)
                elif variant.startswith("qlen"):
                    ipr.link("set", index=idx, txqlen=int(variant[4:]))
            if variant in ("noqueue", "pfifo", "fq_codel"):
                subprocess.run(["ip", "netns", "exec", ns.name, "tc", "qdisc", "replace", "dev", TAP_NAME, "root", variant],
                               check=True)
            subprocess.run(["ip", "netns", "exec", ns.name, "tc", "qdisc", "show", "dev", TAP_NAME], check=False)
            if variant == "nogro":
                subprocess.run(["ip", "netns", "exec", ns.name, "ethtool", "-K", TAP_NAME, "gro", "off"], check=False)
            floor(fd, mac, modes)
finally:
    ns.close()
    os.unlink(exe)
    os.rmdir(tmpdir)
