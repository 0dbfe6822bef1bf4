"""``exitless guest fetch``: Debian's cloud kernel, its modules and busybox into the cache.

Progress (apt, download, unpacking, depmod) goes to stderr when it is a terminal; stdout
carries the paths.
"""
from __future__ import annotations

from .progress import stderr_progress


def register(sub) -> None:
    """Add ``guest`` (and ``guest fetch``) to the top-level subparsers."""
    guest = sub.add_parser("guest", help="the Linux guest (kernel, modules, busybox)")
    gsub = guest.add_subparsers(dest="guest_command", required=True)
    fetch = gsub.add_parser("fetch", help="download Debian's cloud kernel and busybox into the cache")
    fetch.add_argument("--cache", help="cache directory (default $EXITLESS_CACHE or ~/.cache/exitless/guest)")
    fetch.add_argument("--kernel", help="use this kernel instead of Debian's")
    fetch.add_argument("--modules", help="its modules (lib/modules/<kver> or its root); needs --kernel")
    fetch.add_argument("--busybox", help="use this static busybox")
    fetch.add_argument("--refresh", action="store_true", help="ask apt for newer versions")
    fetch.set_defaults(func=cmd_guest_fetch)


def cmd_guest_fetch(args) -> int:
    from ..guest.fetch import fetch_guest

    a = fetch_guest(args.cache, kernel=args.kernel, modules_dir=args.modules, busybox=args.busybox,
                    refresh=args.refresh, progress=stderr_progress())
    print(f"kernel:  {a.vmlinuz} ({a.kernel_version})")
    print(f"modules: {a.modules_dir or '-'}")
    print(f"busybox: {a.busybox}")
    for pkg, ver in a.versions.items():
        print(f"  {pkg} {ver}")
    return 0
