// 3-D multi-block masks for video (V-JEPA 2's mask generator) for a whole batch.
//
// Same distribution as MaskGenerator3D.sample in fastjepa/masks/multiblock3d.py:
//   * one block size (t, h, w) for the batch from three uniform draws (temporal scale,
//     spatial scale, aspect ratio), or the size given in block_size;
//   * per clip, num_blocks blocks at offsets uniform on the inclusive ranges
//     top ∈ [0, H−h], left ∈ [0, W−w], start ∈ [0, T−t]; their union plus every frame at or
//     after max_context_frames is the target, the rest the context; a clip whose context is
//     empty is drawn again (an error after kMaxEmptyDraws in a row);
//   * contexts cut to the batch's shortest (and max_keep), targets to the shortest target;
//     full_complement: target = everything outside the cut context; else
//     pred_full_complement: context = everything outside the cut target.
// Its own generator: splitmix64, one stream for the block size and one per clip derived
// from (seed, b), so the result depends on the seed only, never on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "splitmix64.h"

namespace fastjepa {
namespace {

constexpr int64_t kMaxEmptyDraws = 1000;  // MAX_EMPTY_DRAWS in multiblock3d.py
constexpr int64_t kClipsPerTask = 64;     // a clip of 2,048 tokens takes a few µs

using Rng = SplitMix64;  // splitmix64.h

uint64_t stream_seed(uint64_t seed, uint64_t k) {
  Rng g(seed ^ (k * 0xA24BAED4963EE407ULL + 0x9FB21C651E98DF25ULL));
  g.next();
  return g.next();
}

void check_range(at::ArrayRef<double> v, const char* name, double lo_min, bool lo_strict) {
  TORCH_CHECK_VALUE(v.size() == 2, "sample_masks3d: ", name, " has ", v.size(), " values, expected two (low, high)");
  const bool lo_ok = lo_strict ? v[0] > lo_min : v[0] >= lo_min;
  TORCH_CHECK_VALUE(lo_ok && v[0] <= v[1] && v[1] <= 1.0, "sample_masks3d: ", name, "=(", v[0], ", ", v[1],
                    "): expected ", lo_min, lo_strict ? " < " : " <= ", "low <= high <= 1");
}

struct Size3 {
  int64_t t, h, w;
};

Size3 draw_size(Rng& rng, at::ArrayRef<double> ts, at::ArrayRef<double> ss, at::ArrayRef<double> ar, int64_t T,
                int64_t H, int64_t W) {
  const double u_t = rng.uniform(), u_s = rng.uniform(), u_a = rng.uniform();
  const double st = ts[0] + u_t * (ts[1] - ts[0]);
  const int64_t t = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(T) * st));  // int(): toward zero
  const double ss_ = ss[0] + u_s * (ss[1] - ss[0]);
  const int64_t keep = static_cast<int64_t>(static_cast<double>(H * W) * ss_);
  const double a = ar[0] + u_a * (ar[1] - ar[0]);
  // Python's round(): half to even, which is nearbyint in the default rounding mode.
  const int64_t h = std::min<int64_t>(static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(keep) * a))), H);
  const int64_t w = std::min<int64_t>(static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(keep) / a))), W);
  return {t, h, w};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sample_masks3d(
    int64_t B, int64_t T, int64_t H, int64_t W, at::ArrayRef<double> temporal_scale, at::ArrayRef<double> spatial_scale,
    at::ArrayRef<double> aspect, int64_t num_blocks, int64_t max_context_frames, std::optional<int64_t> max_keep,
    bool full_complement, bool pred_full_complement, int64_t seed, at::OptionalIntArrayRef block_size) {
  // -- validation (the messages of MaskGenerator3D's checks)
  TORCH_CHECK_VALUE(B >= 1, "sample_masks3d: B=", B, ": expected a batch size >= 1");
  TORCH_CHECK_VALUE(T >= 1 && H >= 1 && W >= 1, "sample_masks3d: a ", T, "x", H, "x", W,
                    " token grid; expected at least one token along each axis");
  check_range(temporal_scale, "temporal_scale", 0.0, false);
  check_range(spatial_scale, "spatial_scale", 0.0, true);
  TORCH_CHECK_VALUE(aspect.size() == 2, "sample_masks3d: aspect_ratio has ", aspect.size(),
                    " values, expected two (low, high)");
  TORCH_CHECK_VALUE(aspect[0] > 0 && aspect[0] <= aspect[1], "sample_masks3d: aspect_ratio=(", aspect[0], ", ",
                    aspect[1], "): expected 0 < low <= high");
  TORCH_CHECK_VALUE(num_blocks >= 1, "sample_masks3d: num_blocks=", num_blocks, ": expected an int >= 1");
  TORCH_CHECK_VALUE(max_context_frames >= 1 && max_context_frames <= T, "sample_masks3d: max_context_frames=",
                    max_context_frames, ": expected 1 <= value <= T=", T);
  TORCH_CHECK_VALUE(!max_keep.has_value() || *max_keep >= 1, "sample_masks3d: max_keep=", max_keep.value_or(0),
                    ": expected None or an int >= 1");

  // -- one block size for the whole batch
  Size3 s{};
  if (block_size.has_value()) {
    const auto bs = *block_size;
    TORCH_CHECK_VALUE(bs.size() == 3, "sample_masks3d: block_size has ", bs.size(), " values, expected (t, h, w)");
    s = {bs[0], bs[1], bs[2]};
    TORCH_CHECK_VALUE(s.t >= 1 && s.t <= T && s.h >= 0 && s.h <= H && s.w >= 0 && s.w <= W,
                      "sample_masks3d: block_size=(", s.t, ", ", s.h, ", ", s.w, "): expected 1 <= t <= ", T,
                      ", 0 <= h <= ", H, ", 0 <= w <= ", W);
  } else {
    Rng size_rng(stream_seed(static_cast<uint64_t>(seed), 0));
    s = draw_size(size_rng, temporal_scale, spatial_scale, aspect, T, H, W);
  }
  TORCH_CHECK_VALUE(!(s.t == T && s.h == H && s.w == W), "sample_masks3d: a block of ", s.t, "x", s.h, "x", s.w,
                    " covers the whole token grid, which leaves no context; lower spatial_scale or temporal_scale");

  // -- per clip: the target cells (1) of num_blocks blocks plus the frames past the context
  const int64_t N = T * H * W, HW = H * W;
  std::vector<uint8_t> target(B * N);
  std::vector<int64_t> n_ctx(B);
  at::parallel_for(0, B, kClipsPerTask, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Rng rng(stream_seed(static_cast<uint64_t>(seed), static_cast<uint64_t>(b) + 1));
      uint8_t* m = &target[b * N];
      int64_t k = 0;
      for (int64_t draw = 0;; ++draw) {
        TORCH_CHECK_VALUE(draw < kMaxEmptyDraws, "sample_masks3d: the context came out empty ", kMaxEmptyDraws,
                          " times in a row for one clip with num_blocks=", num_blocks, " blocks of ", s.t, "x", s.h,
                          "x", s.w, " on a ", T, "x", H, "x", W, " grid; lower num_blocks, spatial_scale or "
                          "temporal_scale");
        std::fill(m, m + N, uint8_t{0});
        for (int64_t j = 0; j < num_blocks; ++j) {
          const int64_t top = rng.below(H - s.h + 1), left = rng.below(W - s.w + 1), start = rng.below(T - s.t + 1);
          for (int64_t f = start; f < start + s.t; ++f)
            for (int64_t r = top; r < top + s.h; ++r) std::fill_n(m + f * HW + r * W + left, s.w, uint8_t{1});
        }
        std::fill(m + max_context_frames * HW, m + N, uint8_t{1});
        k = N - std::count(m, m + N, uint8_t{1});
        if (k > 0) break;
      }
      n_ctx[b] = k;
    }
  });

  // -- rectangular output: cut to the shortest of each kind, then the complements
  int64_t Kc = *std::min_element(n_ctx.begin(), n_ctx.end());
  int64_t Kt = N - *std::max_element(n_ctx.begin(), n_ctx.end());
  if (max_keep.has_value()) Kc = std::min(Kc, *max_keep);
  const int64_t out_c = (!full_complement && pred_full_complement) ? N - Kt : Kc;
  const int64_t out_t = full_complement ? N - Kc : Kt;
  at::Tensor enc = at::empty({B, out_c}, at::kLong);
  at::Tensor pred = at::empty({B, out_t}, at::kLong);
  int64_t* pe = enc.data_ptr<int64_t>();
  int64_t* pp = pred.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* m = &target[b * N];
    int64_t* e = pe + b * out_c;
    int64_t* p = pp + b * out_t;
    int64_t ne = 0, np = 0;  // context / target cells seen so far in raster order
    for (int64_t i = 0; i < N; ++i) {
      if (m[i] == 0) {  // a context cell: in the cut context if among the first Kc
        const bool kept = ne++ < Kc;
        if (full_complement) {
          if (!kept) *p++ = i;  // the target is everything outside the cut context
        } else if (kept || pred_full_complement) {
          *e++ = i;  // pred_full_complement: every context cell is outside the cut target
        }
      } else {  // a target cell: in the cut target if among the first Kt
        const bool kept = np++ < Kt;
        if (full_complement || kept) {
          *p++ = i;
        } else if (pred_full_complement) {
          *e++ = i;
        }
      }
    }
    if (full_complement) {  // the cut context itself: its first Kc cells
      int64_t c = 0;
      for (int64_t i = 0; i < N && c < Kc; ++i)
        if (m[i] == 0) e[c++] = i;
    }
  }
  return {enc, pred};
}

TORCH_LIBRARY_FRAGMENT(fastjepa, m) {
  m.def(
      "sample_masks3d(int B, int T, int H, int W, float[] temporal_scale, float[] spatial_scale, float[] aspect, "
      "int num_blocks, int max_context_frames, int? max_keep, bool full_complement, bool pred_full_complement, "
      "int seed, int[]? block_size=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastjepa, CompositeExplicitAutograd, m) { m.impl("sample_masks3d", &sample_masks3d); }

}  // namespace fastjepa
