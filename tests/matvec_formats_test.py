"""experiments/speed/matvec_formats.py: every weight format computes the float32 product (within
its format's rounding), and the script runs end to end at a tiny size."""

import json

import jax.numpy as jnp
import numpy as np

from experiments.speed import matvec_formats


def test_every_format_computes_the_float32_product():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((256, 128)).astype(np.float32) / 16
  x = rng.standard_normal((1, 256)).astype(np.float32)
  exact = x.astype(np.float64) @ w.astype(np.float64)  # [1, 128]
  tolerance = {"float32": 1e-5, "bfloat16": 1e-2, "int8": 3e-2}  # normwise, relative
  products = matvec_formats.formats(jnp.asarray(w))
  assert len(products) == 7
  for name, (product, weights) in products.items():
    got = np.asarray(product(jnp.asarray(x), weights), np.float64)
    assert got.shape == (1, 128), name
    error = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert error < tolerance[name.split()[0]], (name, error)


def test_script_writes_one_row_per_format(tmp_path):
  out = tmp_path / "formats.json"
  assert matvec_formats.main(["--features", "128", "--steps", "2", "--reps", "1",
                              "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert [r["format"] for r in result["rows"]] == list(matvec_formats.formats(
      jnp.ones((8, 8), jnp.float32)))
  assert all(r["seconds_per_call"] > 0 for r in result["rows"])
