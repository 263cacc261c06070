"""The CPU product with bfloat16 weights (`bf16_matvec`) against float64 NumPy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.nn import bf16_matvec
from diffmic_jax.platform import errors

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU handler")


def _operands(lead, n, k, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(lead + (k,)).astype(np.float32)
  w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32)).astype(jnp.bfloat16)
  return x, w


def _assert_product(got, x, w):
  """Against the float64 product with the bfloat16 weights' exact values. Float32 products and
  sums of k terms err by at most about k·2⁻²⁴·Σ|x||w| (far less in practice: 2⁻¹⁸ bounds it
  for these k ≤ 6144); an input rounded to bfloat16 (2⁻⁹) or any wrong index would not."""
  w64 = np.asarray(w.astype(jnp.float32), np.float64)
  x64 = np.asarray(x, np.float64)
  expected = x64 @ w64
  bound = 2.0 ** -18 * (np.abs(x64) @ np.abs(w64))
  assert got.shape == expected.shape and got.dtype == np.float32
  assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound)


# Inputs off every block size (4 rows per pass, 256-row chunks shared by 2 threads), several
# leading axes, one output.
@pytest.mark.parametrize("lead,n,k", [((1,), 600, 4096), ((3,), 130, 1031), ((2, 5), 257, 64),
                                      ((1,), 7, 5), ((4,), 1, 6144)])
def test_product_equals_float64(lead, n, k):
  x, w = _operands(lead, n, k)
  _assert_product(np.asarray(jax.jit(bf16_matvec.matvec)(x, w)), x, w)


def test_product_under_vmap_is_the_product_of_each_row():
  x, w = _operands((6, 1), 300, 512, seed=1)
  got = jax.jit(jax.vmap(bf16_matvec.matvec, in_axes=(0, None)))(x, w)
  assert got.shape == (6, 1, 300)
  for s in range(6):
    _assert_product(np.asarray(got[s]), x[s], w)


def test_the_product_reads_the_rounded_weights_not_a_float32_copy():
  x, w = _operands((1,), 64, 256, seed=2)
  got = np.asarray(bf16_matvec.matvec(x, w))
  np.testing.assert_allclose(got, np.asarray(bf16_matvec.reference(x, w)), rtol=1e-4, atol=1e-4)


def test_bad_operands_are_refused():
  x, w = _operands((1,), 8, 32)
  with pytest.raises(ValueError, match="x float32 and w bfloat16"):
    bf16_matvec.matvec(x, w.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"x \[..., K\] and w \[K, N\]"):
    bf16_matvec.matvec(x[:, :16], w)


def test_the_library_is_compiled_once_and_kept(tmp_path):
  path = bf16_matvec.compile_library(directory=str(tmp_path))
  stamp = os.stat(path).st_mtime_ns
  assert bf16_matvec.compile_library(directory=str(tmp_path)) == path
  assert os.stat(path).st_mtime_ns == stamp
  assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_a_missing_compiler_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(errors.UserError, match="diffusion.sampler_weights='bfloat16'.*needs a "
                                             "C\\+\\+ compiler.*no-such-compiler"):
    bf16_matvec.compile_library(directory=str(tmp_path))


def test_a_failed_compile_leaves_no_library_behind(tmp_path, monkeypatch):
  monkeypatch.setenv("CXXFLAGS", "-include no_such_header_anywhere.h")
  with pytest.raises(errors.UserError, match="compiling .*bf16_matvec.cc .* failed: .*"
                                             "no_such_header_anywhere.h") as raised:
    bf16_matvec.compile_library(directory=str(tmp_path))
  assert "\n" not in str(raised.value)  # one line
  assert os.listdir(tmp_path) == []


def test_the_result_does_not_depend_on_which_thread_ran_which_chunk():
  """24 chunks claimed by 2 threads in whatever order: the partials are added in chunk order."""
  x, w = _operands((1,), 512, 6144, seed=3)
  fn = jax.jit(bf16_matvec.matvec)
  first = np.asarray(fn(x, w))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(fn(x, w)), first)


def test_cxxflags_make_their_own_library(tmp_path, monkeypatch):
  plain = bf16_matvec.compile_library(directory=str(tmp_path))
  monkeypatch.setenv("CXXFLAGS", "-O2")
  assert bf16_matvec.compile_library(directory=str(tmp_path)) != plain
  assert len(os.listdir(tmp_path)) == 2
