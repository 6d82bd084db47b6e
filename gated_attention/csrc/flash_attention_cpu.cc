// Causal flash attention on the CPU, float32, forward and backward, as XLA FFI handlers: the
// `cpu_flash` implementation of gated_attention/attention.py, which builds this file on first use
// (gated_attention/cpu_kernel.py) and states the layout and the math.
//
//   q, out, dq:  [batch, length, heads, head_dim]
//   k, v, dk, dv: [batch, length, kv_heads, head_dim]; query head h reads KV head h / group
//   lse:          [batch, heads, length], each row's log-sum-exp of its scaled logits
//
// One work item is one sequence's KV head with every query head that reads it, so the items
// write disjoint parts of every output and run on XLA's intra-op threads without locks. Queries
// go in blocks of kBlock rows against the keys up to the block's end (FlashAttention-2's order,
// with whole rows: the length fits a row buffer); the products run through one register-tiled
// kernel on fixed-width vectors (GCC/Clang vector extensions, whatever SIMD -march=native gives).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 64;  // Query rows per block.
// Keys after a query: below every finite logit, and Exp maps it to exactly 0.
constexpr float kMasked = -std::numeric_limits<float>::infinity();

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
inline Vec Splat(float x) { return Vec{} + x; }
inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp(x) to about 2 ulp: 2^n exp(r) with n = round(x / ln 2) and a degree-6 polynomial for
// exp(r), |r| <= ln(2) / 2; 0 below -87.3 (where float32's exp leaves the normal range).
inline Vec Exp(Vec x) {
  const Vec clamped = x < Splat(-87.3f) ? Splat(-87.3f) : (x > Splat(88.f) ? Splat(88.f) : x);
  const Vec rounding = Splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer.
  const Vec n = (clamped * 1.44269504f + rounding) - rounding;
  const Vec r = clamped - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts.
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IntVec exponent = (__builtin_convertvector(n, IntVec) + 127) << 23;
  Vec power;  // 2^n, from its bits.
  std::memcpy(&power, &exponent, sizeof(power));
  return x < Splat(-87.3f) ? Splat(0.f) : p * power;
}

inline float Max(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline float Sum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// C[m, n] (+)= sum_k A(m, k) B[k, n] on a kRows x (kVecs * kLanes) tile of C; A(m, k) is
// a[m * am + k * ak] (so A may be read transposed), B and C are row-major.
template <int kRows, int kVecs>
inline void Tile(int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  Vec acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v)
      acc[r][v] = accumulate ? Load(c + r * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < K; ++k) {
    Vec row[kVecs];
    for (int v = 0; v < kVecs; ++v) row[v] = Load(b + k * ldb + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float scalar = a[r * am + k * ak];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += scalar * row[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) Store(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int kVecs>
void TileColumns(int64_t M, int64_t K, const float* a, int64_t am, int64_t ak, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    Tile<4, kVecs>(K, a + m * am, am, ak, b, ldb, c + m * ldc, ldc, accumulate);
  for (; m < M; ++m)
    Tile<1, kVecs>(K, a + m * am, am, ak, b, ldb, c + m * ldc, ldc, accumulate);
}

// C [M, N] (+)= A(M, K) B [K, N], N a multiple of kLanes (see Tile for the operands).
void MatMul(int64_t M, int64_t N, int64_t K, const float* a, int64_t am, int64_t ak,
            const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 4 * kLanes <= N; n += 4 * kLanes)
    TileColumns<4>(M, K, a, am, ak, b + n, ldb, c + n, ldc, accumulate);
  for (; n + 2 * kLanes <= N; n += 2 * kLanes)
    TileColumns<2>(M, K, a, am, ak, b + n, ldb, c + n, ldc, accumulate);
  for (; n < N; n += kLanes)
    TileColumns<1>(M, K, a, am, ak, b + n, ldb, c + n, ldc, accumulate);
}

// Runs work(i) for i < count on the calling thread and XLA's intra-op threads. The caller waits
// only for items already claimed: a pool task that starts after the last claim returns at once,
// so no thread ever waits for a task the pool has not started (two kernels may run at once).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, F work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto run = [state, count, work]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      work(i);
      if (state->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == count; });
}

struct Shape {
  int64_t batch, length, heads, kv_heads, head_dim;
  int64_t padded_dim, padded_length;  // Rounded up to whole vectors.

  Shape(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k)
      : batch(q[0]), length(q[1]), heads(q[2]), kv_heads(k[2]), head_dim(q[3]),
        padded_dim(RoundUp(q[3], kLanes)), padded_length(RoundUp(q[1], kLanes)) {}
  int64_t group() const { return heads / kv_heads; }
  // Whether x is [batch, length, num_heads, head_dim].
  bool Fits(ffi::Span<const int64_t> x, int64_t num_heads) const {
    return x.size() == 4 && x[0] == batch && x[1] == length && x[2] == num_heads &&
           x[3] == head_dim;
  }
  // The attention.py wrapper checks its inputs; this guards the kernel's reads of its own.
  ffi::Error Check(ffi::Span<const int64_t> k, ffi::Span<const int64_t> v) const {
    if (kv_heads <= 0 || heads % kv_heads || !Fits(k, kv_heads) || !Fits(v, kv_heads))
      return ffi::Error::InvalidArgument(
          "flash_attention_cpu: q [batch, length, heads, head_dim] and k, v [batch, length, "
          "kv_heads, head_dim] with kv_heads dividing heads expected");
    return ffi::Error::Success();
  }
  // Offset of row t of head h of sequence b in a [batch, length, num_heads, head_dim] array.
  int64_t At(int64_t b, int64_t t, int64_t h, int64_t num_heads) const {
    return ((b * length + t) * num_heads + h) * head_dim;
  }
};

// x [rows, dp] -> out [dp, padded_length], a vector's worth of columns at a time.
void Transpose(const Shape& s, const std::vector<float>& x, std::vector<float>& out) {
  const int64_t dp = s.padded_dim, lp = s.padded_length;
  out.assign(dp * lp, 0.f);
  for (int64_t j0 = 0; j0 < s.length; j0 += kLanes)
    for (int64_t d = 0; d < dp; ++d)
      for (int64_t j = j0; j < std::min(j0 + kLanes, s.length); ++j)
        out[d * lp + j] = x[j * dp + d];
}

// One sequence's KV head, zero-padded: k, v [length, dp]; kt, vt [dp, padded_length] (vt only
// for the backward pass).
struct KeyValues {
  std::vector<float> k, v, kt, vt;
  KeyValues(const Shape& s, const float* key, const float* value, int64_t b, int64_t h,
            bool transpose_v)
      : k(s.length * s.padded_dim, 0.f), v(s.length * s.padded_dim, 0.f) {
    const size_t bytes = s.head_dim * sizeof(float);
    for (int64_t j = 0; j < s.length; ++j) {
      std::memcpy(&k[j * s.padded_dim], key + s.At(b, j, h, s.kv_heads), bytes);
      std::memcpy(&v[j * s.padded_dim], value + s.At(b, j, h, s.kv_heads), bytes);
    }
    Transpose(s, k, kt);
    if (transpose_v) Transpose(s, v, vt);
  }
};

// Rows [row0, row0 + rows) of head h of sequence b, times scale, into out [rows, dp].
void GatherRows(const Shape& s, const float* x, int64_t b, int64_t h, int64_t row0, int64_t rows,
                float scale, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + s.At(b, row0 + r, h, s.heads);
    float* dst = out + r * s.padded_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) dst[d] = src[d] * scale;
    std::fill(dst + s.head_dim, dst + s.padded_dim, 0.f);
  }
}

void ScatterRows(const Shape& s, const float* rows_in, int64_t b, int64_t h, int64_t row0,
                 int64_t rows, float scale, float* x) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = rows_in + r * s.padded_dim;
    float* dst = x + s.At(b, row0 + r, h, s.heads);
    for (int64_t d = 0; d < s.head_dim; ++d) dst[d] = src[d] * scale;
  }
}

// Probabilities p [rows, width] (row stride padded_length) of scaled queries q [rows, dp] at
// rows row0.. against keys 0..width-1, causal. The backward pass gives the rows' log-sum-exp
// (lse_in); the forward pass computes it into lse_out.
void Probabilities(const Shape& s, const float* q, int64_t rows, int64_t row0, int64_t width,
                   const KeyValues& kv, float* p, const float* lse_in, float* lse_out) {
  const int64_t lp = s.padded_length;
  MatMul(rows, width, s.padded_dim, q, s.padded_dim, 1, kv.kt.data(), lp, p, lp, false);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * lp;
    std::fill(row + row0 + r + 1, row + width, kMasked);  // Keys after the query.
    float offset = lse_in ? lse_in[r] : kMasked;
    if (!lse_in)
      for (int64_t j = 0; j < width; j += kLanes) offset = std::max(offset, Max(Load(row + j)));
    Vec sum{};
    for (int64_t j = 0; j < width; j += kLanes) {
      const Vec e = Exp(Load(row + j) - offset);
      Store(row + j, e);
      sum += e;
    }
    if (!lse_in) {
      const float total = Sum(sum);
      for (int64_t j = 0; j < width; j += kLanes) Store(row + j, Load(row + j) / total);
      lse_out[r] = offset + std::log(total);
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() != 4 || k.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("flash_attention_cpu: q, k and v of rank 4 expected");
  const Shape s(q.dimensions(), k.dimensions());
  if (ffi::Error error = s.Check(k.dimensions(), v.dimensions()); error.failure()) return error;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.head_dim));
  ParallelFor(pool, s.batch * s.kv_heads, [&](int64_t item) {
    const int64_t b = item / s.kv_heads, kv_head = item % s.kv_heads;
    const KeyValues kv(s, k.typed_data(), v.typed_data(), b, kv_head, false);
    std::vector<float> q_rows(kBlock * s.padded_dim), p(kBlock * s.padded_length),
        out_rows(kBlock * s.padded_dim);
    for (int64_t h = kv_head * s.group(); h < (kv_head + 1) * s.group(); ++h)
      for (int64_t row0 = 0; row0 < s.length; row0 += kBlock) {
        const int64_t rows = std::min(kBlock, s.length - row0);
        const int64_t width = RoundUp(row0 + rows, kLanes);
        GatherRows(s, q.typed_data(), b, h, row0, rows, scale, q_rows.data());
        Probabilities(s, q_rows.data(), rows, row0, width, kv, p.data(), nullptr,
                      lse->typed_data() + (b * s.heads + h) * s.length + row0);
        MatMul(rows, s.padded_dim, std::min(width, s.length), p.data(), s.padded_length, 1,
               kv.v.data(), s.padded_dim, out_rows.data(), s.padded_dim, false);
        ScatterRows(s, out_rows.data(), b, h, row0, rows, 1.f, out->typed_data());
      }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (q.dimensions().size() != 4 || k.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("flash_attention_cpu: q, k and v of rank 4 expected");
  const Shape s(q.dimensions(), k.dimensions());
  if (ffi::Error error = s.Check(k.dimensions(), v.dimensions()); error.failure()) return error;
  const auto lse_shape = lse.dimensions();
  if (!s.Fits(out.dimensions(), s.heads) || !s.Fits(d_out.dimensions(), s.heads) ||
      lse_shape.size() != 3 || lse_shape[0] != s.batch || lse_shape[1] != s.heads ||
      lse_shape[2] != s.length)
    return ffi::Error::InvalidArgument(
        "flash_attention_cpu: out and d_out shaped as q, lse [batch, heads, length] expected");
  const float scale = 1.f / std::sqrt(static_cast<float>(s.head_dim));
  ParallelFor(pool, s.batch * s.kv_heads, [&](int64_t item) {
    const int64_t b = item / s.kv_heads, kv_head = item % s.kv_heads;
    const int64_t dp = s.padded_dim, lp = s.padded_length;
    const KeyValues kv(s, k.typed_data(), v.typed_data(), b, kv_head, true);
    std::vector<float> q_rows(kBlock * dp), d_out_rows(kBlock * dp), out_rows(kBlock * dp),
        dq_rows(kBlock * dp), p(kBlock * lp), d_logits(kBlock * lp), delta(kBlock),
        dk_sum(s.length * dp, 0.f), dv_sum(s.length * dp, 0.f);
    for (int64_t h = kv_head * s.group(); h < (kv_head + 1) * s.group(); ++h)
      for (int64_t row0 = 0; row0 < s.length; row0 += kBlock) {
        const int64_t rows = std::min(kBlock, s.length - row0);
        const int64_t width = RoundUp(row0 + rows, kLanes), keys = std::min(width, s.length);
        GatherRows(s, q.typed_data(), b, h, row0, rows, scale, q_rows.data());
        GatherRows(s, d_out.typed_data(), b, h, row0, rows, 1.f, d_out_rows.data());
        GatherRows(s, out.typed_data(), b, h, row0, rows, 1.f, out_rows.data());
        for (int64_t r = 0; r < rows; ++r) {
          Vec sum{};
          for (int64_t d = 0; d < dp; d += kLanes)
            sum += Load(&d_out_rows[r * dp + d]) * Load(&out_rows[r * dp + d]);
          delta[r] = Sum(sum);
        }
        Probabilities(s, q_rows.data(), rows, row0, width, kv, p.data(),
                      lse.typed_data() + (b * s.heads + h) * s.length + row0, nullptr);
        // dV += P^T dO; dS = P (dO V^T - delta); dQ = scale dS K; dK += dS^T (scale Q).
        MatMul(keys, dp, rows, p.data(), 1, lp, d_out_rows.data(), dp, dv_sum.data(), dp, true);
        MatMul(rows, width, dp, d_out_rows.data(), dp, 1, kv.vt.data(), lp, d_logits.data(), lp,
               false);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < width; j += kLanes) {
            float* at = &d_logits[r * lp + j];
            Store(at, Load(&p[r * lp + j]) * (Load(at) - delta[r]));
          }
        MatMul(rows, dp, keys, d_logits.data(), lp, 1, kv.k.data(), dp, dq_rows.data(), dp,
               false);
        MatMul(keys, dp, rows, d_logits.data(), 1, lp, q_rows.data(), dp, dk_sum.data(), dp,
               true);
        ScatterRows(s, dq_rows.data(), b, h, row0, rows, scale, dq->typed_data());
      }
    for (int64_t j = 0; j < s.length; ++j) {
      std::memcpy(dk->typed_data() + s.At(b, j, kv_head, s.kv_heads), &dk_sum[j * dp],
                  s.head_dim * sizeof(float));
      std::memcpy(dv->typed_data() + s.At(b, j, kv_head, s.kv_heads), &dv_sum[j * dp],
                  s.head_dim * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedAttentionFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedAttentionFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
