"""The one exception hierarchy of Longhaul's shared code.

LonghaulError
├── ConfigError          invalid settings: the service stops before connecting
├── DependencyError      a dependency unreachable or too slow
│   └── StartTimeout     unreachable for longer than the start timeout
├── StartStopped         a stop signal while the start waited for a dependency
├── Refused              an operator's command that would destroy what is in use
└── MessageError         a message that cannot be processed (dead-lettered)
    ├── MalformedMessage not JSON or not of the schema
    └── UnknownVersion   a schema version this code does not read
"""

from __future__ import annotations


class LonghaulError(Exception):
    """Base of every exception Longhaul raises on purpose."""


class ConfigError(LonghaulError):
    """The settings are invalid; the message is one line for the operator."""


class DependencyError(LonghaulError):
    """RabbitMQ, Redis or PostgreSQL is unreachable or did not answer in time."""


class StartTimeout(DependencyError):
    """A dependency stayed unreachable for the whole start timeout."""


class StartStopped(LonghaulError):
    """SIGTERM or SIGINT came while the start waited for a dependency: the operator's
    stop, not the dependency's fault; the message is one line saying for what it waited."""


class Refused(LonghaulError):
    """The command would destroy something still in use; the message is one line saying
    what, and how to go on."""


class MessageError(LonghaulError):
    """A message that can never be processed; ``reason`` names why for the dead letter."""

    reason = "malformed"


class MalformedMessage(MessageError):
    reason = "malformed"


class UnknownVersion(MessageError):
    reason = "unknown_version"
