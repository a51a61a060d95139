"""peerd: a peer-to-peer compute-sharing daemon."""

__version__ = "0.1.0"
