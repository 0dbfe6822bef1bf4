"""What copying and clearing 4 KiB costs in guest ring 0 on this host, per instruction form the kernel can pick.

On kvm_pvm, guest ring 0 runs through KVM's instruction emulator, and a REP string instruction is
emulated one iteration at a time: REP MOVSB/STOSB (what Linux uses with ERMS/FSRM) take 8 iterations
where REP MOVSQ/STOSQ take one.  A tiny PVH guest (tests/asmguest.py) repeats each form N times;
the figure is the VM's run time over N (VM creation is outside the timing; "empty" is the loop alone).

Run from the source tree: `PYTHONPATH=. python3 scripts/pvm_ring0_copy.py [N]` (default N=20; ~2 min on kvm_pvm).
Session 4, loaded machine (load 10-15), two runs of N=20: REP MOVSB 21.1/21.0 ms, REP MOVSQ 3.7/4.2 ms,
MOVQ loop 10.9/8.7 ms, REP STOSB 13.2/13.1 ms, REP STOSQ 2.0/2.9 ms, empty loop 0.6/1.3 ms.  Yet a boot
with clearcpuid+=erms,fsrm was no faster than one without (see PVM_KERNEL_PARAMS in exitless/boot/linux.py).
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "tests")
from asmguest import build_guest  # noqa: E402

from exitless.vm import Machine, VmConfig  # noqa: E402

SRC, DST = "mov $0x200000, %rsi\n mov $0x300000, %rdi\n", "mov $0x300000, %rdi\n"
FORMS = {
    "rep movsb": SRC + " mov $4096, %ecx\n rep movsb",
    "rep movsq": SRC + " mov $512, %ecx\n rep movsq",
    "movq loop": SRC + " mov $128, %ecx\n"
                 "2: mov (%rsi), %r8\n mov 8(%rsi), %r9\n mov 16(%rsi), %r10\n mov 24(%rsi), %r11\n"
                 " mov %r8, (%rdi)\n mov %r9, 8(%rdi)\n mov %r10, 16(%rdi)\n mov %r11, 24(%rdi)\n"
                 " lea 32(%rsi), %rsi\n lea 32(%rdi), %rdi\n dec %ecx\n jnz 2b",
    "rep stosb": "xor %eax, %eax\n " + DST + " mov $4096, %ecx\n rep stosb",
    "rep stosq": "xor %eax, %eax\n " + DST + " mov $512, %ecx\n rep stosq",
    "empty": "nop",
}


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, form in FORMS.items():
            body = f"\n mov ${n}, %r12d\n1:\n {form}\n dec %r12d\n jnz 1b\n xor %eax, %eax\n jmp exit_with_eax\n"
            d = Path(tmp) / name.replace(" ", "_")
            d.mkdir()
            elf = build_guest(d, "copy", body, ring0=True)
            with Machine(VmConfig(mem_mib=64)) as m:
                m.boot_pvh(elf)
                t = time.monotonic()
                r = m.run(timeout=600)
                dt = time.monotonic() - t
            if r.kind != "debug-exit" or r.status != 0:
                raise SystemExit(f"{name}: the guest stopped with {r}")
            print(f"{name:10s} {dt / n * 1e3:8.2f} ms per 4 KiB", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
