// fastjepa._C: declarations shared by the op schemas (ext.cpp), the CPU kernels
// (ops_cpu.cpp, sampler.cpp), the CUDA kernels (cuda/*.cu) and the C++ tests.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastjepa {

// docs/design.md §4 default mode for a whole batch: (enc (nenc, B, Kc), pred (npred, B, Kt)) int64.
std::tuple<at::Tensor, at::Tensor> sample_masks(
    int64_t B, int64_t H, int64_t W, at::ArrayRef<double> enc_scale, at::ArrayRef<double> pred_scale,
    at::ArrayRef<double> aspect, int64_t nenc, int64_t npred, int64_t min_keep, bool allow_overlap, int64_t seed);

// Same, for given block sizes (h, w); exclusive_corners draws top in [0, H - h) as the public reference.
std::tuple<at::Tensor, at::Tensor> sample_masks_sized(
    int64_t B, int64_t H, int64_t W, at::IntArrayRef pred_size, at::IntArrayRef enc_size, int64_t nenc, int64_t npred,
    int64_t min_keep, bool allow_overlap, bool exclusive_corners, int64_t seed);

// (h, w) of a block for one uniform draw u used for both scale and aspect (docs/design.md §4).
std::pair<int64_t, int64_t> block_size(double u, double s_lo, double s_hi, double a_lo, double a_hi, int64_t H, int64_t W);

// x (B, N, D), idx (M, B, K), pos (1, Npos >= N, D) or undefined -> (M·B, K, D).
at::Tensor gather_tokens_fwd_cpu(const at::Tensor& x, const at::Tensor& idx, const c10::optional<at::Tensor>& pos);
// grad (M·B, K, D) -> (grad_x (B, n, D) in x_dtype, grad_pos (n, D) fp32 or an empty tensor).
std::tuple<at::Tensor, at::Tensor> gather_tokens_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& idx, int64_t n, at::ScalarType x_dtype, bool pos_grad);

// ctx (nenc·B, Kc, P), idx_x (nenc, B, Kc), idx (npred, B, Kt), pos (1, N, P), mask_token (1, 1, P)
// -> (npred·nenc·B, Kc+Kt, P), row (j·nenc+i)·B+b.
at::Tensor predictor_tokens_fwd_cpu(
    const at::Tensor& ctx, const at::Tensor& idx_x, const at::Tensor& idx, const at::Tensor& pos,
    const at::Tensor& mask_token);
// grad (npred·nenc·B, Kc+Kt, P) -> (grad_ctx (nenc·B, Kc, P) in ctx_dtype, grad_mask_token (P,) fp32).
std::tuple<at::Tensor, at::Tensor> predictor_tokens_bwd_cpu(
    const at::Tensor& grad, int64_t nenc, int64_t npred, int64_t Kc, at::ScalarType ctx_dtype);

// h (B, N, D), idx (npred, B, Kt) -> layer_norm(h) gathered, rows (j·nenc+i)·B+b: (npred·nenc·B, Kt, D).
at::Tensor target_tokens_cpu(const at::Tensor& h, const at::Tensor& idx, int64_t nenc);

// Index checks shared by the CPU and CUDA paths: rank 3, integer dtype, values in [0, n).
void check_index(const at::Tensor& idx, const char* op, const char* name, int64_t n, bool check_values);

// Compiler, torch and OpenMP versions the extension was built with.
std::string build_info();

}  // namespace fastjepa
