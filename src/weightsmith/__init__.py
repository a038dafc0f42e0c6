"""weightsmith: make large language models smaller and combine them."""

from weightsmith.errors import WeightsmithError

__all__ = ["WeightsmithError", "__version__"]


def __getattr__(name: str) -> str:
    """``__version__``, read from the package metadata on first use (the scan costs more
    than a short command's own imports)."""
    if name != "__version__":
        raise AttributeError(f"module 'weightsmith' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("weightsmith")
    except PackageNotFoundError:  # running from a source tree without install
        value = "0.0.0+source"
    globals()["__version__"] = value
    return value
