"""A metering reverse proxy that sells AI endpoints as prepaid tokens."""

__version__ = "0.1.0"
