"""molt worker shim: loads a WSGI/ASGI app and serves it on sockets inherited from the molt master.

See worker_shim/README.md for the environment, the protocol and the exit codes.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
