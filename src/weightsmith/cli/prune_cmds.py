"""Commands of the `compress` group for prune (registered on import by weightsmith.cli.main)."""
