"""The click command line: thin wrappers over weightsmith's public functions."""
