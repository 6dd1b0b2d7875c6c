// XLA FFI handlers of the eaas transport (CPU).
//
// Built into a plain shared library (`libeaas_ffi.so`) that Python loads with
// ctypes and registers through `jax.ffi.register_ffi_target(...,
// api_version=1)`; see `eaas_jax/transport/native.py`. Only the typed XLA FFI
// C++ API (header-only, shipped in the jaxlib wheel) is used, so the library
// does not link against jaxlib.
#include <cstddef>
#include <cstdint>
#include <string>

#include "export.h"
#include "wire_format.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


extern "C" {
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_header_checksum(XLA_FFI_CallFrame* call_frame);

// XLA FFI API version of the headers this library was compiled against. XLA
// refuses handlers built against a newer API version than its own, so Python
// reports this when registration fails.
EAAS_FFI_EXPORT void eaas_ffi_xla_api_version(int* major, int* minor) {
  *major = XLA_FFI_API_MAJOR;
  *minor = XLA_FFI_API_MINOR;
}
}  // extern "C"

namespace eaas {
namespace {

// Known-answer checks for the wire-format checksum (FNV-1a 32-bit test vectors).
constexpr std::uint8_t kA[] = {'a'};
constexpr std::uint8_t kFoobar[] = {'f', 'o', 'o', 'b', 'a', 'r'};
static_assert(Fnv1a32(nullptr, 0) == 0x811C9DC5u, "FNV-1a empty input");
static_assert(Fnv1a32(kA, 1) == 0xE40C292Cu, "FNV-1a(\"a\")");
static_assert(Fnv1a32(kFoobar, 6) == 0xBF9CF968u, "FNV-1a(\"foobar\")");

// headers: u8[..., H] (N message headers of H bytes each, N = product of the
// leading dimensions; rank > 2 appears under jax.vmap with
// vmap_method="broadcast_all"). out: u32[...] = FNV-1a of each header row.
ffi::Error HeaderChecksumImpl(ffi::Buffer<ffi::U8> headers,
                              ffi::ResultBuffer<ffi::U32> out) {
  const auto in_dims = headers.dimensions();
  const auto out_dims = out->dimensions();
  if (in_dims.size() < 1) {
    return ffi::Error::InvalidArgument(
        "eaas_header_checksum: headers must have rank >= 1 ([..., H]), got a "
        "scalar");
  }
  if (out_dims.size() + 1 != in_dims.size()) {
    return ffi::Error::InvalidArgument(
        "eaas_header_checksum: output rank " + std::to_string(out_dims.size()) +
        " must be input rank " + std::to_string(in_dims.size()) + " minus 1");
  }
  for (std::size_t i = 0; i < out_dims.size(); ++i) {
    if (out_dims[i] != in_dims[i]) {
      return ffi::Error::InvalidArgument(
          "eaas_header_checksum: output dimension " + std::to_string(i) +
          " is " + std::to_string(out_dims[i]) + ", expected " +
          std::to_string(in_dims[i]));
    }
  }

  const std::size_t header_bytes = static_cast<std::size_t>(in_dims.back());
  const std::size_t num_headers = out->element_count();
  if (num_headers == 0) return ffi::Error::Success();  // empty batch

  const std::uint8_t* src = headers.typed_data();
  std::uint32_t* dst = out->typed_data();
  for (std::size_t n = 0; n < num_headers; ++n) {
    dst[n] = Fnv1a32(src + n * header_bytes, header_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace eaas

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_header_checksum, eaas::HeaderChecksumImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()  // headers
                                  .Ret<ffi::Buffer<ffi::U32>>()  // checksums
);
