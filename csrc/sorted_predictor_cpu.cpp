// CPU kernels of the sorted predictor input and its inverse (V-JEPA 2's predictor):
// sorted_predictor_tokens_{fwd,bwd}, sorted_predictor_take_{fwd,bwd}; schemas included.
//
// Notation: R rows, Kc context and Kt target tokens per row, L = Kc + Kt, off = 1 with a
// class token in front (else 0), Lk = L - chop kept sorted slots. order[r, s]: the unsorted
// slot at sorted slot s (< Kc context, else target order - Kc); inverse: its inverse
// permutation; positions[r, s]: the token position at s.
//
//   fwd:  out[r, off + s] = round_ctx(ctx[r, off + order[r, s]] + pos[positions[r, s]])  (context slot)
//                         = round_tgt(mask_token + pos[positions[r, s]])                  (target slot)
//         out[r, 0] = ctx[r, 0] with a class token; no pos when pos is None.
//   bwd:  grad_ctx[r, off + c] = grad[r, off + inverse[r, c]] (0 when chopped), class row copied;
//         grad_mask_token = fp32 sum over target slots; grad_pos (optional) summed at positions.
//   take: out[r, t] = y[r, off + inverse[r, Kc + t]]; its bwd writes grad[r, order - Kc] at
//         target slots and 0 at class and context slots.
//
// round_ctx rounds to ctx's dtype (V-JEPA 2 adds the pos in place), round_tgt to the promoted
// dtype of mask_token and pos; the output has the promoted dtype of all three. Each output
// row is written by one task, the mask-token sum runs in a fixed order, so results do not
// depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace fastjepa {
namespace {

constexpr int64_t kGrain = 16;  // token rows per parallel task at least

template <typename acc_t>
inline acc_t round_to(acc_t v, at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return static_cast<acc_t>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
    case at::kHalf:
      return static_cast<acc_t>(static_cast<float>(c10::Half(static_cast<float>(v))));
    case at::kFloat:
      return static_cast<acc_t>(static_cast<float>(v));
    default:
      return v;
  }
}

void check_float3(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " has shape ", t.sizes(), ", expected 3 dims");
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected a floating dtype");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected the CPU");
}

// (R, L) integer tensor with values in [0, n), returned as contiguous int64.
at::Tensor slots(const at::Tensor& t, const char* op, const char* name, int64_t R, int64_t L, int64_t n) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == R && t.size(1) == L, op, ": ", name, " has shape ", t.sizes(),
              ", expected (", R, ", ", L, ")");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected int32 or int64");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected the CPU");
  if (t.numel() > 0) {
    const auto mm = at::aminmax(t);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < n, op, ": ", name, " holds ", (lo < 0 ? lo : hi), ", expected 0 <= value < ", n);
  }
  return t.to(at::kLong).contiguous();
}

}  // namespace

at::Tensor sorted_predictor_tokens_fwd_cpu(
    const at::Tensor& ctx_, const at::Tensor& order_, const at::Tensor& inverse_, const at::Tensor& positions_,
    const c10::optional<at::Tensor>& pos_, const at::Tensor& mt_, bool has_cls, int64_t chop) {
  const char* op = "sorted_predictor_tokens";
  (void)inverse_;  // an input for the backward only
  check_float3(ctx_, op, "ctx");
  const int64_t off = has_cls ? 1 : 0, R = ctx_.size(0), Kc = ctx_.size(1) - off, P = ctx_.size(2);
  TORCH_CHECK(Kc >= 0, op, ": ctx has shape ", ctx_.sizes(), ", expected a class token first (has_cls=True)");
  TORCH_CHECK(order_.dim() == 2, op, ": order has shape ", order_.sizes(), ", expected (", R, ", L)");
  const int64_t L = order_.size(1), Lk = L - chop;
  TORCH_CHECK(L >= Kc && chop >= 0 && chop <= L, op, ": chop=", chop, " with L=", L, " and Kc=", Kc,
              ", expected 0 <= chop <= L and L >= Kc");
  const at::Tensor order = slots(order_, op, "order", R, L, L);
  TORCH_CHECK(mt_.numel() == P && mt_.is_floating_point(), op, ": mask_token has shape ", mt_.sizes(), " and dtype ",
              mt_.scalar_type(), ", expected a float (1, 1, ", P, ")");
  const bool has_pos = pos_.has_value() && pos_->defined();
  at::ScalarType dt = at::promote_types(ctx_.scalar_type(), mt_.scalar_type());
  at::ScalarType tgt_dt = mt_.scalar_type();
  int64_t Npos = 0;
  at::Tensor positions;
  if (has_pos) {
    check_float3(*pos_, op, "pos");
    Npos = pos_->size(1);
    TORCH_CHECK(pos_->size(0) == 1 && pos_->size(2) == P, op, ": pos has shape ", pos_->sizes(), ", expected (1, N, ",
                P, ")");
    dt = at::promote_types(dt, pos_->scalar_type());
    tgt_dt = at::promote_types(tgt_dt, pos_->scalar_type());
    positions = slots(positions_, op, "positions", R, L, Npos);
  }
  const at::ScalarType ctx_round = (has_pos && ctx_.scalar_type() != dt) ? ctx_.scalar_type() : at::kDouble;
  const at::ScalarType tgt_round = (tgt_dt != dt) ? tgt_dt : at::kDouble;  // kDouble: no rounding
  const at::Tensor ctx = ctx_.to(dt).contiguous(), mt = mt_.to(dt).contiguous();
  const at::Tensor pos = has_pos ? pos_->to(dt).contiguous() : at::Tensor();
  const int64_t Lo = off + Lk;
  at::Tensor out = at::empty({R, Lo, P}, ctx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "sorted_predictor_tokens_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pc = ctx.data_ptr<scalar_t>();
    const scalar_t* pm = mt.data_ptr<scalar_t>();
    const scalar_t* pp = has_pos ? pos.data_ptr<scalar_t>() : nullptr;
    const int64_t* po = order.data_ptr<int64_t>();
    const int64_t* pn = has_pos ? positions.data_ptr<int64_t>() : nullptr;
    scalar_t* pout = out.data_ptr<scalar_t>();
    at::parallel_for(0, R * Lo, kGrain, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {  // q = r·Lo + u
        const int64_t r = q / Lo, u = q % Lo;
        scalar_t* o = pout + q * P;
        if (u < off) {  // the class token, unsorted, no pos
          const scalar_t* a = pc + (r * (off + Kc)) * P;
          for (int64_t d = 0; d < P; ++d) o[d] = a[d];
          continue;
        }
        const int64_t s = u - off, src = po[r * L + s];
        const bool is_ctx = src < Kc;
        const scalar_t* a = is_ctx ? pc + (r * (off + Kc) + off + src) * P : pm;
        if (pp == nullptr) {
          for (int64_t d = 0; d < P; ++d) o[d] = a[d];
          continue;
        }
        const scalar_t* b = pp + pn[r * L + s] * P;
        const at::ScalarType rt = is_ctx ? ctx_round : tgt_round;
        if (rt == at::kDouble) {
          for (int64_t d = 0; d < P; ++d) o[d] = static_cast<scalar_t>(static_cast<acc_t>(a[d]) + static_cast<acc_t>(b[d]));
        } else {
          for (int64_t d = 0; d < P; ++d)
            o[d] = static_cast<scalar_t>(round_to<acc_t>(static_cast<acc_t>(a[d]) + static_cast<acc_t>(b[d]), rt));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sorted_predictor_tokens_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& order_, const at::Tensor& inverse_, const at::Tensor& positions_,
    int64_t Kc, bool has_cls, int64_t npos, at::ScalarType ctx_dtype, bool pos_grad) {
  const char* op = "sorted_predictor_tokens backward";
  check_float3(grad_, op, "grad");
  const int64_t off = has_cls ? 1 : 0, R = grad_.size(0), P = grad_.size(2), Lk = grad_.size(1) - off;
  TORCH_CHECK(order_.dim() == 2, op, ": order has shape ", order_.sizes(), ", expected (", R, ", L)");
  const int64_t L = order_.size(1);
  TORCH_CHECK(Lk >= 0 && Lk <= L && Kc >= 0 && Kc <= L, op, ": grad of shape ", grad_.sizes(), " with n_ctxt=", Kc,
              ", has_cls=", has_cls, " does not fit order of shape ", order_.sizes());
  const at::Tensor order = slots(order_, op, "order", R, L, L);
  const at::Tensor inverse = slots(inverse_, op, "inverse", R, L, L);
  const at::Tensor positions = pos_grad ? slots(positions_, op, "positions", R, L, npos) : at::Tensor();
  const at::Tensor grad = grad_.contiguous();
  at::Tensor gctx = at::empty({R, off + Kc, P}, grad.options().dtype(ctx_dtype));
  at::Tensor gmt = at::empty({P}, grad.options().dtype(at::kFloat));
  at::Tensor gpos = pos_grad ? at::zeros({npos, P}, grad.options().dtype(at::kFloat)) : at::empty({0}, grad.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "sorted_predictor_tokens_bwd_cpu", [&] {
    using grad_t = scalar_t;
    const grad_t* pg = grad.data_ptr<grad_t>();
    const int64_t* po = order.data_ptr<int64_t>();
    const int64_t* pi = inverse.data_ptr<int64_t>();
    const int64_t Lo = off + Lk, Lc = off + Kc;
    // ctx: a gather through the inverse permutation, zeros where the token was chopped
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ctx_dtype, "sorted_predictor_tokens_bwd_cpu_ctx", [&] {
      scalar_t* pc = gctx.data_ptr<scalar_t>();
      at::parallel_for(0, R * Lc, kGrain, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {  // q = r·(off + Kc) + c
          const int64_t r = q / Lc, c = q % Lc;
          scalar_t* o = pc + q * P;
          const int64_t s = c < off ? -1 : pi[r * L + c - off];
          const grad_t* g = c < off ? pg + r * Lo * P : (s < Lk ? pg + (r * Lo + off + s) * P : nullptr);
          if (g == nullptr) {
            for (int64_t d = 0; d < P; ++d) o[d] = scalar_t(0);
          } else {
            for (int64_t d = 0; d < P; ++d) o[d] = static_cast<scalar_t>(g[d]);
          }
        }
      });
    });
    // mask token: one fp32 partial per row, then the rows in order
    std::vector<float> part(R * P, 0.f);
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* acc = &part[r * P];
        for (int64_t s = 0; s < Lk; ++s) {
          if (po[r * L + s] < Kc) continue;
          const grad_t* g = pg + (r * Lo + off + s) * P;
          for (int64_t d = 0; d < P; ++d) acc[d] += static_cast<float>(g[d]);
        }
      }
    });
    float* pm = gmt.data_ptr<float>();
    std::fill(pm, pm + P, 0.f);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < P; ++d) pm[d] += part[r * P + d];
    // pos table (fixed in V-JEPA 2; for generality): a serial scatter-add, deterministic
    if (pos_grad) {
      const int64_t* pn = positions.data_ptr<int64_t>();
      float* pp = gpos.data_ptr<float>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t s = 0; s < Lk; ++s) {
          const grad_t* g = pg + (r * Lo + off + s) * P;
          float* o = pp + pn[r * L + s] * P;
          for (int64_t d = 0; d < P; ++d) o[d] += static_cast<float>(g[d]);
        }
    }
  });
  return {gctx, gmt, gpos};
}

at::Tensor sorted_predictor_take_fwd_cpu(
    const at::Tensor& y_, const at::Tensor& order_, const at::Tensor& inverse_, int64_t Kc, bool has_cls) {
  const char* op = "sorted_predictor_take_targets";
  (void)order_;  // an input for the backward only
  check_float3(y_, op, "y");
  const int64_t off = has_cls ? 1 : 0, R = y_.size(0), P = y_.size(2);
  TORCH_CHECK(inverse_.dim() == 2, op, ": inverse has shape ", inverse_.sizes(), ", expected (", R, ", L)");
  const int64_t L = inverse_.size(1), Kt = L - Kc;
  TORCH_CHECK(y_.size(1) == off + L && Kc >= 0 && Kt >= 0, op, ": y has shape ", y_.sizes(), ", expected (", R, ", ",
              off + L, ", D) for n_ctxt=", Kc, ", has_cls=", has_cls, " and an order of ", L, " tokens");
  const at::Tensor inverse = slots(inverse_, op, "inverse", R, L, L);
  const at::Tensor y = y_.contiguous();
  at::Tensor out = at::empty({R, Kt, P}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "sorted_predictor_take_fwd_cpu", [&] {
    const scalar_t* py = y.data_ptr<scalar_t>();
    const int64_t* pi = inverse.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, R * Kt, kGrain, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {  // q = r·Kt + t
        const int64_t r = q / Kt, t = q % Kt;
        const scalar_t* a = py + (r * (off + L) + off + pi[r * L + Kc + t]) * P;
        scalar_t* o = po + q * P;
        for (int64_t d = 0; d < P; ++d) o[d] = a[d];
      }
    });
  });
  return out;
}

at::Tensor sorted_predictor_take_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& order_, int64_t Kc, bool has_cls, at::ScalarType y_dtype) {
  const char* op = "sorted_predictor_take_targets backward";
  check_float3(grad_, op, "grad");
  const int64_t off = has_cls ? 1 : 0, R = grad_.size(0), Kt = grad_.size(1), P = grad_.size(2);
  TORCH_CHECK(order_.dim() == 2 && order_.size(1) == Kc + Kt, op, ": order has shape ", order_.sizes(), ", expected (",
              R, ", ", Kc + Kt, ")");
  const int64_t L = Kc + Kt;
  const at::Tensor order = slots(order_, op, "order", R, L, L);
  const at::Tensor grad = grad_.contiguous();
  at::Tensor out = at::empty({R, off + L, P}, grad.options().dtype(y_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "sorted_predictor_take_bwd_cpu", [&] {
    using grad_t = scalar_t;
    const grad_t* pg = grad.data_ptr<grad_t>();
    const int64_t* po = order.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_dtype, "sorted_predictor_take_bwd_cpu_y", [&] {
      scalar_t* pout = out.data_ptr<scalar_t>();
      const int64_t Lo = off + L;
      at::parallel_for(0, R * Lo, kGrain, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {  // q = r·(off + L) + u
          const int64_t r = q / Lo, u = q % Lo;
          const int64_t src = u < off ? -1 : po[r * L + u - off];
          scalar_t* o = pout + q * P;
          if (src < Kc) {  // the class token or a context token
            for (int64_t d = 0; d < P; ++d) o[d] = scalar_t(0);
          } else {
            const grad_t* g = pg + (r * Kt + src - Kc) * P;
            for (int64_t d = 0; d < P; ++d) o[d] = static_cast<scalar_t>(g[d]);
          }
        }
      });
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(fastjepa, m) {
  m.def(
      "sorted_predictor_tokens_fwd(Tensor ctx, Tensor order, Tensor inverse, Tensor positions, Tensor? pos, "
      "Tensor mask_token, bool has_cls, int chop) -> Tensor");
  m.def(
      "sorted_predictor_tokens_bwd(Tensor grad, Tensor order, Tensor inverse, Tensor positions, int n_ctxt, "
      "bool has_cls, int npos, ScalarType ctx_dtype, bool pos_grad) -> (Tensor, Tensor, Tensor)");
  m.def("sorted_predictor_take_fwd(Tensor y, Tensor order, Tensor inverse, int n_ctxt, bool has_cls) -> Tensor");
  m.def(
      "sorted_predictor_take_bwd(Tensor grad, Tensor order, int n_ctxt, bool has_cls, ScalarType y_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastjepa, CPU, m) {
  m.impl("sorted_predictor_tokens_fwd", &sorted_predictor_tokens_fwd_cpu);
  m.impl("sorted_predictor_tokens_bwd", &sorted_predictor_tokens_bwd_cpu);
  m.impl("sorted_predictor_take_fwd", &sorted_predictor_take_fwd_cpu);
  m.impl("sorted_predictor_take_bwd", &sorted_predictor_take_bwd_cpu);
}

}  // namespace fastjepa
