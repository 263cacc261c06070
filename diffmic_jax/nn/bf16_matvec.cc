// out[..., n] = Σ_k x[..., k] · W[k, n] with W [K, N] in bfloat16 (Flax's kernel layout), x and
// out in float32: an XLA FFI handler for the CPU, compiled on first use by bf16_matvec.py
// (-O3 -march=native).
//
// Why: at one image the sampler's two F × F products read their weights from memory at every
// step, so halving the bytes halves the step if the product streams the narrow weights at
// memory speed, which XLA's CPU dots do not (experiments/speed/matvec_formats.py).
//
// How: W is read once, row after row, in chunks of rows shared by the calling thread and XLA's
// intra-op thread pool. Each chunk adds x[k]·W[k, :] for its rows into its own float32 partial
// sum (four rows per pass over the partial, which stays in L1); the caller then adds the
// partials in chunk order. So the result does not depend on which thread ran which chunk, and
// every product is float32 arithmetic on the exact values of the bfloat16 weights. The loops
// are plain C++ that the compiler vectorises for the CPU at hand (AVX-512, AVX2, NEON, ...):
// on a 2-vCPU AMD Zen 4 they stream the weights as fast as a plain sum over them.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerChunk = 256;  // of W: 3 MB of a 6144-wide matrix

inline float Bf16ToF32(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// partial[r, :] += Σ_{k in [lo, hi)} x[r, k] · W[k, :] for every row r of x; partial [m, n].
void ChunkProduct(const float* x, const uint16_t* w, float* partial, int64_t m, int64_t n,
                  int64_t k, int64_t lo, int64_t hi) {
  int64_t i = lo;
  // Four rows of W (4 × 12 KB at n = 6144) stay in cache while every row of x uses them.
  for (; i + 4 <= hi; i += 4) {
    const uint16_t* w0 = w + i * n;
    const uint16_t* w1 = w0 + n;
    const uint16_t* w2 = w1 + n;
    const uint16_t* w3 = w2 + n;
    for (int64_t r = 0; r < m; ++r) {
      const float* x_row = x + r * k;
      const float x0 = x_row[i], x1 = x_row[i + 1], x2 = x_row[i + 2], x3 = x_row[i + 3];
      float* acc = partial + r * n;
      for (int64_t c = 0; c < n; ++c) {
        acc[c] += Bf16ToF32(w0[c]) * x0 + Bf16ToF32(w1[c]) * x1 + Bf16ToF32(w2[c]) * x2 +
                  Bf16ToF32(w3[c]) * x3;
      }
    }
  }
  for (; i < hi; ++i) {
    const uint16_t* wi = w + i * n;
    for (int64_t r = 0; r < m; ++r) {
      const float xi = x[r * k + i];
      float* acc = partial + r * n;
      for (int64_t c = 0; c < n; ++c) acc[c] += Bf16ToF32(wi[c]) * xi;
    }
  }
}

// Work shared by the caller and the pool's threads: chunks are claimed with an atomic counter,
// so the caller finishes alone if no pool thread is free; a task that starts after the call
// returned finds no chunk left and touches nothing but this (shared, still alive) state.
struct Job {
  const float* x;
  const uint16_t* w;
  std::vector<float> partials;  // [num_chunks, m, n], zeros until its chunk runs
  int64_t m, n, k, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      ChunkProduct(x, w, partials.data() + c * m * n, m, n, k, c * kRowsPerChunk,
                   std::min(k, (c + 1) * kRowsPerChunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Bf16Matvec(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> out) {
  if (x.element_type() != ffi::F32 || w.element_type() != ffi::BF16 ||
      out->element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("bf16_matvec: expected x float32, W bfloat16");
  }
  auto x_dims = x.dimensions();
  auto w_dims = w.dimensions();
  if (x_dims.size() < 1 || w_dims.size() < 2) {
    return ffi::Error::InvalidArgument("bf16_matvec: expected x [..., K] and W [..., K, N]");
  }
  const int64_t k = x_dims.back();
  const int64_t n = w_dims.back();
  if (w_dims[w_dims.size() - 2] != k || static_cast<int64_t>(w.element_count()) != k * n) {
    return ffi::Error::InvalidArgument("bf16_matvec: W must be [1, ..., K, N] with x's K");
  }
  const int64_t m = k == 0 ? 0 : static_cast<int64_t>(x.element_count()) / k;
  float* result = static_cast<float*>(out->untyped_data());
  if (m == 0 || n == 0 || k == 0) {
    std::fill(result, result + m * n, 0.f);
    return ffi::Error::Success();
  }
  auto job = std::make_shared<Job>();
  job->x = static_cast<const float*>(x.untyped_data());
  job->w = static_cast<const uint16_t*>(w.untyped_data());
  job->m = m;
  job->n = n;
  job->k = k;
  job->num_chunks = (k + kRowsPerChunk - 1) / kRowsPerChunk;
  job->partials.resize(job->num_chunks * m * n);
  const int64_t helpers = std::min(pool.num_threads() - 1, job->num_chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Run(); });
  job->Run();
  while (job->done.load(std::memory_order_acquire) < job->num_chunks) {
    std::this_thread::yield();
  }
  // The partials in chunk order: the same sums whichever thread computed each chunk.
  std::copy(job->partials.begin(), job->partials.begin() + m * n, result);
  for (int64_t c = 1; c < job->num_chunks; ++c) {
    const float* partial = job->partials.data() + c * m * n;
    for (int64_t j = 0; j < m * n; ++j) result[j] += partial[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffmicBf16Matvec, Bf16Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
