// Torch binding of the CUDA contrastive epilogue: checks the tensors and hands raw pointers, sizes and strides to
// the torch-free launcher of contrastive_epilogue.cu. It includes no c10/cuda or ATen/cuda header (the stream
// comes in as an integer), so it also compiles against a CPU build of torch.
#include "contrastive_epilogue_torch.h"

#include <cstdint>
#include <limits>
#include <type_traits>

#include "contrastive_epilogue.h"
#include "kernel_device.h"

namespace fastcache {
namespace {

namespace kernel = fastcache::cuda;

// A similarity (or guide) block: on like's CUDA device, like's dtype, 2-D with `rows` rows, unit column stride,
// rows that do not overlap.
void check_block(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "contrastive_epilogue_cuda: ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "contrastive_epilogue_cuda: ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0), "contrastive_epilogue_cuda: ", name,
              " must be 2-D with ", like.size(0), " rows, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= std::numeric_limits<int32_t>::max(), "contrastive_epilogue_cuda: ",
              name, " must have 1 to 2^31-1 columns, got ", t.size(1));
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) == 1, "contrastive_epilogue_cuda: ", name,
              " must be contiguous along its last dimension, got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "contrastive_epilogue_cuda: ", name,
              " must have non-overlapping rows (stride(0) >= columns), got strides ", t.strides());
}

template <typename T>
kernel::EpilogueBlock<T> make_block(at::Tensor& s, const std::optional<at::Tensor>& guide, const int64_t* ids,
                                    int kind) {
  kernel::EpilogueBlock<T> b{};
  b.s = s.data_ptr<T>();
  b.ld = s.stride(0);
  b.columns = s.size(1);
  b.kind = kind;
  b.ids = ids;
  if (guide) {
    b.guide = guide->data_ptr<T>();
    b.guide_ld = guide->stride(0);
  }
  return b;
}

}  // namespace

at::Tensor contrastive_epilogue_cuda(
    at::Tensor query_to_doc, std::optional<at::Tensor> query_to_query, std::optional<at::Tensor> doc_to_query,
    std::optional<at::Tensor> doc_to_doc, std::optional<at::Tensor> guide_query_to_doc,
    std::optional<at::Tensor> guide_query_to_query, std::optional<at::Tensor> guide_doc_to_doc,
    std::optional<at::Tensor> doc_ids, const ContrastiveParams& params, int64_t stream) {
  const at::Tensor& qd = query_to_doc;
  TORCH_CHECK(on_kernel_device(qd),
              "contrastive_epilogue_cuda: query_to_doc must be a CUDA tensor, got ", qd.device());
  TORCH_CHECK(qd.scalar_type() == at::kFloat || qd.scalar_type() == at::kDouble,
              "contrastive_epilogue_cuda: query_to_doc must be float32 or float64, got ", qd.scalar_type());
  check_block(qd, qd, "query_to_doc");
  const int64_t rows = qd.size(0);
  const int64_t row0 = params.row0, batch_size = params.batch_size, num_positives = params.num_positives;
  const int64_t offset = params.offset, own_query_offset = params.own_query_offset;
  const int64_t hardness_mode = params.hardness_mode, margin_strategy = params.margin_strategy;
  TORCH_CHECK(batch_size > 0, "contrastive_epilogue_cuda: batch_size must be positive, got ", batch_size);
  TORCH_CHECK(num_positives > 0 && num_positives <= qd.size(1), "contrastive_epilogue_cuda: num_positives must be 1 "
              "to the ", qd.size(1), " columns of query_to_doc, got ", num_positives);
  TORCH_CHECK(row0 >= 0 && offset >= 0 && offset + row0 + rows <= num_positives, "contrastive_epilogue_cuda: rows [",
              row0, ", ", row0 + rows, ") with offset ", offset, " exceed the ", num_positives, " positives");
  TORCH_CHECK(hardness_mode >= kNoHardness && hardness_mode <= kAllNegatives,
              "contrastive_epilogue_cuda: hardness_mode must be 0 (none), 1 (in_batch_negatives), 2 (hard_negatives) "
              "or 3 (all_negatives), got ", hardness_mode);
  TORCH_CHECK(margin_strategy == kAbsoluteMargin || margin_strategy == kRelativeMargin,
              "contrastive_epilogue_cuda: margin_strategy must be 0 (absolute) or 1 (relative), got ", margin_strategy);
  const bool guided = guide_query_to_doc.has_value();
  if (guided) check_block(*guide_query_to_doc, qd, "guide_query_to_doc");
  TORCH_CHECK(!guided || guide_query_to_doc->size(1) == qd.size(1),
              "contrastive_epilogue_cuda: guide_query_to_doc must have the shape of query_to_doc");
  TORCH_CHECK(guided == guide_query_to_query.has_value() || !query_to_query,
              "contrastive_epilogue_cuda: guide blocks must match the enabled blocks (query_to_query)");
  TORCH_CHECK(guided == guide_doc_to_doc.has_value() || !doc_to_doc,
              "contrastive_epilogue_cuda: guide blocks must match the enabled blocks (doc_to_doc)");
  TORCH_CHECK(!guide_query_to_query || query_to_query,
              "contrastive_epilogue_cuda: guide_query_to_query given without query_to_query");
  TORCH_CHECK(!guide_doc_to_doc || doc_to_doc, "contrastive_epilogue_cuda: guide_doc_to_doc given without doc_to_doc");
  TORCH_CHECK(!(guided && doc_to_query), "contrastive_epilogue_cuda: doc_to_query has no guided form");
  if (doc_ids) {
    TORCH_CHECK(doc_ids->device() == qd.device() && doc_ids->scalar_type() == at::kLong && doc_ids->dim() == 1 &&
                    doc_ids->is_contiguous() && doc_ids->size(0) == qd.size(1),
                "contrastive_epilogue_cuda: doc_ids must be a contiguous int64 vector on ", qd.device(),
                " with one id per query_to_doc column (", qd.size(1), ")");
  }
  const int64_t* ids = doc_ids ? doc_ids->data_ptr<int64_t>() : nullptr;
  // guide blocks: the same shape as their similarity block
  auto check_pair = [&](const at::Tensor& s, const std::optional<at::Tensor>& g, const char* name,
                        const char* guide_name) {
    check_block(s, qd, name);
    if (!g) return;
    check_block(*g, qd, guide_name);
    TORCH_CHECK(g->size(1) == s.size(1), "contrastive_epilogue_cuda: ", guide_name, " must have the shape of ", name);
  };
  if (query_to_query) {
    check_pair(*query_to_query, guide_query_to_query, "query_to_query", "guide_query_to_query");
    TORCH_CHECK(guided || (own_query_offset >= 0 && own_query_offset + row0 + rows <= query_to_query->size(1)),
                "contrastive_epilogue_cuda: own query columns [", own_query_offset + row0, ", ",
                own_query_offset + row0 + rows, ") exceed the ", query_to_query->size(1), " columns of query_to_query");
  }
  if (doc_to_query) check_pair(*doc_to_query, std::nullopt, "doc_to_query", "");
  if (doc_to_doc) {
    check_pair(*doc_to_doc, guide_doc_to_doc, "doc_to_doc", "guide_doc_to_doc");
    TORCH_CHECK(doc_to_doc->size(1) >= num_positives && doc_to_doc->size(1) <= qd.size(1),
                "contrastive_epilogue_cuda: doc_to_doc must have ", num_positives, " to ", qd.size(1),
                " columns, got ", doc_to_doc->size(1));
  }

  at::Tensor loss = at::empty({rows}, qd.options());
  if (rows == 0) return loss;
  const int device = qd.device().index();
  auto* raw_stream = reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream));
  const char* error = nullptr;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    kernel::EpilogueBlock<T> blocks[4];
    int count = 0;
    blocks[count++] = make_block<T>(query_to_doc, guide_query_to_doc, ids, kQueryToDoc);
    if (query_to_query) blocks[count++] = make_block<T>(*query_to_query, guide_query_to_query, nullptr,
                                                        kQueryToQuery);
    if (doc_to_query) blocks[count++] = make_block<T>(*doc_to_query, std::nullopt, nullptr, kDocToQuery);
    if (doc_to_doc) blocks[count++] = make_block<T>(*doc_to_doc, guide_doc_to_doc, ids, kDocToDoc);
    if constexpr (std::is_same_v<T, float>) {
      error = kernel::contrastive_epilogue_f32(blocks, count, rows, params, loss.data_ptr<float>(), device,
                                               raw_stream);
    } else {
      error = kernel::contrastive_epilogue_f64(blocks, count, rows, params, loss.data_ptr<double>(), device,
                                               raw_stream);
    }
  };
  if (qd.scalar_type() == at::kFloat) {
    run(0.0f);
  } else {
    run(0.0);
  }
  TORCH_CHECK(error == nullptr, "contrastive_epilogue_cuda: kernel launch failed: ", error);
  return loss;
}

}  // namespace fastcache
