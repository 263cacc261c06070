"""experiments/speed/matvec_formats.py: every weight format computes the float32 product (within
its format's rounding), and the script runs end to end at a tiny size."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.nn import fast_conv
from experiments.speed import matvec_formats


def test_every_format_computes_the_float32_product():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((256, 128)).astype(np.float32) / 16
  x = rng.standard_normal((1, 256)).astype(np.float32)
  exact = x.astype(np.float64) @ w.astype(np.float64)  # [1, 128]
  tolerance = {"float32": 1e-5, "bfloat16": 1e-2, "int8": 3e-2}  # normwise, relative
  products = matvec_formats.formats(jnp.asarray(w))
  assert len(products) == 10
  for name, (product, weights) in products.items():
    got = np.asarray(product(jnp.asarray(x), weights), np.float64)
    assert got.shape == (1, 128), name
    error = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert error < tolerance[name.split()[0]], (name, error)


def test_script_writes_one_row_per_format(tmp_path):
  out = tmp_path / "formats.json"
  assert matvec_formats.main(["--features", "128", "--steps", "2", "--rounds", "3",
                              "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  names = list(matvec_formats.formats(jnp.ones((8, 8), jnp.float32)))
  assert [(r["backend"], r["format"]) for r in result["rows"]] == (
      [("ynnpack", n) for n in names] + [("eigen", n) for n in names])
  for row in result["rows"]:
    assert len(row["seconds_per_call_rounds"]) == 3
    assert row["seconds_per_call"] == np.median(row["seconds_per_call_rounds"])


def test_backends_are_the_package_options_or_no_library_fusions(capsys):
  """'ynnpack' times what the sampler compiles; 'eigen' turns XLA's library fusions off; any
  other name is refused in one line."""
  assert matvec_formats.backend_options("ynnpack") == fast_conv.compiler_options()
  assert matvec_formats.backend_options("eigen") == {"xla_cpu_experimental_ynn_fusion_type": ""}
  with pytest.raises(SystemExit) as exit_info:
    matvec_formats.main(["--backends", "ynnpack,mkl"])
  assert exit_info.value.code == 2
  assert "--backends: expected ynnpack or eigen, got 'mkl'" in capsys.readouterr().err
