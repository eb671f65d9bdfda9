"""The host: one per machine, owning sandboxes for the wrappers (``corral serve``)."""

from corral.host.host import Host, Hosted, HostError, SandboxNotFound
from corral.host.profiles import Profile, ProfileRegistry, UnknownProfileError

__all__ = [
    "Host",
    "HostError",
    "Hosted",
    "Profile",
    "ProfileRegistry",
    "SandboxNotFound",
    "UnknownProfileError",
]
