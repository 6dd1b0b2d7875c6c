// Wire-format helpers shared by the eaas transport (host side, no XLA deps).
//
// The expert-transport wire format protects each fixed-size message header
// with a 32-bit FNV-1a checksum. The same function backs the
// `eaas_header_checksum` XLA FFI handler and must stay bit-identical to the
// NumPy reference in `eaas_jax/transport/native.py`.
#ifndef EAAS_FFI_WIRE_FORMAT_H_
#define EAAS_FFI_WIRE_FORMAT_H_

#include <cstddef>
#include <cstdint>

namespace eaas {

// 32-bit FNV-1a parameters (http://www.isthe.com/chongo/tech/comp/fnv/).
inline constexpr std::uint32_t kFnv1a32OffsetBasis = 2166136261u;  // 0x811C9DC5
inline constexpr std::uint32_t kFnv1a32Prime = 16777619u;          // 0x01000193

// FNV-1a over `size` bytes starting at `data`, continuing from `seed` (pass the
// previous result to hash a message in several pieces). `data` may be null
// when `size` is 0; the hash of an empty input is the offset basis.
inline constexpr std::uint32_t Fnv1a32(const std::uint8_t* data,
                                       std::size_t size,
                                       std::uint32_t seed = kFnv1a32OffsetBasis) {
  std::uint32_t hash = seed;
  for (std::size_t i = 0; i < size; ++i) {
    hash ^= static_cast<std::uint32_t>(data[i]);
    hash *= kFnv1a32Prime;  // unsigned arithmetic: wraps modulo 2^32
  }
  return hash;
}

}  // namespace eaas

#endif  // EAAS_FFI_WIRE_FORMAT_H_
