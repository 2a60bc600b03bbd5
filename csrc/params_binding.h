// The one place that turns Python's KernelParams (fastcache/ops/contrastive/options.py: a NamedTuple, or any
// sequence of its 15 numbers in its field order) into the kernels' ContrastiveParams: a pybind11 type caster, so
// the bound entry points take the struct as one argument. Included by the files that define Python modules
// (csrc/binding.cpp, tests/contrastive/cuda_host_emulation.cpp) before their PYBIND11_MODULE.
#pragma once
#include <torch/extension.h>

#include "contrastive_params.h"

namespace pybind11 {
namespace detail {

template <>
struct type_caster<fastcache::ContrastiveParams> {
  PYBIND11_TYPE_CASTER(fastcache::ContrastiveParams, const_name("KernelParams"));

  bool load(handle src, bool) {
    if (!isinstance<sequence>(src) || isinstance<str>(src)) return false;
    const auto fields = reinterpret_borrow<sequence>(src);
    if (fields.size() != 15) {
      throw value_error("KernelParams: 15 values expected (fastcache.ops.contrastive.options.kernel_params), got " +
                        std::to_string(fields.size()));
    }
    const auto integer = [&](size_t i) { return fields[i].cast<int64_t>(); };
    const auto real = [&](size_t i) { return fields[i].cast<double>(); };
    const auto flag = [&](size_t i) {
      const int truth = PyObject_IsTrue(fields[i].ptr());
      if (truth < 0) throw error_already_set();
      return truth == 1;
    };
    value = fastcache::ContrastiveParams{integer(0), integer(1), integer(2), integer(3), integer(4),
                                         real(5),    real(6),    real(7),    integer(8), integer(9),
                                         flag(10),   flag(11),   real(12),   real(13),   real(14)};
    return true;
  }

  static handle cast(const fastcache::ContrastiveParams& p, return_value_policy, handle) {
    return make_tuple(p.row0, p.batch_size, p.num_positives, p.offset, p.own_query_offset, p.scale,
                      p.hardness_strength, p.margin, p.hardness_mode, p.margin_strategy, p.joint, p.compute_grad,
                      p.coef, p.pos_coef, p.filter_threshold)
        .release();
  }
};

}  // namespace detail
}  // namespace pybind11
