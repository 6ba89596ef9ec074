"""Fabric entry point: the same tasks as tasks.py, so `fab -H host <task>` runs them on the host.

Steps forward themselves to the host's project folder (see `fab -H host deploy`); deploy and
results run here and move files over the same SSH settings.
"""
from tasks import ns  # noqa: F401  (fab looks for `ns` or module-level tasks)
