// The XLA element type of request rows in a wire-format HiddenDtype (both
// backends' handlers check their hidden buffers against it).
#ifndef EAAS_FFI_HIDDEN_FFI_TYPE_H_
#define EAAS_FFI_HIDDEN_FFI_TYPE_H_

#include <cstdint>

#include "wire_format.h"
#include "xla/ffi/api/ffi.h"

namespace eaas {

inline xla::ffi::DataType HiddenFfiType(std::uint32_t dtype) {
  return dtype == kHiddenBF16 ? xla::ffi::DataType::BF16
         : dtype == kHiddenF8E4M3 ? xla::ffi::DataType::F8E4M3FN
                                  : xla::ffi::DataType::F32;
}

}  // namespace eaas

#endif  // EAAS_FFI_HIDDEN_FFI_TYPE_H_
