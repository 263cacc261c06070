"""diffmic-jax: DiffMIC (dual-granularity guided diffusion for medical images) in JAX/Flax.

The package is a house of wings, from the ground up (no import runs from a lower wing to a
higher one): platform < data < nn < diffusion < run < evaluation < training. The commands
stand at the door: `main` (train, eval, predict, summary), `convert` and `launch`.

The library API for downstream code keeps one stable path whichever wing holds it:

  from diffmic_jax import evaluate, sampler
  config, models, variables = diffmic_jax.load_run(workdir, checkpoint="best")

Each name imports its module on first use, so `import diffmic_jax` alone imports no JAX.
"""

import importlib

# Public name -> the module behind it, or "module:attribute" for a function.
_API = {
    "evaluate": "diffmic_jax.evaluation.evaluate",
    "sampler": "diffmic_jax.diffusion.sampler",
    "load_run": "diffmic_jax.evaluation.evaluate:load_run",
}


def __getattr__(name: str):
  if name in _API:
    module, _, attribute = _API[name].partition(":")
    module = importlib.import_module(module)
    return getattr(module, attribute) if attribute else module
  raise AttributeError(f"module 'diffmic_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_API])
