"""fedcl: a Ray-distributed simulator for federated continual learning on Flower strategies."""

from fedcl.errors import ConfigError, DatasetError, FedclError

__version__ = "0.1.0"


def run(*args, **kwargs):  # noqa: ANN002, ANN003 - re-exported lazily (ray/torch import slowly)
    """Run one experiment; see `fedcl.api.run`."""
    from fedcl.api import run as _run

    return _run(*args, **kwargs)


__all__ = ["ConfigError", "DatasetError", "FedclError", "run", "__version__"]
