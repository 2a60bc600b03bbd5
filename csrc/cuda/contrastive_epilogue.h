// Fused softmax-gradient epilogue of the contrastive loss on CUDA: the torch-free launcher API.
//
// The maths is that of csrc/cpu/contrastive.cpp (see its header comment); the kernel is in
// contrastive_epilogue.cu, the torch binding in contrastive_epilogue_torch.cpp. Everything here is plain data
// (raw pointers, sizes, strides in elements, a stream), so this header compiles without CUDA or torch headers.
#pragma once
#include <cstdint>

#include "../contrastive_params.h"

struct CUstream_st;  // cudaStream_t is CUstream_st* (CUDA's driver_types.h)

namespace fastcache {
namespace cuda {

// One similarity block of rows row0 .. row0 + rows - 1: row r at s + r * ld, `columns` values each.
template <typename T>
struct EpilogueBlock {
  T* s;                 // raw similarities in, dL/ds out (when compute_grad)
  const T* guide;       // the guide's similarities (same shape, row r at guide + r * guide_ld) or nullptr
  const int64_t* ids;   // one id per column (duplicate masking; query_to_doc and doc_to_doc) or nullptr
  int64_t ld, guide_ld, columns;
  int kind;             // a Kind (contrastive_params.h); blocks[0] must be kQueryToDoc
};

// Launches the epilogue of rows params.row0 .. params.row0 + rows - 1 (the options: contrastive_params.h) on
// `stream` of CUDA device `device` (the current device is restored afterwards) and writes the per-row losses to
// loss[0 .. rows). 1 to 4 blocks, blocks[0] the query_to_doc one. Returns nullptr on success, else CUDA's
// description of the error. The pointers must be device pointers.
const char* contrastive_epilogue_f32(const EpilogueBlock<float>* blocks, int num_blocks, int64_t rows,
                                     const ContrastiveParams& params, float* loss, int device, CUstream_st* stream);
const char* contrastive_epilogue_f64(const EpilogueBlock<double>* blocks, int num_blocks, int64_t rows,
                                     const ContrastiveParams& params, double* loss, int device, CUstream_st* stream);

}  // namespace cuda
}  // namespace fastcache
