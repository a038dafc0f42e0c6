"""``python -m weightsmith`` runs the CLI."""

from weightsmith.cli.main import cli

if __name__ == "__main__":
    cli()
