"""CARD diffusion with a prior mean (the math of DiffMIC), REFERENCE.md §5.

Indices are 0-based as in the official code: β_i = linspace(β_1, β_T, T)[i], ᾱ_i = Π_{s≤i} α_s,
so index 0 is already one noising step. All functions are pure; shapes use B (batch) and C
(classes).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """Noise schedule tables, each [T] float32."""

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array  # ᾱ_i

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def _fma32(a, b, c):
  """float32 fused multiply-add a·b + c with a single rounding, elementwise (numpy).

  The product of two float32 values is exact in float64; the float64 sum is made round-to-odd
  (TwoSum error, then the next odd neighbour when inexact) so that the final rounding to float32
  is the only one that counts (Boldo and Melquiond, 2008).
  """
  a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
  product = a * b
  total = product + c
  shifted = total - product
  err = (product - (total - shifted)) + (c - shifted)
  inexact_even = (err != 0) & (total.view(np.int64) % 2 == 0)
  total = np.where(inexact_even, np.nextafter(total, np.where(err > 0, np.inf, -np.inf)), total)
  return total.astype(np.float32)


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps) in float32 on CPU, bit for bit. -> [steps] float32.

  ATen's CPU kernel works in float32 from both ends: step = (end − start)/(steps − 1),
  value_i = start + step·i for i < steps//2, else end − step·(steps − 1 − i); PyTorch's x86
  builds (AVX2 and AVX-512 kernels) contract each of these to one fused multiply-add.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32])
  step = np.float32(end32 - start32) / np.float32(steps - 1)
  i = np.arange(steps)
  low = i < steps // 2
  count = np.where(low, i, steps - 1 - i).astype(np.float32)
  return _fma32(np.where(low, step, -step), count, np.where(low, start32, end32))


def _float32_tables(num_timesteps, beta_start, beta_end):
  """The official tables: torch.linspace β, α = 1 − β and ᾱ = cumprod(α), all float32.

  torch's CPU cumprod multiplies in float64 and rounds each prefix product to float32.
  """
  betas = _torch_linspace_float32(beta_start, beta_end, num_timesteps)
  alphas = np.float32(1.0) - betas
  return betas, alphas, np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _float64_tables(num_timesteps, beta_start, beta_end):
  """β, α and ᾱ computed in float64 (rounded to float32 only when stored)."""
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  alphas = 1.0 - betas
  return betas, alphas, np.cumprod(alphas)


# diffusion.schedule_dtype: the precision the tables are built in (they are stored as float32).
SCHEDULE_DTYPES = {"float32": _float32_tables, "float64": _float64_tables}


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02, dtype: str = "float32") -> Schedule:
  """Linear β schedule (official: linear, 1e-4..0.02), stored as float32.

  Args:
    num_timesteps: T.
    beta_start, beta_end: β_0 and β_{T−1}.
    dtype: 'float32' builds β, α, ᾱ exactly as the official PyTorch code does (float32
      torch.linspace, 1 − β and cumprod; bit for bit with torch on x86 CPUs); 'float64'
      builds them in float64 and rounds once (1 − ᾱ_1 then differs by 2.7e-4 relative, and
      the last reverse steps divide by it).
  """
  if dtype not in SCHEDULE_DTYPES:
    raise ValueError(f"unknown schedule dtype {dtype!r}; choose from {sorted(SCHEDULE_DTYPES)}")
  tables = SCHEDULE_DTYPES[dtype](num_timesteps, beta_start, beta_end)
  return Schedule(*(jnp.asarray(a, jnp.float32) for a in tables))


def _at(table, t):
  """table[t] broadcast against [B, C] values: t [B] -> [B, 1], t [] -> []."""
  value = table[t]
  return value[..., None] if jnp.ndim(value) == 1 else value


def q_sample(schedule: Schedule, y0, prior_mean, t, noise):
  """Forward process with a prior mean (CARD), paper Eq. 2.

  y_t = √ᾱ_t·y₀ + (1 − √ᾱ_t)·μ + √(1 − ᾱ_t)·ε.

  Args:
    schedule: the noise schedule.
    y0: [B, C] clean label vectors (one-hot).
    prior_mean: [B, C] μ (softmax of the guidance logits).
    t: [B] integer timesteps.
    noise: [B, C] ε ~ N(0, I).

  Returns:
    [B, C] y_t.
  """
  sqrt_ab = jnp.sqrt(_at(schedule.alphas_cumprod, t))
  sqrt_1m_ab = jnp.sqrt(1.0 - _at(schedule.alphas_cumprod, t))
  return sqrt_ab * y0 + (1.0 - sqrt_ab) * prior_mean + sqrt_1m_ab * noise


def antithetic_timesteps(key, batch_size: int, num_timesteps: int):
  """Antithetic t (official): t' ~ U{0..T−1} of size ⌊B/2⌋+1, t = [t', T−1−t'][:B]. -> [B] int32."""
  half = jax.random.randint(key, (batch_size // 2 + 1,), 0, num_timesteps)
  return antithetic_pairs(half, batch_size, num_timesteps)


def antithetic_pairs(half, batch_size: int, num_timesteps: int):
  """The official pairing of a uniform draw t' [⌊B/2⌋+1]: t = [t', T−1−t'][:B] -> [B] int32."""
  return jnp.concatenate([half, num_timesteps - 1 - half])[:batch_size].astype(jnp.int32)


def diffusion_draws(key, batch_size: int, num_classes: int, num_timesteps: int,
                    cond_dropout: float = 0.0) -> dict:
  """Every random draw of one joint training step, from one key (the official step draws t
  and ε only; `drop` exists only with conditioning dropout, an option of ours).

  Args:
    key: the step's PRNG key.
    batch_size: B; num_classes: C; num_timesteps: T.
    cond_dropout: probability that an example's conditioning ŷ is hidden (0: no `drop`).

  Returns:
    {'t': [B] int32 antithetic timesteps (from the key's second half), 'e': [B, C] float32
    ε ~ N(0, I) shared by the three noising streams (from its first half), and with
    cond_dropout > 0 'drop': [B] bool (from fold_in(key, 2))}. A harness may pass its own
    pytree of the same structure to the step instead.
  """
  key_noise, key_t = jax.random.split(key)
  draws = {"t": antithetic_timesteps(key_t, batch_size, num_timesteps),
           "e": jax.random.normal(key_noise, (batch_size, num_classes), jnp.float32)}
  if cond_dropout > 0:
    draws["drop"] = jax.random.bernoulli(jax.random.fold_in(key, 2), cond_dropout, (batch_size,))
  return draws


def predict_y0(schedule: Schedule, y_t, prior_mean, eps_pred, t):
  """ŷ₀ = (y_t − (1 − √ᾱ_t)·μ − √(1−ᾱ_t)·ε̂)/√ᾱ_t, the inverse of `q_sample`. Shapes [B, C]."""
  sqrt_1m_ab = jnp.sqrt(1.0 - _at(schedule.alphas_cumprod, t))
  sqrt_ab = jnp.sqrt(1.0 - jnp.square(sqrt_1m_ab))  # official: √ᾱ recomputed from √(1−ᾱ)
  return (y_t - (1.0 - sqrt_ab) * prior_mean - sqrt_1m_ab * eps_pred) / sqrt_ab


def clip_y0(y0, clip: float):
  """ŷ₀ clipped to [−clip, clip] when clip > 0 (a static Python float), else unchanged. [B, C]."""
  return jnp.clip(y0, -clip, clip) if clip else y0


def posterior_step(schedule: Schedule, y_t, prior_mean, eps_pred, t, t_prev, noise,
                   clip: float = 0.0):
  """One reverse step y_t -> y_{t_prev} of the CARD sampler (§5.6), for any t_prev < t.

  With ᾱ' = ᾱ_t/ᾱ_{t_prev} and β' = 1 − ᾱ' (for t_prev = t−1 these are α_t and β_t):
  γ₀ = β'·√ᾱ_{t_prev}/(1−ᾱ_t), γ₁ = (1−ᾱ_{t_prev})·√ᾱ'/(1−ᾱ_t),
  γ₂ = 1 + (√ᾱ_t − 1)(√ᾱ' + √ᾱ_{t_prev})/(1−ᾱ_t), mean = γ₀ŷ₀ + γ₁y_t + γ₂μ,
  var = (1−ᾱ_{t_prev})/(1−ᾱ_t)·β'. Respaced chains use the same formula on the subsequence.

  Args:
    schedule: the noise schedule.
    y_t: [B, C]; prior_mean: [B, C] μ; eps_pred: [B, C] ε̂ = ε_θ(x, y_t, t, ŷ).
    t, t_prev: [] integer timesteps, t_prev < t.
    noise: [B, C] z ~ N(0, I).
    clip: if > 0, ŷ₀ is clipped to [−clip, clip] before it enters the mean (DDPM's
      clip_denoised; one-hot labels live in [0, 1]). 0 = off (official).

  Returns:
    ([B, C] y_{t_prev}, [B, C] ŷ₀ (clipped if asked)).
  """
  ab_t = schedule.alphas_cumprod[t]
  ab_prev = schedule.alphas_cumprod[t_prev]
  # Consecutive steps read α_t from the table, as the official code; respaced ones derive it.
  alpha = jnp.where(t_prev == t - 1, schedule.alphas[t], ab_t / ab_prev)
  beta = 1.0 - alpha
  y0_pred = clip_y0(predict_y0(schedule, y_t, prior_mean, eps_pred, t), clip)
  sqrt_ab_t = jnp.sqrt(ab_t)
  gamma0 = beta * jnp.sqrt(ab_prev) / (1.0 - ab_t)
  gamma1 = (1.0 - ab_prev) * jnp.sqrt(alpha) / (1.0 - ab_t)
  gamma2 = 1.0 + (sqrt_ab_t - 1.0) * (jnp.sqrt(alpha) + jnp.sqrt(ab_prev)) / (1.0 - ab_t)
  mean = gamma0 * y0_pred + gamma1 * y_t + gamma2 * prior_mean
  variance = (1.0 - ab_prev) / (1.0 - ab_t) * beta
  return mean + jnp.sqrt(variance) * noise, y0_pred


# diffusion.prior: the prior mean μ of a stream from its guidance probabilities [B, C].
PRIORS = {
    "fused": lambda probs: probs,  # μ = softmax(y) of the stream (official)
    "zero": jnp.zeros_like,  # μ = 0 (official --noise_prior)
}
# model.conditioning: the denoiser's conditioning ŷ, and its width in units of C.
CONDITIONINGS = {"prior": 1, "dual": 2}


def stream_inputs(prior: str, conditioning: str, logits: dict) -> dict:
  """Prior mean μ and conditioning ŷ of each noising stream from the guidance logits.

  Args:
    prior: a `PRIORS` key ('fused': μ_s = softmax(y_s); 'zero': μ = 0).
    conditioning: a `CONDITIONINGS` key ('prior': ŷ = softmax(y_s), official; 'dual':
      [softmax(y_g), softmax(y_l)] for every stream, the paper).
    logits: {'fused', 'global', 'local'}: [B, C] guidance logits.

  Returns:
    {stream: (μ [B, C], conditioning [B, C·width])} for streams 'fused', 'global', 'local'.
  """
  for value, options, name in ((prior, PRIORS, "prior"),
                               (conditioning, CONDITIONINGS, "conditioning")):
    if value not in options:
      raise ValueError(f"unknown {name} {value!r}; choose from {sorted(options)}")
  probs = {name: jax.nn.softmax(value.astype(jnp.float32), axis=-1)
           for name, value in logits.items()}
  dual = jnp.concatenate([probs["global"], probs["local"]], axis=-1)
  return {name: (PRIORS[prior](p), dual if conditioning == "dual" else p)
          for name, p in probs.items()}


def timestep_sequence(sampler: str, num_timesteps: int, num_steps: int) -> tuple[int, ...]:
  """Descending schedule indices visited by the sampler, ending at 0.

  Args:
    sampler: 'official_truncated' (N−1, …, 0 on the T-step table, as the official --test),
      'full' (T−1, …, 0) or 'respaced' (N indices evenly spaced over [0, T−1]).
    num_timesteps: T.
    num_steps: N (ignored by 'full').
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
  if sampler != "full" and not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"sampler {sampler!r}: steps must be in [1, {num_timesteps}], got {num_steps}")
  return SAMPLERS[sampler](num_timesteps, num_steps)


def _respaced(num_timesteps, num_steps):
  indices = np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(int))
  return tuple(int(i) for i in indices[::-1])


SAMPLERS = {
    "official_truncated": lambda total, n: tuple(range(n - 1, -1, -1)),
    "full": lambda total, n: tuple(range(total - 1, -1, -1)),
    "respaced": _respaced,
}
