"""Commands of the `eval` group (registered on import by weightsmith.cli.main)."""
