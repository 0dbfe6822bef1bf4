"""Build the C extensions (GIL-free spinning for sidecores; the virtqueue/virtio-blk fast path) and the guest kit.

Everything else is declared in pyproject.toml.
"""
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildWithGuestKit(build_py):
    """Build guestkit/ with make and ship the ELF inside the package (exitless/_guest/)."""

    def run(self):
        src = HERE / "guestkit"
        if (src / "Makefile").exists() and shutil.which("make"):
            subprocess.run(["make", "-C", str(src)], check=True)
            dest = HERE / "exitless" / "_guest"
            dest.mkdir(exist_ok=True)
            shutil.copy2(src / "build" / "guestkit.elf", dest / "guestkit.elf")
        super().run()


setup(
    ext_modules=[Extension("exitless.sidecore._spin", ["exitless/sidecore/_spin.c"], extra_compile_args=["-O2"],
                           depends=["exitless/cpu_relax.h"]),
                 Extension("exitless.devices.virtio._vring", ["exitless/devices/virtio/_vring.c"],
                           extra_compile_args=["-O2", "-Wall"], depends=["exitless/cpu_relax.h"])],
    cmdclass={"build_py": BuildWithGuestKit},
    package_data={"exitless": ["_guest/*.elf"]},
)
