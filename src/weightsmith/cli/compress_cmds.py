"""Commands of the `compress` group (registered on import by weightsmith.cli.main)."""
