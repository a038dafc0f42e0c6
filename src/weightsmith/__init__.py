"""weightsmith: make large language models smaller and combine them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("weightsmith")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

from weightsmith.errors import WeightsmithError

__all__ = ["WeightsmithError", "__version__"]
