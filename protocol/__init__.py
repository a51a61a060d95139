"""peerd's wire protocol, sans-IO.

Pure functions and frozen dataclasses only: this package never imports trio, libp2p or
TensorFlow (tests/unit/test_boundaries.py enforces it). See SPEC.md beside this file.
"""

PROTOCOL_VERSION = 2
