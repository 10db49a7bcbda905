// fastjepa._C: the op schemas (one TORCH_LIBRARY for the whole extension) and the
// Python module with its build information. Kernels register in ops_cpu.cpp,
// sampler.cpp and cuda/*.cu; autograd and fake (meta) implementations are added from
// Python in fastjepa/ops/_cpp.py.

#include <torch/library.h>
#include <torch/version.h>

#include <sstream>

#include "fastjepa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastjepa {

std::string build_info() {
  std::ostringstream s;
#if defined(__clang__)
  s << "compiler=clang " << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
  s << "compiler=gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "." << __GNUC_PATCHLEVEL__;
#else
  s << "compiler=unknown";
#endif
  s << "; torch=" << TORCH_VERSION;
#ifdef _OPENMP
  s << "; openmp=" << _OPENMP;
#else
  s << "; openmp=no";
#endif
#ifdef WITH_CUDA
  s << "; cuda=yes";
#else
  s << "; cuda=no";
#endif
  return s.str();
}

TORCH_LIBRARY(fastjepa, m) {
  m.def(
      "sample_masks(int B, int H, int W, float[] enc_scale, float[] pred_scale, float[] aspect, int nenc, "
      "int npred, int min_keep, bool allow_overlap, int seed) -> (Tensor, Tensor)");
  m.def(
      "sample_masks_sized(int B, int H, int W, int[] pred_size, int[] enc_size, int nenc, int npred, int min_keep, "
      "bool allow_overlap, bool exclusive_corners, int seed) -> (Tensor, Tensor)");
  m.def("gather_tokens_fwd(Tensor x, Tensor idx, Tensor? pos) -> Tensor");
  m.def("gather_tokens_bwd(Tensor grad, Tensor idx, int n, ScalarType x_dtype, bool pos_grad) -> (Tensor, Tensor)");
  m.def("predictor_tokens_fwd(Tensor ctx, Tensor idx_x, Tensor idx, Tensor pos, Tensor mask_token) -> Tensor");
  m.def("predictor_tokens_bwd(Tensor grad, int nenc, int npred, int Kc, ScalarType ctx_dtype) -> (Tensor, Tensor)");
  m.def("target_tokens(Tensor h, Tensor idx, int nenc) -> Tensor");
}

}  // namespace fastjepa
