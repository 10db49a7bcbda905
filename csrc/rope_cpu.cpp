// CPU kernel of the fused 3-D / 2-D rotary position embedding of q and k (V-JEPA 2's
// RoPEAttention semantics; the definition is fastjepa/ops/rope.py's reference).
//
// rope_fwd(q, k, ids?, n_axes, tpf, tpr, interleaved, backward) -> (q_out, k_out):
// q, k (B, NH, N, D) with any strides, ids (B, N) or (N,) int32/int64 (or none: arange(N)).
// For channel c < n_axes·d (d = 2·((D / n_axes) / 2)) of axis a = c / d, local l = c mod d:
//   forward   out[c] = x[c]·cos θ(c) + s(c)·x[c^1]·sin θ(c)
//   backward  gx[c]  = g[c]·cos θ(c) - s(c)·g[c^1]·sin θ(c^1)   (the transpose)
// s = -1 on even channels, +1 on odd; θ(c) = pos_a(t)·omega[f(l)], f(l) = l mod d/2 (V-JEPA 2's
// layout) or l / 2 (interleaved). Leftover channels are copied. The position, omega and the
// angle are rounded to the input dtype (V-JEPA 2 computes them in it); sin, cos and the
// rotation are evaluated in fp32 (fp64 for double) and rounded once.
//
// Rows (b, n) are split over threads with at::parallel_for; each row's sin/cos are
// evaluated once and applied to every head of q and of k, so results do not depend on
// the thread count. The schema is a fragment of the fastjepa library (csrc/ext.cpp holds
// the main one); fake and autograd are registered from Python (fastjepa/ops/_rope_cpp.py).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace fastjepa {
namespace {

constexpr double kBase = 10000.0;
constexpr int64_t kRopeGrain = 8;  // (b, n) rows per parallel task at least (a row is 2·NH·D elements)

// omega_j = 1 / 10000^(j / half), every step in dtype `dt` with the ATen ops V-JEPA 2 uses
// (arange, in-place divide, scalar ** tensor, 1 / x = reciprocal), returned in the
// kernel's math type.
at::Tensor omega_table(int64_t half, at::ScalarType dt) {
  at::Tensor om = at::arange(half, at::TensorOptions().dtype(dt));
  om.div_(static_cast<double>(half));
  om = at::pow(c10::Scalar(kBase), om).reciprocal();
  return om.to(dt == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

void check_qk(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "rope: ", name, " has shape ", t.sizes(), ", expected (B, heads, N, head_dim)");
  TORCH_CHECK(t.is_floating_point(), "rope: ", name, " has dtype ", t.scalar_type(), ", expected a floating dtype");
  TORCH_CHECK(t.device().is_cpu(), "rope: ", name, " is on ", t.device(), ", expected the CPU");
}

template <typename scalar_t>
void rope_rows(const at::Tensor& q, const at::Tensor& k, at::Tensor& qo, at::Tensor& ko, const int64_t* ids,
               int64_t sib, int64_t sid, const at::Tensor& omega, int64_t n_axes, int64_t tpf, int64_t tpr,
               bool interleaved, bool backward) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), NH = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t d = 2 * ((D / n_axes) / 2), half = d / 2, R = n_axes * d;
  const acc_t* om = omega.data_ptr<acc_t>();
  const scalar_t* pq = q.data_ptr<scalar_t>();
  const scalar_t* pk = k.data_ptr<scalar_t>();
  scalar_t* pqo = qo.data_ptr<scalar_t>();
  scalar_t* pko = ko.data_ptr<scalar_t>();
  const int64_t sq[4] = {q.stride(0), q.stride(1), q.stride(2), q.stride(3)};
  const int64_t sk[4] = {k.stride(0), k.stride(1), k.stride(2), k.stride(3)};
  auto round = [](acc_t v) { return static_cast<acc_t>(static_cast<scalar_t>(v)); };  // to the input dtype
  at::parallel_for(0, B * N, kRopeGrain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> cs(R), sn(R);
    for (int64_t r = r0; r < r1; ++r) {  // r = b·N + n
      const int64_t b = r / N, n = r % N;
      const int64_t t = ids != nullptr ? ids[b * sib + n * sid] : n;
      int64_t pos[3];
      if (n_axes == 3) {
        pos[0] = t / tpf;  // frame
        const int64_t rest = t - pos[0] * tpf;
        pos[1] = rest / tpr;  // row
        pos[2] = rest - pos[1] * tpr;  // column
      } else {
        pos[0] = t / tpr;  // row
        pos[1] = t - pos[0] * tpr;  // column
      }
      for (int64_t c = 0; c < R; ++c) {
        const int64_t a = c / d, l = c - a * d;
        const int64_t f_cos = interleaved ? l / 2 : l % half;
        const int64_t f_sin = interleaved ? f_cos : (backward ? (l ^ 1) % half : f_cos);
        const acc_t p = round(static_cast<acc_t>(pos[a]));
        const acc_t sign = ((c % 2 == 0) != backward) ? acc_t(-1) : acc_t(1);
        cs[c] = std::cos(round(p * om[f_cos]));
        sn[c] = sign * std::sin(round(p * om[f_sin]));
      }
      for (int64_t h = 0; h < NH; ++h) {
        const scalar_t* xq = pq + b * sq[0] + h * sq[1] + n * sq[2];
        const scalar_t* xk = pk + b * sk[0] + h * sk[1] + n * sk[2];
        scalar_t* oq = pqo + ((b * NH + h) * N + n) * D;
        scalar_t* ok = pko + ((b * NH + h) * N + n) * D;
        for (int64_t c = 0; c < R; ++c) {
          const int64_t p = c ^ 1;
          oq[c] = static_cast<scalar_t>(static_cast<acc_t>(xq[c * sq[3]]) * cs[c] + static_cast<acc_t>(xq[p * sq[3]]) * sn[c]);
          ok[c] = static_cast<scalar_t>(static_cast<acc_t>(xk[c * sk[3]]) * cs[c] + static_cast<acc_t>(xk[p * sk[3]]) * sn[c]);
        }
        for (int64_t c = R; c < D; ++c) {
          oq[c] = xq[c * sq[3]];
          ok[c] = xk[c * sk[3]];
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const c10::optional<at::Tensor>& ids_, int64_t n_axes, int64_t tpf,
                                                int64_t tpr, bool interleaved, bool backward) {
  check_qk(q, "q");
  check_qk(k, "k");
  TORCH_CHECK(k.sizes() == q.sizes() && k.scalar_type() == q.scalar_type(), "rope: k is ", k.sizes(), " ",
              k.scalar_type(), ", expected q's ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(n_axes == 2 || n_axes == 3, "rope: n_axes=", n_axes, ", expected 2 (H, W) or 3 (T, H, W)");
  TORCH_CHECK(tpf >= 1 && tpr >= 1, "rope: tpf=", tpf, ", tpr=", tpr, ", expected positive tokens per frame and row");
  const int64_t B = q.size(0), N = q.size(2), D = q.size(3);
  TORCH_CHECK(D / n_axes >= 2, "rope: head_dim=", D, " is too small for ", n_axes, " axes: expected head_dim >= ",
              2 * n_axes);
  const bool has_ids = ids_.has_value() && ids_->defined();
  at::Tensor ids;
  int64_t sib = 0, sid = 0;
  if (has_ids) {
    TORCH_CHECK(ids_->scalar_type() == at::kInt || ids_->scalar_type() == at::kLong, "rope: ids has dtype ",
                ids_->scalar_type(), ", expected int32 or int64");
    TORCH_CHECK((ids_->dim() == 1 && ids_->size(0) == N) || (ids_->dim() == 2 && ids_->size(0) == B && ids_->size(1) == N),
                "rope: ids has shape ", ids_->sizes(), ", expected (", B, ", ", N, ") or (", N, ")");
    TORCH_CHECK(ids_->device().is_cpu(), "rope: ids is on ", ids_->device(), ", expected the CPU");
    ids = ids_->to(at::kLong).contiguous();
    sib = ids.dim() == 2 ? N : 0;
    sid = 1;
  }
  at::Tensor qo = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ko = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (qo.numel() == 0) return {qo, ko};
  const at::Tensor omega = omega_table((2 * ((D / n_axes) / 2)) / 2, q.scalar_type());
  const int64_t* pi = has_ids ? ids.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_fwd_cpu", [&] {
    rope_rows<scalar_t>(q, k, qo, ko, pi, sib, sid, omega, n_axes, tpf, tpr, interleaved, backward);
  });
  return {qo, ko};
}

TORCH_LIBRARY_FRAGMENT(fastjepa, m) {
  m.def(
      "rope_fwd(Tensor q, Tensor k, Tensor? ids, int n_axes, int tpf, int tpr, bool interleaved, bool backward) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastjepa, CPU, m) { m.impl("rope_fwd", &rope_fwd_cpu); }

}  // namespace fastjepa
