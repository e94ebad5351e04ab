"""The idlegrid release and the HTTP API version."""

__all__ = ["API_VERSION", "VERSION"]

VERSION = "0.3.0"
API_VERSION = "v1"
