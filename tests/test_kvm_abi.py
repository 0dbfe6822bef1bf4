"""The ioctl numbers, constants and struct layouts match the kernel's own <linux/kvm.h>."""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from exitless.kvm import constants as C
from exitless.kvm import ioctls as I
from exitless.kvm import structs as S

HEADER = Path("/usr/include/linux/kvm.h")

STRUCTS = {
    "kvm_userspace_memory_region": S.kvm_userspace_memory_region, "kvm_regs": S.kvm_regs,
    "kvm_sregs": S.kvm_sregs, "kvm_fpu": S.kvm_fpu, "kvm_lapic_state": S.kvm_lapic_state,
    "kvm_msr_entry": S.kvm_msr_entry, "kvm_msrs": S.kvm_msrs, "kvm_cpuid_entry2": S.kvm_cpuid_entry2,
    "kvm_cpuid2": S.kvm_cpuid2, "kvm_ioeventfd": S.kvm_ioeventfd, "kvm_irqfd": S.kvm_irqfd,
    "kvm_enable_cap": S.kvm_enable_cap, "kvm_msi": S.kvm_msi, "kvm_irq_routing_entry": S.kvm_irq_routing_entry,
    "kvm_irq_routing": S.kvm_irq_routing, "kvm_pit_config": S.kvm_pit_config,
    "kvm_vcpu_events": S.kvm_vcpu_events, "kvm_translation": S.kvm_translation, "kvm_guest_debug": S.kvm_guest_debug,
    "kvm_xsave": S.kvm_xsave,
    # kvm_run is mirrored only up to its exit union: its fields are checked by offset below
    "kvm_stats_header": S.kvm_stats_header, "kvm_stats_desc": S.kvm_stats_desc, "kvm_segment": S.kvm_segment,
}
RUN_FIELDS = ["immediate_exit", "exit_reason", "if_flag", "cr8", "apic_base", "io.port", "io.count",
              "io.data_offset", "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
              "internal.suberror", "internal.ndata", "internal.data", "system_event.type", "system_event.ndata"]


def _header_values() -> dict[str, int]:
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>', 'int main(void) {']
    for name in I.ALL:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    for name in dir(C):
        if name.startswith("KVM_") and isinstance(getattr(C, name), int):
            lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    for name in STRUCTS:
        lines.append(f'printf("sizeof {name} %lu\\n", (unsigned long)sizeof(struct {name}));')
    for f in RUN_FIELDS:
        lines.append(f'printf("offsetof kvm_run.{f} %lu\\n", (unsigned long)offsetof(struct kvm_run, {f}));')
    lines.append("return 0; }")
    return "\n".join(lines)


def _ctypes_offset(path: str) -> int:
    if "." in path:
        union, field = path.split(".")
        sub = dict(S._run_exit_u._fields_)[union]
        return S.kvm_run.u.offset + getattr(sub, field).offset
    return getattr(S.kvm_run, path).offset


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    if not HEADER.exists() or not shutil.which("cc"):
        pytest.skip("needs linux-libc-dev and a C compiler (the setup step installs both)")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text(_header_values())
    subprocess.run(["cc", "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return dict((m.group(1), int(m.group(2))) for m in re.finditer(r"^(.*) (\d+)$", out, re.M))


def test_ioctl_numbers_match_header(header):
    for name, value in I.ALL.items():
        assert header[name] == value, f"{name}: ours {value:#x}, kernel {header[name]:#x}"


def test_constants_match_header(header):
    for name in dir(C):
        if name.startswith("KVM_") and isinstance(getattr(C, name), int):
            assert header[name] == getattr(C, name), name


def test_struct_layouts_match_header(header):
    for name, ctype in STRUCTS.items():
        assert header[f"sizeof {name}"] == ctypes.sizeof(ctype), name
    for f in RUN_FIELDS:
        assert header[f"offsetof kvm_run.{f}"] == _ctypes_offset(f), f
