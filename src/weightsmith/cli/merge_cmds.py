"""Commands of the `merge` group (registered on import by weightsmith.cli.main)."""
