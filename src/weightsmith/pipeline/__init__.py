"""Recipes for CI batch jobs: a YAML file of steps (merge, prune, quantize, distill, eval, ...)
run in order, each step's output feeding the next, resumable, with quality gates.

Each step is one ``weightsmith`` command with the same options, so the recipe language has no
second list of options to drift from the commands. The pipeline never imports the command
layer: it asks the ``weightsmith`` program to turn each step's mapping into a checked command
line before any work starts (:mod:`weightsmith.pipeline.commands`), then runs each step as
that program in a child process.
"""

from weightsmith.pipeline.gates import GateResult, check_gates
from weightsmith.pipeline.recipe import Recipe, Step, load_recipe
from weightsmith.pipeline.runner import run_recipe

__all__ = ["GateResult", "Recipe", "Step", "check_gates", "load_recipe", "run_recipe"]
