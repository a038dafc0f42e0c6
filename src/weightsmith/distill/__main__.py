"""``python -m weightsmith.distill ...`` == ``distill ...`` (for launchers that take a module:
``accelerate launch --multi_gpu --num_processes 2 -m weightsmith.distill --teacher ...``)."""

from weightsmith.cli.main import distill_cli

if __name__ == "__main__":
    distill_cli(prog_name="distill")
