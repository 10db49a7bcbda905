// C++ tests of the fastjepa._C sources, run by ctest (see CMakeLists.txt).
// Sampler invariants (docs/design.md §4) and gather_tokens forward/backward against a naive loop,
// called both directly and through the dispatcher (torch::ops are registered by the library).

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <set>

#include "fastjepa.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
    }                                                       \
  } while (0)

void test_block_size() {
  // u = 0, pred (0.15, 0.2), aspect (0.75, 1.5), 16x16: max_keep = 38, h = round(5.34), w = round(7.12)
  auto p = fastjepa::block_size(0.0, 0.15, 0.2, 0.75, 1.5, 16, 16);
  EXPECT(p.first == 5 && p.second == 7, "got (%ld, %ld), expected (5, 7)", (long)p.first, (long)p.second);
  // enc scale 1.0: a 16x16 block is reduced to 15x15
  auto e = fastjepa::block_size(0.999, 0.85, 1.0, 1.0, 1.0, 16, 16);
  EXPECT(e.first == 15 && e.second == 15, "got (%ld, %ld), expected (15, 15)", (long)e.first, (long)e.second);
}

void test_sampler_invariants() {
  const int64_t B = 64, H = 16, W = 16, min_keep = 10;
  const std::vector<double> enc{0.85, 1.0}, pred{0.15, 0.2}, aspect{0.75, 1.5};
  for (int64_t seed = 0; seed < 20; ++seed) {
    auto [e, p] = fastjepa::sample_masks(B, H, W, enc, pred, aspect, 1, 4, min_keep, false, seed);
    EXPECT(e.dim() == 3 && e.size(0) == 1 && e.size(1) == B, "enc shape");
    EXPECT(p.dim() == 3 && p.size(0) == 4 && p.size(1) == B, "pred shape");
    EXPECT(e.size(2) > min_keep && p.size(2) > min_keep, "sizes %ld %ld", (long)e.size(2), (long)p.size(2));
    auto ea = e.accessor<int64_t, 3>();
    auto pa = p.accessor<int64_t, 3>();
    for (int64_t b = 0; b < B; ++b) {
      std::set<int64_t> targets;
      for (int64_t j = 0; j < 4; ++j)
        for (int64_t k = 0; k < p.size(2); ++k) {
          const int64_t v = pa[j][b][k];
          EXPECT(v >= 0 && v < H * W, "target index %ld", (long)v);
          if (k > 0) EXPECT(v > pa[j][b][k - 1], "target indices sorted");
          targets.insert(v);
        }
      for (int64_t k = 0; k < e.size(2); ++k) {
        const int64_t v = ea[0][b][k];
        EXPECT(v >= 0 && v < H * W, "context index %ld", (long)v);
        if (k > 0) EXPECT(v > ea[0][b][k - 1], "context indices sorted");
        EXPECT(targets.count(v) == 0, "context index %ld overlaps a target (seed %ld, image %ld)", (long)v, (long)seed, (long)b);
      }
    }
    auto [e2, p2] = fastjepa::sample_masks(B, H, W, enc, pred, aspect, 1, 4, min_keep, false, seed);
    EXPECT(at::equal(e, e2) && at::equal(p, p2), "same seed, different masks");
  }
  bool threw = false;
  try {
    fastjepa::sample_masks(4, 16, 16, enc, pred, aspect, 1, 4, 300, false, 0);
  } catch (const c10::ValueError&) {
    threw = true;
  }
  EXPECT(threw, "min_keep=300 on 16x16 did not raise ValueError");
}

void test_gather_tokens_vs_naive_loop() {
  const int64_t B = 3, N = 17, D = 13, M = 2, K = 11;
  const at::Tensor x = at::randn({B, N, D}), pos = at::randn({1, N, D});
  const at::Tensor idx = at::randint(0, 5, {M, B, K}, at::kInt);  // many repeated indices
  const at::Tensor out = fastjepa::gather_tokens_fwd_cpu(x, idx, pos);
  const at::Tensor grad = at::randn({M * B, K, D});
  auto [gx, gpos] = fastjepa::gather_tokens_bwd_cpu(grad, idx, N, at::kFloat, true);
  at::Tensor want = at::empty({M * B, K, D}), want_gx = at::zeros({B, N, D}), want_gpos = at::zeros({N, D});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = idx[m][b][k].item<int64_t>();
        want[m * B + b][k] = x[b][n] + pos[0][n];
        want_gx[b][n] += grad[m * B + b][k];
        want_gpos[n] += grad[m * B + b][k];
      }
  EXPECT(at::allclose(out, want), "forward differs from the naive loop");
  EXPECT(at::allclose(gx, want_gx, 1e-5, 1e-5), "grad_x differs from the naive loop");
  EXPECT(at::allclose(gpos, want_gpos, 1e-5, 1e-5), "grad_pos differs from the naive loop");
  // the same op through the dispatcher, as Python calls it
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("fastjepa::gather_tokens_fwd", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>();
  EXPECT(at::equal(op.call(x, idx, pos), out), "dispatcher call differs from the direct call");
}

}  // namespace

int main() {
  test_block_size();
  test_sampler_invariants();
  test_gather_tokens_vs_naive_loop();
  std::printf("%s (%d failures)\n", failures == 0 ? "PASS" : "FAIL", failures);
  return failures == 0 ? 0 : 1;
}
