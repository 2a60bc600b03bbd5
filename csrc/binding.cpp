// The only file that knows both torch and the kernels: Python bindings of fastcache._C.
#include <torch/extension.h>

#include "cpu/contrastive.h"
#include "cpu/matryoshka.h"
#include "cpu/maxsim.h"
#include "cpu/normalize.h"
#include "cpu/ranking.h"
#include "cpu/sparse.h"
#include "params_binding.h"  // KernelParams (Python) -> ContrastiveParams: the contrastive entry points' last options
#ifdef FASTCACHE_WITH_CUDA
#include "cuda/contrastive_epilogue_torch.h"
#include "cuda/ranking_torch.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcache compiled kernels";
  m.def("contrastive_epilogue_cpu", &fastcache::contrastive_epilogue_cpu,
        "Fused contrastive softmax-gradient epilogue on CPU (in place, returns per-row losses)");
  m.def("contrastive_slab_cpu", &fastcache::contrastive_slab_cpu,
        "The contrastive loss's slab strategy on CPU in one call (normalisation, GEMMs, epilogue, gradients): "
        "(loss, grad_queries, grad_docs, grad_all_queries)");
  m.def("matryoshka_epilogue_cpu", &fastcache::matryoshka_epilogue_cpu,
        "Fused Matryoshka epilogue on CPU: segment products -> per-segment gradients in place; returns (weighted "
        "per-row losses, row radial sums, column radial sums)");
  m.def("matryoshka_chunk_cpu", &fastcache::matryoshka_chunk_cpu,
        "One row chunk of the fused Matryoshka slab on CPU: segment GEMMs, the epilogue, the backward GEMMs and "
        "radial sums added into the given gradients; returns the sum of the rows' weighted losses");
  m.def("maxsim_token_max_cpu", &fastcache::maxsim_token_max_cpu,
        "MaxSim token max on CPU: (values [B, Lq, C], int32 index [B, Lq, C]) of each query token's best valid token "
        "in each document (0 and -1 where the query token is masked or the document empty)");
  m.def("maxsim_token_grad_cpu", &fastcache::maxsim_token_grad_cpu,
        "MaxSim token gradients on CPU: (grad_queries [B, Lq, D], grad_docs [C, Ld, D]) gathered and scattered "
        "along the argmax index");
  m.def("sparse_rows_cpu", &fastcache::sparse_rows_cpu,
        "The non-zero entries of each row of a dense CPU matrix as compressed rows (starts, int32 columns, values)");
  m.def("sparse_transpose_cpu", &fastcache::sparse_transpose_cpu,
        "Compressed rows of the transpose of a row range of compressed rows");
  m.def("sparse_scores_cpu", &fastcache::sparse_scores_cpu,
        "out = a·bᵀ for compressed rows a and the compressed rows of bᵀ (in place)");
  m.def("sparse_add_products_cpu", &fastcache::sparse_add_products_cpu,
        "out += g·b for a dense g and the compressed rows of bᵀ (in place)");
  m.def("l2_normalize_cpu", &fastcache::l2_normalize_cpu,
        "L2 row normalisation on CPU as F.normalize: (x / max(|x|, eps) in dtype, the divisors [rows, 1])");
  m.def("l2_normalize_backward_cpu_", &fastcache::l2_normalize_backward_cpu_,
        "Backward of the L2 row normalisation on CPU, in place on grad (returns it)");
  m.def("lambda_loss_cpu", &fastcache::lambda_loss_cpu,
        "LambdaLoss on CPU: per-query pair-loss sums, pair counts and d(sum)/dlogits");
  m.def("plistmle_cpu", &fastcache::plistmle_cpu, "Position-aware ListMLE on CPU: per-query losses and gradients");
  m.def("listnet_cpu", &fastcache::listnet_cpu, "ListNet on CPU: per-query losses and gradients");
#ifdef FASTCACHE_WITH_CUDA
  m.def("contrastive_epilogue_cuda", &fastcache::contrastive_epilogue_cuda,
        "Fused contrastive softmax-gradient epilogue on CUDA (in place, returns per-row losses; last argument: the "
        "raw cudaStream_t as an integer)");
  m.def("lambda_loss_cuda", &fastcache::lambda_loss_cuda,
        "LambdaLoss on CUDA: lambda_loss_cpu's arguments plus the raw cudaStream_t as an integer");
  m.def("plistmle_cuda", &fastcache::plistmle_cuda,
        "Position-aware ListMLE on CUDA: plistmle_cpu's arguments plus the raw cudaStream_t as an integer");
  m.def("listnet_cuda", &fastcache::listnet_cuda,
        "ListNet on CUDA: listnet_cpu's arguments plus the raw cudaStream_t as an integer");
#endif
}
