// CUDA kernels of gather_tokens (docs/design.md §7), registered under TORCH_LIBRARY_IMPL(fastjepa, CUDA).
//
// Forward: one warp-strided pass per output row; out[(m·B+b)·K+k] = x[b, idx] + pos[idx],
// math in fp32, one rounding to the output dtype. An out-of-range index writes a NaN row
// (no host sync; fastjepa.ops checks the range on request, validate=True).
// Backward: deterministic and free of atomics. The M·B·K (row, token) pairs are sorted by
// key b·n + token (stable, so sources keep their (m, k) order), segment starts come from
// searchsorted, and one block per grad_x row sums its segment in fp32 and writes it once.
// A pair whose index is out of range gets the key B·n, past every segment: its gradient
// is dropped (as the Triton kernels drop it), never added to a clamped row.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../fastjepa.h"

namespace fastjepa {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void gather_fwd_kernel(const T* __restrict__ x,      // (B, N, D)
                                  const T* __restrict__ pos,    // (Npos, D) or nullptr
                                  const int64_t* __restrict__ idx,  // (M, B, K)
                                  T* __restrict__ out,          // (M·B, K, D)
                                  int64_t rows, int64_t B, int64_t K, int64_t N, int64_t D) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // r = (m·B + b)·K + k
    const int64_t b = (r / K) % B, n = idx[r];
    T* o = out + r * D;
    if (n < 0 || n >= N) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) o[d] = static_cast<T>(__int_as_float(0x7fc00000));  // quiet NaN
      continue;
    }
    const T* xr = x + (b * N + n) * D;
    if (pos != nullptr) {
      const T* q = pos + n * D;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        o[d] = static_cast<T>(static_cast<float>(xr[d]) + static_cast<float>(q[d]));
    } else {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) o[d] = xr[d];
    }
  }
}

template <typename G, typename T>
__global__ void gather_bwd_kernel(const G* __restrict__ grad,        // (M·B·K, D)
                                  const int64_t* __restrict__ src,   // (M·B·K,) grad rows sorted by key
                                  const int64_t* __restrict__ start,  // (B·n + 1,) segment starts
                                  T* __restrict__ gx,                // (B·n, D)
                                  int64_t rows, int64_t D) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t s0 = start[r], s1 = start[r + 1];
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = 0.f;
      for (int64_t s = s0; s < s1; ++s) acc += static_cast<float>(grad[src[s] * D + d]);
      gx[r * D + d] = static_cast<T>(acc);
    }
  }
}

template <typename G>
__global__ void gather_bwd_pos_kernel(const G* __restrict__ grad, const int64_t* __restrict__ src,
                                      const int64_t* __restrict__ start,  // (B·n + 1,)
                                      float* __restrict__ gpos,           // (n, D)
                                      int64_t n, int64_t B, int64_t D) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t s = start[b * n + t]; s < start[b * n + t + 1]; ++s) acc += static_cast<float>(grad[src[s] * D + d]);
      gpos[t * D + d] = acc;
    }
  }
}

int blocks_for(int64_t rows) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(rows, 1), 65535 * 8)); }

at::Tensor gather_tokens_fwd_cuda(const at::Tensor& x_, const at::Tensor& idx_, const c10::optional<at::Tensor>& pos_) {
  const char* op = "gather_tokens";
  TORCH_CHECK(x_.dim() == 3 && x_.is_floating_point(), op, ": x has shape ", x_.sizes(), " and dtype ", x_.scalar_type(),
              ", expected a floating (B, N, D) tensor");
  const int64_t B = x_.size(0), N = x_.size(1), D = x_.size(2);
  check_index(idx_, op, "idx", N, false);
  TORCH_CHECK(idx_.size(1) == B, op, ": idx has batch ", idx_.size(1), ", expected x.size(0)=", B);
  TORCH_CHECK(idx_.device() == x_.device(), op, ": idx is on ", idx_.device(), ", expected ", x_.device());
  const bool has_pos = pos_.has_value() && pos_->defined();
  at::ScalarType dt = x_.scalar_type();
  if (has_pos) {
    TORCH_CHECK(pos_->dim() == 3 && pos_->size(0) == 1 && pos_->size(1) >= N && pos_->size(2) == D, op,
                ": pos has shape ", pos_->sizes(), ", expected (1, ", N, ", ", D, ")");
    TORCH_CHECK(pos_->device() == x_.device(), op, ": pos is on ", pos_->device(), ", expected ", x_.device());
    dt = at::promote_types(dt, pos_->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.to(dt).contiguous();
  const at::Tensor pos = has_pos ? pos_->to(dt).contiguous() : at::Tensor();
  const at::Tensor idx = idx_.to(at::kLong).contiguous();
  const int64_t M = idx.size(0), K = idx.size(2), rows = M * B * K;
  at::Tensor out = at::empty({M * B, K, D}, x.options());
  if (rows == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "gather_tokens_fwd_cuda", [&] {
    gather_fwd_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), has_pos ? pos.data_ptr<scalar_t>() : nullptr, idx.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), rows, B, K, N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_tokens_bwd_cuda(
    const at::Tensor& grad_, const at::Tensor& idx_, int64_t n, at::ScalarType x_dtype, bool pos_grad) {
  const char* op = "gather_tokens backward";
  check_index(idx_, op, "idx", n, false);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor idx = idx_.to(at::kLong);
  const int64_t M = idx.size(0), B = idx.size(1), K = idx.size(2), D = grad.size(2);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == M * B && grad.size(1) == K, op, ": grad has shape ", grad.sizes(),
              ", expected (", M * B, ", ", K, ", ", D, ")");
  // key of source row (m, b, k) is b·n + idx[m, b, k]; a stable sort keeps (m, k) order per key
  const at::Tensor b_of = at::arange(B, idx.options()).view({1, B, 1});
  const at::Tensor in_range = idx.ge(0).logical_and(idx.lt(n));
  const at::Tensor keys = at::where(in_range, b_of * n + idx, at::full({}, B * n, idx.options())).flatten();
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_keys = std::get<0>(sorted).contiguous();
  const at::Tensor src = std::get<1>(sorted).contiguous();  // grad row of each sorted entry
  const at::Tensor start = at::searchsorted(sorted_keys, at::arange(B * n + 1, idx.options())).contiguous();
  at::Tensor gx = at::empty({B, n, D}, grad.options().dtype(x_dtype));
  at::Tensor gpos = at::empty({pos_grad ? n : 0, D}, grad.options().dtype(at::kFloat));
  if (B * n == 0 || D == 0) return {gx, gpos};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gather_tokens_bwd_cuda", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_dtype, "gather_tokens_bwd_cuda_out", [&] {
      gather_bwd_kernel<grad_t, scalar_t><<<blocks_for(B * n), kThreads, 0, stream>>>(
          grad.data_ptr<grad_t>(), src.data_ptr<int64_t>(), start.data_ptr<int64_t>(), gx.data_ptr<scalar_t>(), B * n, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (pos_grad) {
      gather_bwd_pos_kernel<grad_t><<<blocks_for(n), kThreads, 0, stream>>>(
          grad.data_ptr<grad_t>(), src.data_ptr<int64_t>(), start.data_ptr<int64_t>(), gpos.data_ptr<float>(), n, B, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastjepa, CUDA, m) {
  m.impl("gather_tokens_fwd", &gather_tokens_fwd_cuda);
  m.impl("gather_tokens_bwd", &gather_tokens_bwd_cuda);
}

}  // namespace fastjepa
