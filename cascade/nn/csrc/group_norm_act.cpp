// Group normalisation + ADM's adaptive scale-shift + SiLU over channels-last bf16 maps, viewed as
// (B, N, C) rows (N = H·W, channels innermost). Four memory passes do the work that takes PyTorch's
// eager ops about twenty: one for the statistics, one for the output, and two in the backward pass. The
// backward recomputes z from x instead of storing it in the forward pass; its first pass writes
// dz = grad·SiLU'(z) (bf16) for the second, so SiLU's exponential and reciprocal run once per element of
// each direction. Everything is float32 inside; bf16 is rounded once, to nearest even, on the way out.
// The small per-(b, c) algebra (group statistics, AdaGN's coefficients and their gradients) runs here too,
// in double; cascade/nn/group_norm.py holds the same formulas in PyTorch ops for its fallback.
//
// Work is split over (example, block of rows) items with ATen's thread pool; each item sums at most
// kRowsPerItem rows in float32 and the items of an example are combined in double in a fixed order,
// so a result does not depend on how the items were scheduled.

// The narrowest headers that declare what is used, not torch/extension.h (all of libtorch's C++ API): this file is
// compiled on the user's machine the first time a run needs it (README, "Speed and scale": the build times).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kRowsPerItem = 512;

inline float load(const float* p) { return *p; }

// bf16 is handled as its raw bits (uint16_t): the compiler vectorises plain integers, not at::BFloat16 structs.
inline float load(const uint16_t* p) {
  uint32_t bits = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
T store(float f);

template <>
inline float store<float>(float f) { return f; }

template <>
inline uint16_t store<uint16_t>(float f) {  // to bf16, rounded to nearest even; NaN stays a (quiet) NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7fffffffu) > 0x7f800000u ? uint16_t((bits >> 16) | 0x40u) : uint16_t(rounded);
}

// e^x for x in float range, within ~2 ulp (Cephes expf: x = n ln2 + r, e^r by a degree-7 polynomial).
// Written out so that the compiler vectorises it; inputs are clamped to [-87, 88] (the result stays finite).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float silu(float z) { return z / (1.0f + fast_exp(-z)); }

inline float silu_grad(float z) {  // d SiLU / dz = s (1 + z (1 − s)), s = sigmoid(z)
  float s = 1.0f / (1.0f + fast_exp(-z));
  return s * (1.0f + z * (1.0f - s));
}

#if defined(__AVX512F__)
// The same exponential on 16 lanes; 2^n is applied with scalef.
inline __m512 fast_exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// sigmoid(z) = 1 / (1 + e^−z) by the approximate reciprocal and one Newton step (relative error ~2^−23): a
// division is the slowest instruction here and took about half of SiLU's time.
inline __m512 sigmoid(__m512 z) {
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), fast_exp(_mm512_sub_ps(_mm512_setzero_ps(), z)));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}
#endif

// In place over a row of n values: v ← SiLU(v).
inline void silu_row(float* __restrict v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512 z = _mm512_loadu_ps(v + i);
    _mm512_storeu_ps(v + i, _mm512_mul_ps(z, sigmoid(z)));
  }
#endif
  for (; i < n; ++i) v[i] = silu(v[i]);
}

// In place over a row of n values: v ← SiLU'(v).
inline void silu_grad_row(float* __restrict v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 z = _mm512_loadu_ps(v + i), s = sigmoid(z);
    _mm512_storeu_ps(v + i, _mm512_mul_ps(s, _mm512_fmadd_ps(z, _mm512_sub_ps(one, s), one)));
  }
#endif
  for (; i < n; ++i) v[i] = silu_grad(v[i]);
}

struct Items {  // the (example, row block) work items of a (B, N, C) tensor
  int64_t batch, rows, channels, per_example;
  Items(const at::Tensor& x) : batch(x.size(0)), rows(x.size(1)), channels(x.size(2)) {
    per_example = std::max<int64_t>(1, (rows + kRowsPerItem - 1) / kRowsPerItem);
  }
  int64_t count() const { return batch * per_example; }
  int64_t example(int64_t item) const { return item / per_example; }
  int64_t first_row(int64_t item) const { return (item % per_example) * kRowsPerItem; }
  int64_t last_row(int64_t item) const { return std::min(rows, first_row(item) + kRowsPerItem); }
};

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat) && t.dim() == 3 &&
                  t.is_contiguous(),
              name, " must be a contiguous CPU bf16 or float32 (B, N, C) tensor");
}

// Runs body(T{}) with T the storage type of x: uint16_t for bf16, float for float32.
template <typename Body>
void dispatch(const at::Tensor& x, Body&& body) {
  if (x.scalar_type() == at::kBFloat16) {
    body(uint16_t{});
  } else {
    body(float{});
  }
}

void check_coefficients(const at::Tensor& t, const at::Tensor& rows, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == at::IntArrayRef({rows.size(0), rows.size(2)}),
              name, " must be a contiguous float32 (B, C) tensor");
}

// Per-item float32 sums, combined per example in double in item order: (B, k, sums, C) → sums × (B, C).
std::vector<std::vector<double>> combine(const std::vector<float>& partial, const Items& items, int64_t sums) {
  std::vector<std::vector<double>> out(sums, std::vector<double>(items.batch * items.channels, 0.0));
  for (int64_t s = 0; s < sums; ++s) {
    for (int64_t b = 0; b < items.batch; ++b) {
      for (int64_t k = 0; k < items.per_example; ++k) {
        const float* part = partial.data() + ((b * items.per_example + k) * sums + s) * items.channels;
        for (int64_t c = 0; c < items.channels; ++c) out[s][b * items.channels + c] += part[c];
      }
    }
  }
  return out;
}

template <typename T>
void channel_sums_impl(const at::Tensor& x, const at::Tensor& shift, std::vector<float>& partial, const Items& items) {
  const int64_t C = items.channels;
  const T* xp = static_cast<T*>(x.data_ptr());
  const float* kp = shift.data_ptr<float>();
  at::parallel_for(0, items.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = items.example(item);
      float* __restrict sum = partial.data() + item * 2 * C;
      float* __restrict sq = sum + C;
      const float* __restrict k = kp + b * C;
      for (int64_t n = items.first_row(item); n < items.last_row(item); ++n) {
        const T* __restrict row = xp + (b * items.rows + n) * C;
        for (int64_t c = 0; c < C; ++c) {
          float d = load(row + c) - k[c];
          sum[c] += d;
          sq[c] += d * d;
        }
      }
    }
  });
}

template <typename T>
void affine_act_impl(const at::Tensor& x, at::Tensor& y, const float* kp, const float* ap, const float* cp, bool act,
                     const Items& items) {
  const int64_t C = items.channels;
  const T* xp = static_cast<T*>(x.data_ptr());
  T* yp = static_cast<T*>(y.data_ptr());
  at::parallel_for(0, items.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z_buffer(C);
    float* __restrict z = z_buffer.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = items.example(item);
      const float *__restrict k = kp + b * C, *__restrict av = ap + b * C, *__restrict cv = cp + b * C;
      for (int64_t n = items.first_row(item); n < items.last_row(item); ++n) {
        const T* __restrict row = xp + (b * items.rows + n) * C;
        T* __restrict out = yp + (b * items.rows + n) * C;
        if (act) {
          for (int64_t c = 0; c < C; ++c) z[c] = (load(row + c) - k[c]) * av[c] + cv[c];
          silu_row(z, C);
          for (int64_t c = 0; c < C; ++c) out[c] = store<T>(z[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) out[c] = store<T>((load(row + c) - k[c]) * av[c] + cv[c]);
        }
      }
    }
  });
}

template <typename T>
void grad_sums_impl(const at::Tensor& grad, const at::Tensor& x, at::Tensor& dz_out, const float* kp, const float* ap,
                    const float* cp, bool act, std::vector<float>& partial, const Items& items) {
  const int64_t C = items.channels;
  const T *xp = static_cast<T*>(x.data_ptr()), *gp = static_cast<T*>(grad.data_ptr());
  T* zp = act ? static_cast<T*>(dz_out.data_ptr()) : nullptr;
  at::parallel_for(0, items.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dz_buffer(C);
    float* __restrict dz_row = dz_buffer.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = items.example(item);
      float* __restrict sum = partial.data() + item * 2 * C;
      float* __restrict sum_d = sum + C;
      const float *__restrict k = kp + b * C, *__restrict av = ap + b * C, *__restrict cv = cp + b * C;
      for (int64_t n = items.first_row(item); n < items.last_row(item); ++n) {
        const T* __restrict row = xp + (b * items.rows + n) * C;
        const T* __restrict g = gp + (b * items.rows + n) * C;
        if (act) {  // separate loops over the row: gcc vectorises each, not a fused one
          T* __restrict out = zp + (b * items.rows + n) * C;
          for (int64_t c = 0; c < C; ++c) dz_row[c] = (load(row + c) - k[c]) * av[c] + cv[c];
          silu_grad_row(dz_row, C);
          for (int64_t c = 0; c < C; ++c) dz_row[c] *= load(g + c);
          for (int64_t c = 0; c < C; ++c) out[c] = store<T>(dz_row[c]);
          for (int64_t c = 0; c < C; ++c) {
            sum[c] += dz_row[c];
            sum_d[c] += dz_row[c] * (load(row + c) - k[c]);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            float d = load(row + c) - k[c];
            float dz = load(g + c);
            sum[c] += dz;
            sum_d[c] += dz * d;
          }
        }
      }
    }
  });
}

template <typename T>
void grad_input_impl(const at::Tensor& dz, const at::Tensor& x, at::Tensor& dx, const float* kp, const float* k1p,
                     const float* k2p, const float* k0p, const Items& items) {
  const int64_t C = items.channels;
  const T *xp = static_cast<T*>(x.data_ptr()), *zp = static_cast<T*>(dz.data_ptr());
  T* dp = static_cast<T*>(dx.data_ptr());
  at::parallel_for(0, items.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = items.example(item);
      const float *__restrict k = kp + b * C;
      const float *__restrict q1 = k1p + b * C, *__restrict q2 = k2p + b * C, *__restrict q0 = k0p + b * C;
      for (int64_t n = items.first_row(item); n < items.last_row(item); ++n) {
        const T* __restrict row = xp + (b * items.rows + n) * C;
        const T* __restrict g = zp + (b * items.rows + n) * C;
        T* __restrict out = dp + (b * items.rows + n) * C;
        for (int64_t c = 0; c < C; ++c) {
          out[c] = store<T>(q1[c] * load(g + c) + q2[c] * (load(row + c) - k[c]) + q0[c]);
        }
      }
    }
  });
}


// An optional (B, C) tensor (any dtype) as contiguous float32, or an undefined tensor when absent.
at::Tensor per_example(const std::optional<at::Tensor>& t, const at::Tensor& rows, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  at::Tensor out = t->to(at::kFloat).contiguous();
  check_coefficients(out, rows, name);
  return out;
}

// A (C,) tensor (any dtype) as contiguous float32.
at::Tensor per_channel(const at::Tensor& t, const at::Tensor& rows, const char* name) {
  at::Tensor out = t.to(at::kFloat).contiguous();
  TORCH_CHECK(out.dim() == 1 && out.size(0) == rows.size(2), name, " must be a (C,) tensor");
  return out;
}

}  // namespace

// Forward pass on x (B, N, C) with GN's affine w, b (C,) and ADM's optional scale, shift (B, C): per (b, c),
// γ = w (1 + scale), β = b (1 + scale) + shift. Returns y = act(z) in x's dtype and, for the backward pass, float32
// (B, C) tensors K (each channel's first value), a = γ·r and c0 = β + o·a (z = (x − K)·a + c0), γ, r = 1/√(σ²_g + ε)
// and o = K − μ_g. The group statistics are formed in double from Σ d and Σ d² (d = x − K): channel means relative
// to the group's first K, group variance = mean of the channel variances + variance of the channel means, so no
// E[x²] − E[x]² cancellation.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& bias_in,
                                const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in,
                                int64_t groups, double eps, bool act) {
  check_rows(x, "x");
  Items items(x);
  const int64_t B = items.batch, C = items.channels;
  TORCH_CHECK(groups > 0 && C % groups == 0, C, " channels cannot be split into ", groups, " groups");
  const int64_t per_group = C / groups;
  const at::Tensor weight = per_channel(weight_in, x, "weight"), bias = per_channel(bias_in, x, "bias");
  const at::Tensor scale = per_example(scale_in, x, "scale"), shift = per_example(shift_in, x, "shift");
  at::Tensor anchor = x.select(1, 0).to(at::kFloat).contiguous();  // (B, C) K
  std::vector<float> partial(items.count() * 2 * C, 0.0f);
  dispatch(x, [&](auto t) { channel_sums_impl<decltype(t)>(x, anchor, partial, items); });
  const auto sums = combine(partial, items, 2);  // Σ d, Σ d²

  auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::empty({B, C}, options), c0 = at::empty({B, C}, options), gamma = at::empty({B, C}, options);
  at::Tensor rstd = at::empty({B, C}, options), offset = at::empty({B, C}, options);
  const float *k = anchor.data_ptr<float>(), *w = weight.data_ptr<float>(), *bs = bias.data_ptr<float>();
  const float *sc = scale.defined() ? scale.data_ptr<float>() : nullptr, *sh = shift.defined() ? shift.data_ptr<float>() : nullptr;
  float *ap = a.data_ptr<float>(), *cp = c0.data_ptr<float>(), *gp = gamma.data_ptr<float>();
  float *rp = rstd.data_ptr<float>(), *op = offset.data_ptr<float>();
  const double n = double(items.rows);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = b * C + g * per_group;
      const double ref = k[first];
      double u_mean = 0.0;  // μ_g − K_ref
      for (int64_t i = first; i < first + per_group; ++i) u_mean += (k[i] - ref) + sums[0][i] / n;
      u_mean /= double(per_group);
      double var = 0.0;
      for (int64_t i = first; i < first + per_group; ++i) {
        const double mean_d = sums[0][i] / n, u = (k[i] - ref) + mean_d;
        var += (sums[1][i] / n - mean_d * mean_d) + (u - u_mean) * (u - u_mean);
      }
      const double r = 1.0 / std::sqrt(std::max(var / double(per_group), 0.0) + eps);
      for (int64_t i = first; i < first + per_group; ++i) {
        const int64_t c = i - b * C;
        const double s = sc ? double(sc[i]) : 0.0, t = sh ? double(sh[i]) : 0.0;
        const double gi = double(w[c]) * (1.0 + s), bi = double(bs[c]) * (1.0 + s) + t;
        const double o = (k[i] - ref) - u_mean, ai = gi * r;
        gp[i] = float(gi);
        rp[i] = float(r);
        op[i] = float(o);
        ap[i] = float(ai);
        cp[i] = float(bi + o * ai);
      }
    }
  }
  at::Tensor y = at::empty_like(x);
  dispatch(x, [&](auto t) { affine_act_impl<decltype(t)>(x, y, k, ap, cp, act, items); });
  return {y, anchor, a, c0, gamma, rstd, offset};
}

// Backward pass: from the gradient of y (B, N, C) and what forward returned, dx (x's dtype) and the float32
// gradients of w, b (C,) and of scale, shift (B, C; None where forward had none). With dγ = Σ dz·x̂, dβ = Σ dz:
// dw = Σ_b dγ (1 + scale), db = Σ_b dβ (1 + scale), dscale = dγ w + dβ b, dshift = dβ. GN's backward,
// dx = r (γ dz − mean_g(γ dz) − x̂ mean_g(γ dz x̂)) with x̂ = (d + o)·r, is dx = k1·dz + k2·d + k0 with
// k1 = r γ, k2 = −r² g2, k0 = −r g1 + k2 o, where g1 = mean_g(γ Σ dz)/N and g2 = mean_g(γ Σ dz·x̂)/N: one pass for
// Σ dz and Σ dz·d (which also writes dz), the algebra in double, one pass for dx.
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& anchor, const at::Tensor& a,
                                 const at::Tensor& c0, const at::Tensor& gamma, const at::Tensor& rstd,
                                 const at::Tensor& offset, const at::Tensor& weight_in, const at::Tensor& bias_in,
                                 const std::optional<at::Tensor>& scale_in, bool has_shift, int64_t groups, bool act) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "grad and x must match in shape and dtype");
  for (auto [t, name] : {std::pair{&anchor, "anchor"}, {&a, "a"}, {&c0, "c0"}, {&gamma, "gamma"}, {&rstd, "rstd"},
                         {&offset, "offset"}}) {
    check_coefficients(*t, x, name);
  }
  Items items(x);
  const int64_t B = items.batch, C = items.channels, per_group = C / groups;
  const at::Tensor weight = per_channel(weight_in, x, "weight"), bias = per_channel(bias_in, x, "bias");
  const at::Tensor scale = per_example(scale_in, x, "scale");
  std::vector<float> partial(items.count() * 2 * C, 0.0f);
  at::Tensor dz = act ? at::empty_like(x) : grad;
  const float *k = anchor.data_ptr<float>(), *ap = a.data_ptr<float>(), *cp = c0.data_ptr<float>();
  dispatch(x, [&](auto t) { grad_sums_impl<decltype(t)>(grad, x, dz, k, ap, cp, act, partial, items); });
  const auto sums = combine(partial, items, 2);  // Σ dz, Σ dz·d

  auto options = at::TensorOptions().dtype(at::kFloat);
  std::vector<double> grad_w(C, 0.0), grad_b(C, 0.0);
  at::Tensor grad_scale = scale.defined() ? at::empty({B, C}, options) : at::Tensor();
  at::Tensor grad_shift = has_shift ? at::empty({B, C}, options) : at::Tensor();
  std::vector<float> k1(B * C), k2(B * C), k0(B * C);
  const float *gm = gamma.data_ptr<float>(), *rp = rstd.data_ptr<float>(), *op = offset.data_ptr<float>();
  const float *w = weight.data_ptr<float>(), *bs = bias.data_ptr<float>(), *sc = scale.defined() ? scale.data_ptr<float>() : nullptr;
  float *dsc = scale.defined() ? grad_scale.data_ptr<float>() : nullptr, *dsh = has_shift ? grad_shift.data_ptr<float>() : nullptr;
  const double n = double(items.rows);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = b * C + g * per_group;
      double g1 = 0.0, g2 = 0.0;  // mean_g(γ Σdz)/N, mean_g(γ Σdz·x̂)/N
      for (int64_t i = first; i < first + per_group; ++i) {
        const int64_t c = i - b * C;
        const double dgamma = double(rp[i]) * (sums[1][i] + double(op[i]) * sums[0][i]), dbeta = sums[0][i];
        const double s = sc ? double(sc[i]) : 0.0;
        grad_w[c] += dgamma * (1.0 + s);
        grad_b[c] += dbeta * (1.0 + s);
        if (dsc) dsc[i] = float(dgamma * double(w[c]) + dbeta * double(bs[c]));
        if (dsh) dsh[i] = float(dbeta);
        g1 += double(gm[i]) * dbeta;
        g2 += double(gm[i]) * dgamma;
      }
      g1 /= double(per_group) * n;
      g2 /= double(per_group) * n;
      for (int64_t i = first; i < first + per_group; ++i) {
        const double r = rp[i], q2 = -r * r * g2;
        k1[i] = float(r * double(gm[i]));
        k2[i] = float(q2);
        k0[i] = float(-r * g1 + q2 * double(op[i]));
      }
    }
  }
  at::Tensor dx = at::empty_like(x);
  dispatch(x, [&](auto t) { grad_input_impl<decltype(t)>(dz, x, dx, k, k1.data(), k2.data(), k0.data(), items); });
  at::Tensor grad_weight = at::empty({C}, options), grad_bias = at::empty({C}, options);
  for (int64_t c = 0; c < C; ++c) {
    grad_weight.data_ptr<float>()[c] = float(grad_w[c]);
    grad_bias.data_ptr<float>()[c] = float(grad_b[c]);
  }
  return {dx, grad_weight, grad_bias, grad_scale, grad_shift};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "y = act(GN(x) w (1 + scale) + b (1 + scale) + shift) on (B, N, C) rows, and what backward needs");
  m.def("backward", &backward, "dx and the gradients of w, b, scale and shift");
}
