"""The host: one per machine, owning sandboxes for the wrappers (``corral serve``)."""

from corral.host.events import STARTED, STOPPED, EventFeed, HostEvent
from corral.host.host import Host, Hosted, HostError, SandboxNotFound
from corral.host.profiles import Profile, ProfileRegistry, UnknownProfileError

__all__ = [
    "STARTED",
    "STOPPED",
    "EventFeed",
    "Host",
    "HostError",
    "HostEvent",
    "Hosted",
    "Profile",
    "ProfileRegistry",
    "SandboxNotFound",
    "UnknownProfileError",
]
