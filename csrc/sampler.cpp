// Multi-block mask sampler (docs/design.md §4, fastjepa's default mode) for a whole batch.
//
// Same distribution as MaskCollator.sample in fastjepa/masks/multiblock.py:
//   * one uniform draw u per block kind (targets, then context) sets both scale and aspect;
//   * corners uniform on the inclusive range top ∈ [0, H−h], left ∈ [0, W−w];
//   * a context block is multiplied by the complement of every target block (unless
//     allow_overlap); after 20 draws with ≤ min_keep cells, the newest remaining target
//     constraint is dropped and sampling goes on;
//   * every mask of a kind is truncated to the shortest of its kind in the batch.
// Its own generator: splitmix64, one stream for the block sizes and one per image derived
// from (seed, b), so the result depends on the seed only, never on the thread count.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "fastjepa.h"
#include "splitmix64.h"

namespace fastjepa {
namespace {

constexpr int kTriesBeforeRelax = 20;
// An image takes about 2 µs, a fork/join of the thread pool more than that on a busy
// machine, so batches of up to this many images are sampled on the calling thread.
constexpr int64_t kImagesPerTask = 256;

uint64_t mix(uint64_t a, uint64_t b) {
  SplitMix64 g(a ^ (b * 0xD1B54A32D192ED03ULL + 0x8CB92BA72F3D8DD7ULL));
  g.next();
  return g.next();
}

void check_pair(at::ArrayRef<double> v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2, "sample_masks: ", name, " has ", v.size(), " values, expected two (low, high)");
  TORCH_CHECK_VALUE(v[0] <= v[1], "sample_masks: ", name, "=(", v[0], ", ", v[1], "): expected low <= high");
}

struct Rect {
  int64_t top, left, h, w;
  bool contains(int64_t r, int64_t c) const { return r >= top && r < top + h && c >= left && c < left + w; }
};

}  // namespace

std::pair<int64_t, int64_t> block_size(double u, double s_lo, double s_hi, double a_lo, double a_hi, int64_t H, int64_t W) {
  const double s = s_lo + u * (s_hi - s_lo);
  const int64_t max_keep = static_cast<int64_t>(static_cast<double>(H * W) * s);  // int(): toward zero
  const double ar = a_lo + u * (a_hi - a_lo);
  // Python's round(): half to even, which is nearbyint in the default rounding mode.
  int64_t h = static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(max_keep) * ar)));
  int64_t w = static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(max_keep) / ar)));
  h = std::min(h, H - 1);
  w = std::min(w, W - 1);
  return {h, w};
}

// The batch for given block sizes p = (h, w) of the targets and e of the context. Corners
// are uniform on top ∈ [0, H − h] (inclusive) or, with `exclusive`, on [0, H − h) as the
// public reference draws them (its last row and column are then never a block's corner row).
static std::tuple<at::Tensor, at::Tensor> sample_blocks(
    int64_t B, int64_t H, int64_t W, std::pair<int64_t, int64_t> p, std::pair<int64_t, int64_t> e, int64_t nenc,
    int64_t npred, int64_t min_keep, bool allow_overlap, bool exclusive, int64_t seed, const char* op) {
  // Targets are plain rectangles and a context relaxes to one, so this also guarantees termination.
  TORCH_CHECK_VALUE(p.first * p.second > min_keep && e.first * e.second > min_keep, op, ": mask block sizes (",
                    p.first, ", ", p.second, ") / (", e.first, ", ", e.second, ") cannot exceed min_keep=", min_keep,
                    " on a ", H, "x", W, " grid; raise the mask scales or lower min_keep");
  const int64_t span = exclusive ? 0 : 1;  // corner range [0, H − h + span)
  // -- per image: npred target rectangles, then nenc contexts (rectangle minus targets)
  const int64_t N = H * W, Kt = p.first * p.second;
  std::vector<Rect> targets(B * npred);
  std::vector<int64_t> ctx_idx(B * nenc * N);  // (B, nenc, N): first ctx_len entries used
  std::vector<int64_t> ctx_len(B * nenc);
  at::parallel_for(0, B, kImagesPerTask, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      SplitMix64 rng(mix(static_cast<uint64_t>(seed), static_cast<uint64_t>(b) + 1));
      Rect* tb = &targets[b * npred];
      for (int64_t j = 0; j < npred; ++j) {
        const int64_t top = rng.below(H - p.first + span), left = rng.below(W - p.second + span);
        tb[j] = Rect{top, left, p.first, p.second};
      }
      for (int64_t i = 0; i < nenc; ++i) {
        int64_t tries = 0, left_before_relax = kTriesBeforeRelax;
        int64_t* out = &ctx_idx[(b * nenc + i) * N];
        while (true) {
          const int64_t top = rng.below(H - e.first + span), left = rng.below(W - e.second + span);
          const int64_t active = allow_overlap ? 0 : std::max<int64_t>(npred - tries, 0);
          int64_t k = 0;
          for (int64_t r = top; r < top + e.first; ++r) {
            for (int64_t c = left; c < left + e.second; ++c) {
              bool keep = true;
              for (int64_t t = 0; t < active && keep; ++t) keep = !tb[t].contains(r, c);
              if (keep) out[k++] = r * W + c;  // raster order: sorted
            }
          }
          if (k > min_keep) {
            ctx_len[b * nenc + i] = k;
            break;
          }
          if (--left_before_relax == 0) {
            ++tries;
            left_before_relax = kTriesBeforeRelax;
          }
        }
      }
    }
  });

  // -- rectangular output: truncate to the shortest mask of each kind in the batch
  const int64_t Kc = *std::min_element(ctx_len.begin(), ctx_len.end());
  at::Tensor enc = at::empty({nenc, B, Kc}, at::kLong);
  at::Tensor pred = at::empty({npred, B, Kt}, at::kLong);
  int64_t* pe = enc.data_ptr<int64_t>();
  int64_t* pp = pred.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < nenc; ++i) {
      std::memcpy(pe + (i * B + b) * Kc, &ctx_idx[(b * nenc + i) * N], Kc * sizeof(int64_t));
    }
    for (int64_t j = 0; j < npred; ++j) {
      const Rect& t = targets[b * npred + j];
      int64_t* o = pp + (j * B + b) * Kt;
      for (int64_t r = t.top; r < t.top + t.h; ++r)
        for (int64_t c = t.left; c < t.left + t.w; ++c) *o++ = r * W + c;
    }
  }
  return {enc, pred};
}

std::tuple<at::Tensor, at::Tensor> sample_masks(
    int64_t B, int64_t H, int64_t W, at::ArrayRef<double> enc_scale, at::ArrayRef<double> pred_scale,
    at::ArrayRef<double> aspect, int64_t nenc, int64_t npred, int64_t min_keep, bool allow_overlap, int64_t seed) {
  // -- validation (the messages of MaskCollator's checks)
  TORCH_CHECK_VALUE(B >= 1, "sample_masks: B=", B, ": expected a batch size >= 1");
  TORCH_CHECK_VALUE(H >= 2 && W >= 2, "sample_masks: a ", H, "x", W, " patch grid; expected at least 2x2");
  check_pair(enc_scale, "enc_mask_scale");
  check_pair(pred_scale, "pred_mask_scale");
  check_pair(aspect, "aspect_ratio");
  TORCH_CHECK_VALUE(enc_scale[0] > 0 && enc_scale[1] <= 1, "sample_masks: enc_mask_scale=(", enc_scale[0], ", ",
                    enc_scale[1], "): expected 0 < low <= high <= 1");
  TORCH_CHECK_VALUE(pred_scale[0] > 0 && pred_scale[1] <= 1, "sample_masks: pred_mask_scale=(", pred_scale[0], ", ",
                    pred_scale[1], "): expected 0 < low <= high <= 1");
  TORCH_CHECK_VALUE(aspect[0] > 0, "sample_masks: aspect_ratio=(", aspect[0], ", ", aspect[1],
                    "): expected positive ratios");
  TORCH_CHECK_VALUE(nenc >= 1, "sample_masks: nenc=", nenc, ": expected an int >= 1");
  TORCH_CHECK_VALUE(npred >= 1, "sample_masks: npred=", npred, ": expected an int >= 1");
  TORCH_CHECK_VALUE(min_keep >= 0, "sample_masks: min_keep=", min_keep, ": expected an int >= 0");

  // -- one block size per kind for the whole batch
  SplitMix64 batch_rng(mix(static_cast<uint64_t>(seed), 0));
  const double u_pred = batch_rng.uniform(), u_enc = batch_rng.uniform();
  const auto p = block_size(u_pred, pred_scale[0], pred_scale[1], aspect[0], aspect[1], H, W);  // (h, w)
  const auto e = block_size(u_enc, enc_scale[0], enc_scale[1], 1.0, 1.0, H, W);
  return sample_blocks(B, H, W, p, e, nenc, npred, min_keep, allow_overlap, /*exclusive=*/false, seed, "sample_masks");
}


std::tuple<at::Tensor, at::Tensor> sample_masks_sized(
    int64_t B, int64_t H, int64_t W, at::IntArrayRef pred_size, at::IntArrayRef enc_size, int64_t nenc, int64_t npred,
    int64_t min_keep, bool allow_overlap, bool exclusive_corners, int64_t seed) {
  TORCH_CHECK_VALUE(B >= 1, "sample_masks_sized: B=", B, ": expected a batch size >= 1");
  TORCH_CHECK_VALUE(H >= 2 && W >= 2, "sample_masks_sized: a ", H, "x", W, " patch grid; expected at least 2x2");
  TORCH_CHECK_VALUE(pred_size.size() == 2 && enc_size.size() == 2, "sample_masks_sized: pred_size and enc_size ",
                    "must be (h, w) pairs, got ", pred_size.size(), " and ", enc_size.size(), " values");
  const int64_t hmax = exclusive_corners ? H - 1 : H, wmax = exclusive_corners ? W - 1 : W;
  for (auto sz : {pred_size, enc_size}) {
    TORCH_CHECK_VALUE(sz[0] >= 1 && sz[0] <= hmax && sz[1] >= 1 && sz[1] <= wmax, "sample_masks_sized: block (",
                      sz[0], ", ", sz[1], ") on a ", H, "x", W, " grid; expected 1 <= h <= ", hmax, " and 1 <= w <= ",
                      wmax, exclusive_corners ? " (exclusive corner range)" : "");
  }
  TORCH_CHECK_VALUE(nenc >= 1, "sample_masks_sized: nenc=", nenc, ": expected an int >= 1");
  TORCH_CHECK_VALUE(npred >= 1, "sample_masks_sized: npred=", npred, ": expected an int >= 1");
  TORCH_CHECK_VALUE(min_keep >= 0, "sample_masks_sized: min_keep=", min_keep, ": expected an int >= 0");
  return sample_blocks(B, H, W, {pred_size[0], pred_size[1]}, {enc_size[0], enc_size[1]}, nenc, npred, min_keep,
                       allow_overlap, exclusive_corners, seed, "sample_masks_sized");
}

TORCH_LIBRARY_IMPL(fastjepa, CompositeExplicitAutograd, m) {
  m.impl("sample_masks", &sample_masks);
  m.impl("sample_masks_sized", &sample_masks_sized);
}

}  // namespace fastjepa
