"""The service's own user-facing error: bad settings, a store it cannot use, a bad token."""

from __future__ import annotations

from stethoscope.errors import StethoscopeError


class ServiceError(StethoscopeError):
    """A problem with the service's settings or store that the user can fix (exit 2)."""
