"""jaxdef's version, recorded with every result (``jaxdef.__version__``)."""

VERSION = "0.1.0"
