"""Commands of the `compress` group for qat (registered on import by weightsmith.cli.main)."""
