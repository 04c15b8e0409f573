// GroupNorm (Wu & He 2018) forward and closed-form backward as XLA CPU custom calls (jax.ffi),
// float32 data, float64 accumulation of the statistics and of the reductions.
//
// Under autodiff, flax's GroupNorm is ~6 XLA passes over the activation in the forward and more
// in the backward, its statistics as reductions over strided axes (benchmarks/RESULTS.md §17).
// Here: forward = 3 passes (mean; two-pass variance as in the released code's tf.nn.moments;
// normalise), backward = 2 passes (two per-channel sums; dx).
//
//   ddpm_group_norm_fwd: x [B, H, W, C], scale [C], bias [C]; attrs groups, eps
//       -> y [B, H, W, C], mean [B, G], inv [B, G]   (inv = 1 / sqrt(var + eps))
//       y = (x - mean_g) * (inv_g * scale_c) + bias_c   (flax's order of operations)
//   ddpm_group_norm_bwd: x, scale, mean, inv, dy -> dx [B, H, W, C], dscale [C], dbias [C]
//       xhat = (x - mean_g) inv_g,  s1_c = sum_hw dy,  s2_c = sum_hw dy xhat   (per image)
//       dx = inv_g (dy scale_c - mean_g(dy scale) - xhat mean_g(dy scale xhat)),
//       dscale_c = sum_b s2_c,  dbias_c = sum_b s1_c
// Images are split between the calling thread and XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ddpm::ParallelFor;

using Image = ffi::Buffer<ffi::F32, 4>;
using Vec = ffi::Buffer<ffi::F32, 1>;
using Stat = ffi::Buffer<ffi::F32, 2>;

// Per-channel sums over the S rows of a [S, C] image (double accumulators, float blocks of 8 rows
// so that the inner loop vectorises).
template <typename F>
void ColumnSums(int64_t S, int64_t C, double* out, F value) {
  std::fill(out, out + C, 0.0);
  std::vector<float> part(C);
  for (int64_t s0 = 0; s0 < S; s0 += 8) {
    const int64_t s1 = std::min(S, s0 + 8);
    std::fill(part.begin(), part.end(), 0.0f);
    for (int64_t s = s0; s < s1; ++s) {
      float* p = part.data();
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) p[c] += value(s, c);
    }
    for (int64_t c = 0; c < C; ++c) out[c] += part[c];
  }
}

ffi::Error FwdImpl(ffi::ThreadPool pool, Image x, Vec scale, Vec bias, int64_t groups, float eps,
                   ffi::Result<Image> y, ffi::Result<Stat> mean, ffi::Result<Stat> inv) {
  auto d = x.dimensions();
  const int64_t B = d[0], S = d[1] * d[2], C = d[3], G = groups;
  if (G <= 0 || C % G) return ffi::Error::InvalidArgument("channels not divisible by groups");
  const int64_t cg = C / G;
  const double count = static_cast<double>(S * cg);
  const float* xd = x.typed_data();
  const float* sc = scale.typed_data();
  const float* bi = bias.typed_data();
  float* yd = y->typed_data();
  float* md = mean->typed_data();
  float* id = inv->typed_data();
  ParallelFor(pool, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> sums(C);
    std::vector<float> mc(C), ac(C);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = xd + b * S * C;
      ColumnSums(S, C, sums.data(), [&](int64_t s, int64_t c) { return xb[s * C + c]; });
      for (int64_t g = 0; g < G; ++g) {
        double t = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) t += sums[c];
        const float m = static_cast<float>(t / count);
        md[b * G + g] = m;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) mc[c] = m;
      }
      const float* m = mc.data();
      ColumnSums(S, C, sums.data(), [&](int64_t s, int64_t c) {
        const float v = xb[s * C + c] - m[c];
        return v * v;
      });
      for (int64_t g = 0; g < G; ++g) {
        double t = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) t += sums[c];
        const float iv = 1.0f / std::sqrt(static_cast<float>(t / count) + eps);
        id[b * G + g] = iv;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) ac[c] = iv * sc[c];
      }
      const float* a = ac.data();
      float* yb = yd + b * S * C;
      for (int64_t s = 0; s < S; ++s) {
        const float* xr = xb + s * C;
        float* yr = yb + s * C;
#pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m[c]) * a[c] + bi[c];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, Image x, Vec scale, Stat mean, Stat inv, Image dy,
                   ffi::Result<Image> dx, ffi::Result<Vec> dscale, ffi::Result<Vec> dbias) {
  auto d = x.dimensions();
  const int64_t B = d[0], S = d[1] * d[2], C = d[3], G = mean.dimensions()[1];
  if (G <= 0 || C % G) return ffi::Error::InvalidArgument("channels not divisible by groups");
  const int64_t cg = C / G;
  const double count = static_cast<double>(S * cg);
  const float* xd = x.typed_data();
  const float* sc = scale.typed_data();
  const float* md = mean.typed_data();
  const float* id = inv.typed_data();
  const float* gd = dy.typed_data();
  float* dxd = dx->typed_data();
  std::vector<double> s1(B * C), s2(B * C);  // per image, summed over images at the end
  ParallelFor(pool, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> mc(C), ic(C), k1(C), k2(C);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        mc[c] = md[b * G + c / cg];
        ic[c] = id[b * G + c / cg];
      }
      const float* xb = xd + b * S * C;
      const float* gb = gd + b * S * C;
      const float* m = mc.data();
      const float* iv = ic.data();
      double* t1 = s1.data() + b * C;
      double* t2 = s2.data() + b * C;
      ColumnSums(S, C, t1, [&](int64_t s, int64_t c) { return gb[s * C + c]; });
      ColumnSums(S, C, t2, [&](int64_t s, int64_t c) {
        return gb[s * C + c] * ((xb[s * C + c] - m[c]) * iv[c]);
      });
      for (int64_t g = 0; g < G; ++g) {
        double u1 = 0, u2 = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          u1 += sc[c] * t1[c];
          u2 += sc[c] * t2[c];
        }
        const float m1 = static_cast<float>(u1 / count), m2 = static_cast<float>(u2 / count);
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          k1[c] = m1;
          k2[c] = m2;
        }
      }
      const float* a1 = k1.data();
      const float* a2 = k2.data();
      float* db = dxd + b * S * C;
      for (int64_t s = 0; s < S; ++s) {
        const float* xr = xb + s * C;
        const float* gr = gb + s * C;
        float* dr = db + s * C;
#pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const float xh = (xr[c] - m[c]) * iv[c];
          dr[c] = iv[c] * (gr[c] * sc[c] - a1[c] - xh * a2[c]);
        }
      }
    }
  });
  float* ds = dscale->typed_data();
  float* dbi = dbias->typed_data();
  for (int64_t c = 0; c < C; ++c) {
    double u1 = 0, u2 = 0;
    for (int64_t b = 0; b < B; ++b) {
      u1 += s1[b * C + c];
      u2 += s2[b * C + c];
    }
    dbi[c] = static_cast<float>(u1);
    ds[c] = static_cast<float>(u2);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmGroupNormFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Ret<Image>()
                                  .Ret<Stat>()
                                  .Ret<Stat>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdpmGroupNormBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Vec>()
                                  .Arg<Stat>()
                                  .Arg<Stat>()
                                  .Arg<Image>()
                                  .Ret<Image>()
                                  .Ret<Vec>()
                                  .Ret<Vec>());
