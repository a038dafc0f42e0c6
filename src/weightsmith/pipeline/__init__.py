"""Recipes for CI batch jobs: a YAML file of steps (merge, prune, quantize, distill, eval, ...)
run in order, each step's output feeding the next, resumable, with quality gates.

Each step is one CLI command with the same options, so the recipe language has no second list
of options to drift from the commands: the runner builds the command line from the step's
mapping and lets click validate it before any work starts.
"""

from weightsmith.pipeline.gates import GateResult, check_gates
from weightsmith.pipeline.recipe import Recipe, Step, load_recipe
from weightsmith.pipeline.runner import run_recipe

__all__ = ["GateResult", "Recipe", "Step", "check_gates", "load_recipe", "run_recipe"]
