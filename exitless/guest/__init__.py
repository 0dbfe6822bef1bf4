"""Getting a Linux guest (kernel, modules, busybox) onto the host without installing it.

See :mod:`exitless.guest.fetch`.
"""
from __future__ import annotations

from exitless.guest.fetch import GuestArtifacts, GuestFetchError, default_cache_dir, fetch_guest

__all__ = ["GuestArtifacts", "GuestFetchError", "default_cache_dir", "fetch_guest"]
