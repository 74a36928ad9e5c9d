"""meshgate: a Python microservices platform in one package."""

from meshgate.errors import ConfigError, MeshgateError

__version__ = "0.1.0.dev0"

__all__ = ["ConfigError", "MeshgateError", "__version__"]
