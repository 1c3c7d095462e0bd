"""Longhaul for Python applications: ``Client`` submits tasks to a Longhaul API and
follows them. (Task handlers are written with ``services.worker.sdk``.)"""

from longhaul.client import Client, LonghaulError, RetryPolicy

__all__ = ["Client", "LonghaulError", "RetryPolicy"]
