// CPU kernels of the fused ops (docs/design.md §7): gather_tokens, predictor_tokens, target_tokens.
//
// Loops over output rows with at::parallel_for (OpenMP); feature loops in fp32 that the
// compiler vectorises. Every output row is written by exactly one task, so the results,
// backward sums included, do not depend on the thread count. Floating dtypes: fp32,
// bf16, fp16 (and fp64). Indices: int32 or int64 (read as int64).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "fastjepa.h"

namespace fastjepa {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per parallel task at least (a row is D elements)

// Common dtype of the float inputs; every input is converted to it (pos / mask_token are
// small, a large input is converted only when mixed dtypes are passed).
at::ScalarType common_dtype(std::initializer_list<at::Tensor> ts) {
  at::ScalarType t = ts.begin()->scalar_type();
  for (const auto& x : ts) t = at::promote_types(t, x.scalar_type());
  return t;
}

void check_float3(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " has shape ", t.sizes(), ", expected 3 dims");
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected a floating dtype");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected the CPU");
}

}  // namespace

void check_index(const at::Tensor& idx, const char* op, const char* name, int64_t n, bool check_values) {
  TORCH_CHECK(idx.dim() == 3, op, ": ", name, " has shape ", idx.sizes(), ", expected (M, B, K)");
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op, ": ", name, " has dtype ",
              idx.scalar_type(), ", expected int32 or int64");
  if (!check_values || idx.numel() == 0) return;
  const auto mm = at::aminmax(idx);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < n, op, ": ", name, " holds index ", (lo < 0 ? lo : hi), ", out of range for ", n,
                    " tokens (expected 0 <= index < ", n, ")");
}

// -- gather_tokens ---------------------------------------------------------------------

at::Tensor gather_tokens_fwd_cpu(const at::Tensor& x_, const at::Tensor& idx_, const c10::optional<at::Tensor>& pos_) {
  const char* op = "gather_tokens";
  check_float3(x_, op, "x");
  const int64_t B = x_.size(0), N = x_.size(1), D = x_.size(2);
  check_index(idx_, op, "idx", N, true);
  TORCH_CHECK(idx_.size(1) == B, op, ": idx has batch ", idx_.size(1), ", expected x.size(0)=", B);
  const bool has_pos = pos_.has_value() && pos_->defined();
  at::ScalarType dt = x_.scalar_type();
  if (has_pos) {
    check_float3(*pos_, op, "pos");
    TORCH_CHECK(pos_->size(0) == 1 && pos_->size(1) >= N && pos_->size(2) == D, op, ": pos has shape ", pos_->sizes(),
                ", expected (1, ", N, ", ", D, ")");
    dt = common_dtype({x_, *pos_});
  }
  const at::Tensor x = x_.to(dt).contiguous();
  const at::Tensor pos = has_pos ? pos_->to(dt).contiguous() : at::Tensor();
  const at::Tensor idx = idx_.to(at::kLong).contiguous();
  const int64_t M = idx.size(0), K = idx.size(2);
  at::Tensor out = at::empty({M * B, K, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "gather_tokens_fwd_cpu", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pp = has_pos ? pos.data_ptr<scalar_t>() : nullptr;
    const int64_t* pi = idx.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, M * B * K, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // r = (m·B + b)·K + k
        const int64_t b = (r / K) % B, n = pi[r];
        const scalar_t* xr = px + (b * N + n) * D;
        scalar_t* o = po + r * D;
        if (pp != nullptr) {
          const scalar_t* q = pp + n * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(static_cast<float>(xr[d]) + static_cast<float>(q[d]));
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = xr[d];
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_tokens_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& idx_, int64_t n, at::ScalarType x_dtype, bool pos_grad) {
  const char* op = "gather_tokens backward";
  check_float3(grad_, op, "grad");
  check_index(idx_, op, "idx", n, false);
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor idx = idx_.to(at::kLong).contiguous();
  const int64_t M = idx.size(0), B = idx.size(1), K = idx.size(2), D = grad.size(2);
  TORCH_CHECK(grad.size(0) == M * B && grad.size(1) == K, op, ": grad has shape ", grad.sizes(), ", expected (",
              M * B, ", ", K, ", ", D, ")");
  // Per image, a counting sort of its M·K source rows by token: start (B, n+1), src (B, M·K).
  // Sources of one token stay in (m, k) order, so every sum has a fixed order.
  std::vector<int64_t> start(B * (n + 1), 0), src(B * M * K);
  const int64_t* pi = idx.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* st = &start[b * (n + 1)];
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) ++st[pi[(m * B + b) * K + k] + 1];
      for (int64_t t = 0; t < n; ++t) st[t + 1] += st[t];
      std::vector<int64_t> fill(st, st + n);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = (m * B + b) * K + k;
          src[b * M * K + fill[pi[r]]++] = r;
        }
    }
  });
  at::Tensor gx = at::empty({B, n, D}, grad.options().dtype(x_dtype));
  at::Tensor gpos = at::empty({pos_grad ? n : 0, D}, grad.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gather_tokens_bwd_cpu", [&] {
    using grad_t = scalar_t;
    const grad_t* pg = grad.data_ptr<grad_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_dtype, "gather_tokens_bwd_cpu_out", [&] {
      scalar_t* px = gx.data_ptr<scalar_t>();
      at::parallel_for(0, B * n, kRowGrain, [&](int64_t r0, int64_t r1) {
        std::vector<float> acc(D);
        for (int64_t r = r0; r < r1; ++r) {  // r = b·n + t
          const int64_t b = r / n, t = r % n;
          const int64_t* st = &start[b * (n + 1)];
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t s = st[t]; s < st[t + 1]; ++s) {
            const grad_t* g = pg + src[b * M * K + s] * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(g[d]);
          }
          scalar_t* o = px + r * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
        }
      });
    });
    if (pos_grad) {
      float* pp = gpos.data_ptr<float>();
      at::parallel_for(0, n, kRowGrain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          float* o = pp + t * D;
          std::fill(o, o + D, 0.f);
          for (int64_t b = 0; b < B; ++b) {
            const int64_t* st = &start[b * (n + 1)];
            for (int64_t s = st[t]; s < st[t + 1]; ++s) {
              const grad_t* g = pg + src[b * M * K + s] * D;
              for (int64_t d = 0; d < D; ++d) o[d] += static_cast<float>(g[d]);
            }
          }
        }
      });
    }
  });
  return {gx, gpos};
}

// -- predictor_tokens ------------------------------------------------------------------

at::Tensor predictor_tokens_fwd_cpu(
    const at::Tensor& ctx_, const at::Tensor& idx_x_, const at::Tensor& idx_, const at::Tensor& pos_,
    const at::Tensor& mt_) {
  const char* op = "predictor_tokens";
  check_float3(ctx_, op, "ctx");
  check_float3(pos_, op, "pos");
  const int64_t P = ctx_.size(2), Npos = pos_.size(1);
  TORCH_CHECK(pos_.size(0) == 1 && pos_.size(2) == P, op, ": pos has shape ", pos_.sizes(), ", expected (1, N, ", P, ")");
  TORCH_CHECK(mt_.numel() == P, op, ": mask_token has shape ", mt_.sizes(), ", expected (1, 1, ", P, ")");
  check_index(idx_x_, op, "idx_x", Npos, true);
  check_index(idx_, op, "idx", Npos, true);
  const int64_t nenc = idx_x_.size(0), B = idx_x_.size(1), Kc = idx_x_.size(2);
  const int64_t npred = idx_.size(0), Kt = idx_.size(2);
  TORCH_CHECK(ctx_.size(0) == nenc * B && ctx_.size(1) == Kc, op, ": ctx has shape ", ctx_.sizes(), ", expected (",
              nenc * B, ", ", Kc, ", ", P, ") from idx_x ", idx_x_.sizes());
  TORCH_CHECK(idx_.size(1) == B, op, ": idx has batch ", idx_.size(1), ", expected ", B, " (idx_x's)");
  const at::ScalarType dt = common_dtype({ctx_, pos_, mt_});
  const at::Tensor ctx = ctx_.to(dt).contiguous(), pos = pos_.to(dt).contiguous(), mt = mt_.to(dt).contiguous();
  const at::Tensor idx_x = idx_x_.to(at::kLong).contiguous(), idx = idx_.to(at::kLong).contiguous();
  const int64_t L = Kc + Kt, R = npred * nenc * B;
  at::Tensor out = at::empty({R, L, P}, ctx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "predictor_tokens_fwd_cpu", [&] {
    const scalar_t* pc = ctx.data_ptr<scalar_t>();
    const scalar_t* pp = pos.data_ptr<scalar_t>();
    const scalar_t* pm = mt.data_ptr<scalar_t>();
    const int64_t* pix = idx_x.data_ptr<int64_t>();
    const int64_t* pit = idx.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, R * L, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // r = ((j·nenc + i)·B + b)·L + s
        const int64_t s = r % L, row = r / L, b = row % B, i = (row / B) % nenc, j = row / (B * nenc);
        scalar_t* o = po + r * P;
        const scalar_t* a;  // ctx row or the mask token
        const scalar_t* q;  // pos row
        if (s < Kc) {
          a = pc + ((i * B + b) * Kc + s) * P;
          q = pp + pix[(i * B + b) * Kc + s] * P;
        } else {
          a = pm;
          q = pp + pit[(j * B + b) * Kt + (s - Kc)] * P;
        }
        for (int64_t d = 0; d < P; ++d) o[d] = static_cast<scalar_t>(static_cast<float>(a[d]) + static_cast<float>(q[d]));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> predictor_tokens_bwd_cpu(
    const at::Tensor& grad_, int64_t nenc, int64_t npred, int64_t Kc, at::ScalarType ctx_dtype) {
  const char* op = "predictor_tokens backward";
  check_float3(grad_, op, "grad");
  const at::Tensor grad = grad_.contiguous();
  const int64_t R = grad.size(0), L = grad.size(1), P = grad.size(2), Kt = L - Kc;
  TORCH_CHECK(nenc >= 1 && npred >= 1 && R % (nenc * npred) == 0 && Kc >= 0 && Kt >= 0, op, ": nenc=", nenc,
              ", npred=", npred, ", Kc=", Kc, " do not fit grad of shape ", grad.sizes());
  const int64_t B = R / (nenc * npred);
  at::Tensor gctx = at::empty({nenc * B, Kc, P}, grad.options().dtype(ctx_dtype));
  at::Tensor gmt = at::empty({P}, grad.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "predictor_tokens_bwd_cpu", [&] {
    using grad_t = scalar_t;
    const grad_t* pg = grad.data_ptr<grad_t>();
    // ctx: each (i, b, s) row is the sum of its npred copies, in j order
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ctx_dtype, "predictor_tokens_bwd_cpu_ctx", [&] {
      scalar_t* pc = gctx.data_ptr<scalar_t>();
      at::parallel_for(0, nenc * B * Kc, kRowGrain, [&](int64_t r0, int64_t r1) {
        std::vector<float> acc(P);
        for (int64_t r = r0; r < r1; ++r) {  // r = (i·B + b)·Kc + s
          const int64_t s = r % Kc, ib = r / Kc;
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < npred; ++j) {
            const grad_t* g = pg + ((j * nenc * B + ib) * L + s) * P;
            for (int64_t d = 0; d < P; ++d) acc[d] += static_cast<float>(g[d]);
          }
          scalar_t* o = pc + r * P;
          for (int64_t d = 0; d < P; ++d) o[d] = static_cast<scalar_t>(acc[d]);
        }
      });
    });
    // mask token: fixed chunks of mask rows summed in fp32, then the chunk sums in order
    const int64_t rows = R * Kt, chunk = 256, nchunk = std::max<int64_t>((rows + chunk - 1) / chunk, 1);
    std::vector<float> part(nchunk * P, 0.f);
    at::parallel_for(0, nchunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* acc = &part[c * P];
        for (int64_t q = c * chunk; q < std::min(rows, (c + 1) * chunk); ++q) {
          const grad_t* g = pg + ((q / Kt) * L + Kc + q % Kt) * P;
          for (int64_t d = 0; d < P; ++d) acc[d] += static_cast<float>(g[d]);
        }
      }
    });
    float* pm = gmt.data_ptr<float>();
    std::fill(pm, pm + P, 0.f);
    for (int64_t c = 0; c < nchunk; ++c)
      for (int64_t d = 0; d < P; ++d) pm[d] += part[c * P + d];
  });
  return {gctx, gmt};
}

// -- target_tokens ---------------------------------------------------------------------

at::Tensor target_tokens_cpu(const at::Tensor& h_, const at::Tensor& idx_, int64_t nenc) {
  const char* op = "target_tokens";
  check_float3(h_, op, "h");
  const int64_t B = h_.size(0), N = h_.size(1), D = h_.size(2);
  check_index(idx_, op, "idx", N, true);
  TORCH_CHECK(idx_.size(1) == B, op, ": idx has batch ", idx_.size(1), ", expected h.size(0)=", B);
  TORCH_CHECK(nenc >= 1, op, ": nenc=", nenc, ", expected >= 1");
  const at::Tensor h = h_.contiguous();
  const at::Tensor idx = idx_.to(at::kLong).contiguous();
  const int64_t npred = idx.size(0), Kt = idx.size(2);
  at::Tensor out = at::empty({npred * nenc * B, Kt, D}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "target_tokens_cpu", [&] {
    const scalar_t* ph = h.data_ptr<scalar_t>();
    const int64_t* pi = idx.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, npred * B * Kt, kRowGrain, [&](int64_t r0, int64_t r1) {
      std::vector<float> y(D);
      for (int64_t r = r0; r < r1; ++r) {  // r = (j·B + b)·Kt + t
        const int64_t t = r % Kt, b = (r / Kt) % B, j = r / (Kt * B);
        const scalar_t* x = ph + (b * N + pi[r]) * D;
        float* py = y.data();
        for (int64_t d = 0; d < D; ++d) py[d] = static_cast<float>(x[d]);
        float mean = 0.f;
        _Pragma("omp simd reduction(+ : mean)")  // a vectorised sum (the order of an fp32 sum is free here)
        for (int64_t d = 0; d < D; ++d) mean += py[d];
        mean /= static_cast<float>(D);
        float var = 0.f;
        _Pragma("omp simd reduction(+ : var)")
        for (int64_t d = 0; d < D; ++d) var += (py[d] - mean) * (py[d] - mean);
        const float rstd = 1.f / std::sqrt(var / static_cast<float>(D) + 1e-5f);
        for (int64_t d = 0; d < D; ++d) py[d] = (py[d] - mean) * rstd;
        for (int64_t i = 0; i < nenc; ++i) {
          scalar_t* o = po + (((j * nenc + i) * B + b) * Kt + t) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(y[d]);
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastjepa, CPU, m) {
  m.impl("gather_tokens_fwd", &gather_tokens_fwd_cpu);
  m.impl("gather_tokens_bwd", &gather_tokens_bwd_cpu);
  m.impl("predictor_tokens_fwd", &predictor_tokens_fwd_cpu);
  m.impl("predictor_tokens_bwd", &predictor_tokens_bwd_cpu);
  m.impl("target_tokens", &target_tokens_cpu);
}

}  // namespace fastjepa
