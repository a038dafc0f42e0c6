"""Commands of the `distill` group (registered on import by weightsmith.cli.main)."""
