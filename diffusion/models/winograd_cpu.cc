// Winograd F(m x m, 3 x 3) tile transforms (m = 2 or 4) as XLA CPU custom calls (jax.ffi),
// float32.
//
// The pure-JAX forms in conv.py (`_input_tiles`, `_output_tiles`, `_dm_tiles`, `_filter_parts`,
// `_filter_grad`) compile to one XLA loop fusion per part and batch chunk, each re-reading its
// input: ~3,800 fusions per CIFAR10 train step at batch 8. Each kernel here reads its input once
// and writes all (m+2)^2 parts (or the result) in one pass, vectorized over channels, with the
// same float32 operations in the same order as the JAX forms (`_lin`: zero coefficients skipped,
// +-1 as add/negate, terms summed left to right), so the results are the same.
//
// Kernels, for a = m + 2 (N images, H x W pixels, C channels, th = ceil(H/m), tw = ceil(W/m),
// P = N*th*tw tiles; target names carry m: ddpm_wino2_*, ddpm_wino4_*):
//   input:  x [N, H, W, C]         -> V[p][q] = (B^T d B)[p, q], a*a x [P, C]
//           (d: the a x a tile at rows m*i-1.., cols m*j-1.., zero outside the image)
//   output: M[p][q], a*a x [P, K]  -> y [N, H, W, K], y = A^T M A per tile (cropped)
//   dm:     dy [N, H, W, K]        -> dM[p][q] = (A dY A^T)[p, q], a*a x [P, K]
//           (dY: the m x m tile at rows m*i.., cols m*j.., zero outside the image)
//   filter: w [3, 3, Ci, Co]       -> U[p][q] = (G g G^T)[p, q], a*a x [Ci, Co]
//           (attribute flip: of the spatially flipped kernel g = w[::-1, ::-1])
//   filter_grad: dU, a*a x [Ci, Co] -> dw [3, 3, Ci, Co], dw = G^T dU G (the transpose)
// Work is split over tiles (or kernel entries) between the calling thread and XLA's intra-op
// thread pool.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ddpm::ParallelFor;

// ---------------------------------------------------------------------------------------------
// The matrices (Lavin & Gray 2016), as in conv.py's _F2 / _F4 (correlation, like lax.conv).
// ---------------------------------------------------------------------------------------------
template <int M>
struct Mats;

template <>
struct Mats<2> {
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct Mats<4> {
  static constexpr int A = 6;
  static constexpr float BT[6][6] = {
      {4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
      {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1},
  };
  static constexpr float G[6][3] = {
      {float(1.0 / 4), 0, 0},
      {float(-1.0 / 6), float(-1.0 / 6), float(-1.0 / 6)},
      {float(-1.0 / 6), float(1.0 / 6), float(-1.0 / 6)},
      {float(1.0 / 24), float(1.0 / 12), float(1.0 / 6)},
      {float(1.0 / 24), float(-1.0 / 12), float(1.0 / 6)},
      {0, 0, 1},
  };
  static constexpr float AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// Channel block: the transforms work on kB channels at a time in small arrays, which the
// compiler keeps in vector registers / L1 and vectorizes along the channel axis. A last, partial
// block is zero-padded: its extra lanes are computed and not stored.
constexpr int kB = 16;

// Compile-time loop: f(std::integral_constant<int, 0>{}), ..., f(<N-1>).
template <typename F, int... I>
inline __attribute__((always_inline)) void StaticFor(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline __attribute__((always_inline)) void StaticFor(F&& f) {
  StaticFor(f, std::make_integer_sequence<int, N>{});
}

// One row of a transform matrix as a type, so that its coefficients are compile-time constants:
// BT[R][.], AT[R][.], the columns of A^T (AC: AT[.][R]), G[R][.], the columns of G (GC: G[.][R]).
enum Which { kBT, kAT, kAC, kG, kGC };
template <int M, Which X, int R>
struct Row {
  static constexpr int N = X == kAC ? M : (X == kG ? 3 : M + 2);
  static constexpr float at(int i) {
    return X == kBT   ? Mats<M>::BT[R][i]
           : X == kAT ? Mats<M>::AT[R][i]
           : X == kAC ? Mats<M>::AT[i][R]
           : X == kG  ? Mats<M>::G[R][i]
                      : Mats<M>::G[i][R];
  }
  static constexpr int first() {
    for (int i = 0; i < N; ++i)
      if (at(i) != 0.0f) return i;
    return N;
  }
};

// out[0:kB] = sum_i c_i * t[i][0:kB] for the row c = RowT, like conv.py's `_lin`: zero
// coefficients skipped, a coefficient of 1 adds the term, -1 adds its negation, others multiply;
// left to right.
template <typename RowT>
inline __attribute__((always_inline)) void Lin(const float (*t)[kB], float* __restrict out) {
  StaticFor<RowT::N>([&](auto ic) {
    constexpr int i = decltype(ic)::value;
    constexpr float c = RowT::at(i);
    if constexpr (c == 0.0f) {
    } else if constexpr (i == RowT::first()) {
      for (int e = 0; e < kB; ++e)
        out[e] = c == 1.0f ? t[i][e] : (c == -1.0f ? -t[i][e] : t[i][e] * c);
    } else {
      for (int e = 0; e < kB; ++e)
        out[e] = out[e] + (c == 1.0f ? t[i][e] : (c == -1.0f ? -t[i][e] : t[i][e] * c));
    }
  });
}

struct TileGrid {
  int64_t n, h, w, c, th, tw;
  int64_t tiles() const { return n * th * tw; }
};

template <int M>
TileGrid MakeGrid(ffi::Span<const int64_t> d) {
  return TileGrid{d[0], d[1], d[2], d[3], (d[1] + M - 1) / M, (d[2] + M - 1) / M};
}

// Copies n <= kB floats of src (nullptr: zeros) into a kB block, zero-padded.
inline __attribute__((always_inline)) void Load(const float* src, int n, float* __restrict dst) {
  if (src == nullptr || n < kB) {
    for (int e = 0; e < kB; ++e) dst[e] = 0.0f;
    if (src != nullptr)
      for (int e = 0; e < n; ++e) dst[e] = src[e];
  } else {
    for (int e = 0; e < kB; ++e) dst[e] = src[e];
  }
}

inline __attribute__((always_inline)) void Store(const float* __restrict src, int n, float* dst) {
  if (n == kB) {
    for (int e = 0; e < kB; ++e) dst[e] = src[e];
  } else {
    for (int e = 0; e < n; ++e) dst[e] = src[e];
  }
}

// x [N, H, W, C] -> a*a parts [P, C].
template <int M>
void InputTiles(const float* x, float* const* v, const TileGrid& g, int64_t t0, int64_t t1) {
  constexpr int A = Mats<M>::A;
  const int64_t C = g.c;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const float* d[A][A];
    for (int a = 0; a < A; ++a) {
      int64_t r = M * i - 1 + a;
      for (int b = 0; b < A; ++b) {
        int64_t s = M * j - 1 + b;
        d[a][b] = (r >= 0 && r < g.h && s >= 0 && s < g.w) ? x + ((n * g.h + r) * g.w + s) * C
                                                           : nullptr;
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += kB) {
      const int nb = static_cast<int>(std::min<int64_t>(kB, C - c0));
      float col[A][A][kB];  // col[b][a]: column b of the tile, row a
      for (int a = 0; a < A; ++a)
        for (int b = 0; b < A; ++b) Load(d[a][b] ? d[a][b] + c0 : nullptr, nb, col[b][a]);
      float rr[A][A][kB];  // rr[p][b] = (B^T d)[p][b]
      StaticFor<A>([&](auto p) {
        for (int b = 0; b < A; ++b) Lin<Row<M, kBT, p>>(col[b], rr[p][b]);
      });
      StaticFor<A>([&](auto p) {
        StaticFor<A>([&](auto q) {
          float o[kB];
          Lin<Row<M, kBT, q>>(rr[p], o);
          Store(o, nb, v[A * p + q] + t * C + c0);
        });
      });
    }
  }
}

// a*a parts [P, K] -> y [N, H, W, K].
template <int M>
void OutputTiles(const float* const* mm, float* y, const TileGrid& g, int64_t t0, int64_t t1) {
  constexpr int A = Mats<M>::A;
  const int64_t K = g.c;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    for (int64_t c0 = 0; c0 < K; c0 += kB) {
      const int nb = static_cast<int>(std::min<int64_t>(kB, K - c0));
      float in[A][A][kB];
      for (int k = 0; k < A * A; ++k) Load(mm[k] + t * K + c0, nb, in[k / A][k % A]);
      float tt[M][A][kB];  // tt[s][p] = (M A)[p][s]
      StaticFor<M>([&](auto s) {
        for (int p = 0; p < A; ++p) Lin<Row<M, kAT, s>>(in[p], tt[s][p]);
      });
      StaticFor<M>([&](auto r) {
        if (M * i + r >= g.h) return;
        StaticFor<M>([&](auto s) {
          if (M * j + s >= g.w) return;
          float o[kB];
          Lin<Row<M, kAT, r>>(tt[s], o);
          Store(o, nb, y + ((n * g.h + M * i + r) * g.w + M * j + s) * K + c0);
        });
      });
    }
  }
}

// dy [N, H, W, K] -> a*a parts [P, K]: dM = A dY A^T (the transpose of the output transform).
template <int M>
void DmTiles(const float* dy, float* const* v, const TileGrid& g, int64_t t0, int64_t t1) {
  constexpr int A = Mats<M>::A;
  const int64_t K = g.c;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const float* d[M][M];
    for (int r = 0; r < M; ++r)
      for (int s = 0; s < M; ++s) {
        int64_t rr = M * i + r, ss = M * j + s;
        d[r][s] = (rr < g.h && ss < g.w) ? dy + ((n * g.h + rr) * g.w + ss) * K : nullptr;
      }
    for (int64_t c0 = 0; c0 < K; c0 += kB) {
      const int nb = static_cast<int>(std::min<int64_t>(kB, K - c0));
      float col[M][M][kB];  // col[s][r]
      for (int r = 0; r < M; ++r)
        for (int s = 0; s < M; ++s) Load(d[r][s] ? d[r][s] + c0 : nullptr, nb, col[s][r]);
      float tt[A][M][kB];  // tt[p][s] = (A dY)[p][s]
      StaticFor<A>([&](auto p) {
        for (int s = 0; s < M; ++s) Lin<Row<M, kAC, p>>(col[s], tt[p][s]);
      });
      StaticFor<A>([&](auto p) {
        StaticFor<A>([&](auto q) {
          float o[kB];
          Lin<Row<M, kAC, q>>(tt[p], o);
          Store(o, nb, v[A * p + q] + t * K + c0);
        });
      });
    }
  }
}

// w [3, 3, Ci, Co] -> a*a parts [Ci, Co]: U = G g G^T (g = w, or w spatially flipped).
template <int M>
void FilterParts(const float* w, float* const* u, int64_t n, bool flip, int64_t e0, int64_t e1) {
  constexpr int A = Mats<M>::A;
  for (int64_t c0 = e0; c0 < e1; c0 += kB) {
    const int nb = static_cast<int>(std::min<int64_t>(kB, e1 - c0));
    float col[3][3][kB];  // col[j][i] = g[i][j]
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        Load(w + ((flip ? 2 - i : i) * 3 + (flip ? 2 - j : j)) * n + c0, nb, col[j][i]);
    float rows[A][3][kB];  // rows[p][j] = (G g)[p][j]
    StaticFor<A>([&](auto p) {
      for (int j = 0; j < 3; ++j) Lin<Row<M, kG, p>>(col[j], rows[p][j]);
    });
    StaticFor<A>([&](auto p) {
      StaticFor<A>([&](auto q) {
        float o[kB];
        Lin<Row<M, kG, q>>(rows[p], o);
        Store(o, nb, u[A * p + q] + c0);
      });
    });
  }
}

// a*a parts dU [Ci, Co] -> dw [3, 3, Ci, Co]: dw = G^T dU G.
template <int M>
void FilterGrad(const float* const* du, float* dw, int64_t n, int64_t e0, int64_t e1) {
  constexpr int A = Mats<M>::A;
  for (int64_t c0 = e0; c0 < e1; c0 += kB) {
    const int nb = static_cast<int>(std::min<int64_t>(kB, e1 - c0));
    float in[A][A][kB];
    for (int k = 0; k < A * A; ++k) Load(du[k] + c0, nb, in[k / A][k % A]);
    float t2[3][A][kB];  // t2[j][p] = (dU G)[p][j]
    StaticFor<3>([&](auto j) {
      for (int p = 0; p < A; ++p) Lin<Row<M, kGC, j>>(in[p], t2[j][p]);
    });
    StaticFor<3>([&](auto i) {
      StaticFor<3>([&](auto j) {
        float o[kB];
        Lin<Row<M, kGC, i>>(t2[j], o);
        Store(o, nb, dw + (i * 3 + j) * n + c0);
      });
    });
  }
}

using Image = ffi::Buffer<ffi::F32, 4>;  // [N, H, W, C] (or a [3, 3, Ci, Co] kernel)

constexpr int64_t kTileGrain = 64;       // tiles per parallel chunk
constexpr int64_t kEntryGrain = 16384;   // kernel entries (Ci*Co) per parallel chunk

ffi::Error GetParts(const ffi::RemainingRets& rets, int parts_wanted, int64_t rows, int64_t cols,
                    float** parts) {
  if (static_cast<int>(rets.size()) != parts_wanted)
    return ffi::Error::InvalidArgument("wrong number of results");
  for (int k = 0; k < parts_wanted; ++k) {
    auto r = rets.get<ffi::Buffer<ffi::F32>>(k);
    if (!r.has_value()) return r.error();
    auto dims = (*r)->dimensions();
    if (dims.size() != 2 || dims[0] != rows || dims[1] != cols)
      return ffi::Error::InvalidArgument("result part has the wrong shape");
    parts[k] = (*r)->typed_data();
  }
  return ffi::Error::Success();
}

ffi::Error GetParts(const ffi::RemainingArgs& args, int parts_wanted, int64_t rows, int64_t cols,
                    const float** parts) {
  if (static_cast<int>(args.size()) != parts_wanted)
    return ffi::Error::InvalidArgument("wrong number of operands");
  for (int k = 0; k < parts_wanted; ++k) {
    auto a = args.get<ffi::Buffer<ffi::F32>>(k);
    if (!a.has_value()) return a.error();
    auto dims = a->dimensions();
    if (dims.size() != 2 || dims[0] != rows || dims[1] != cols)
      return ffi::Error::InvalidArgument("operand part has the wrong shape");
    parts[k] = a->typed_data();
  }
  return ffi::Error::Success();
}

template <int M>
ffi::Error InputImpl(ffi::ThreadPool pool, Image x, ffi::RemainingRets rets) {
  constexpr int A = Mats<M>::A;
  TileGrid g = MakeGrid<M>(x.dimensions());
  float* parts[A * A];
  if (auto e = GetParts(rets, A * A, g.tiles(), g.c, parts); e.failure()) return e;
  const float* xd = x.typed_data();
  ParallelFor(pool, g.tiles(), kTileGrain,
              [&](int64_t a, int64_t b) { InputTiles<M>(xd, parts, g, a, b); });
  return ffi::Error::Success();
}

template <int M>
ffi::Error DmImpl(ffi::ThreadPool pool, Image dy, ffi::RemainingRets rets) {
  constexpr int A = Mats<M>::A;
  TileGrid g = MakeGrid<M>(dy.dimensions());
  float* parts[A * A];
  if (auto e = GetParts(rets, A * A, g.tiles(), g.c, parts); e.failure()) return e;
  const float* d = dy.typed_data();
  ParallelFor(pool, g.tiles(), kTileGrain,
              [&](int64_t a, int64_t b) { DmTiles<M>(d, parts, g, a, b); });
  return ffi::Error::Success();
}

template <int M>
ffi::Error OutputImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::Result<Image> y) {
  constexpr int A = Mats<M>::A;
  TileGrid g = MakeGrid<M>(y->dimensions());
  const float* parts[A * A];
  if (auto e = GetParts(args, A * A, g.tiles(), g.c, parts); e.failure()) return e;
  float* out = y->typed_data();
  ParallelFor(pool, g.tiles(), kTileGrain,
              [&](int64_t a, int64_t b) { OutputTiles<M>(parts, out, g, a, b); });
  return ffi::Error::Success();
}

template <int M>
ffi::Error FilterImpl(ffi::ThreadPool pool, Image w, bool flip, ffi::RemainingRets rets) {
  constexpr int A = Mats<M>::A;
  auto d = w.dimensions();
  if (d[0] != 3 || d[1] != 3) return ffi::Error::InvalidArgument("expected a [3, 3, Ci, Co] kernel");
  float* parts[A * A];
  if (auto e = GetParts(rets, A * A, d[2], d[3], parts); e.failure()) return e;
  const float* wd = w.typed_data();
  int64_t n = d[2] * d[3];
  ParallelFor(pool, n, kEntryGrain,
              [&](int64_t a, int64_t b) { FilterParts<M>(wd, parts, n, flip, a, b); });
  return ffi::Error::Success();
}

template <int M>
ffi::Error FilterGradImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::Result<Image> dw) {
  constexpr int A = Mats<M>::A;
  auto d = dw->dimensions();
  if (d[0] != 3 || d[1] != 3) return ffi::Error::InvalidArgument("expected a [3, 3, Ci, Co] result");
  const float* parts[A * A];
  if (auto e = GetParts(args, A * A, d[2], d[3], parts); e.failure()) return e;
  float* out = dw->typed_data();
  int64_t n = d[2] * d[3];
  ParallelFor(pool, n, kEntryGrain,
              [&](int64_t a, int64_t b) { FilterGrad<M>(parts, out, n, a, b); });
  return ffi::Error::Success();
}

}  // namespace

#define DDPM_WINOGRAD_HANDLERS(M)                                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                             \
      DdpmWino##M##Input, InputImpl<M>,                                                      \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Image>().RemainingRets());                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                             \
      DdpmWino##M##Dm, DmImpl<M>,                                                            \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Image>().RemainingRets());                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                             \
      DdpmWino##M##Output, OutputImpl<M>,                                                    \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<Image>());                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                             \
      DdpmWino##M##Filter, FilterImpl<M>,                                                    \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Image>().Attr<bool>("flip").RemainingRets()); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                             \
      DdpmWino##M##FilterGrad, FilterGradImpl<M>,                                            \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<Image>());

DDPM_WINOGRAD_HANDLERS(2)
DDPM_WINOGRAD_HANDLERS(4)
