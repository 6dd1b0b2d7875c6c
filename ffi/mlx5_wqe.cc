// C ABI over the host side of mlx5_wqe.h, called through ctypes by
// eaas_jax/transport/mlx5_wqe.py: the `ibgda` setup path and the tests use it
// to produce the exact bytes the transport writes. Each encoder builds its
// segment or WQE in an aligned local block and copies it to the caller's
// buffer, so callers need no particular alignment.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "export.h"
#include "mlx5_wqe.h"

namespace m = eaas::mlx5;

// The decoded CQE crosses the C ABI as is; Python mirrors this layout.
static_assert(sizeof(m::Cqe) == 20 && offsetof(m::Cqe, wqe_counter) == 2 && offsetof(m::Cqe, byte_cnt) == 4 &&
                  offsetof(m::Cqe, qpn) == 8 && offsetof(m::Cqe, imm) == 12 && offsetof(m::Cqe, syndrome) == 16 &&
                  offsetof(m::Cqe, vendor_syndrome) == 17,
              "eaas::mlx5::Cqe layout (mirrored by mlx5_wqe.py)");

namespace {
// One send-queue BB, aligned like one.
struct alignas(64) Block {
  std::uint8_t bytes[64];
};
}  // namespace

extern "C" {

// 1 when the library was compiled against rdma-core's <infiniband/mlx5dv.h>.
EAAS_FFI_EXPORT int eaas_mlx5_have_rdma_core() { return EAAS_MLX5_HAVE_RDMA_CORE; }

// Segments: 16 bytes each into `out`.
EAAS_FFI_EXPORT void eaas_mlx5_encode_ctrl(std::uint8_t* out, std::uint16_t wqe_index, std::uint8_t opcode,
                                           std::uint8_t opmod, std::uint32_t qpn, std::uint8_t fm_ce_se,
                                           std::uint8_t ds, std::uint8_t signature, std::uint32_t imm) {
  Block b;
  m::SetCtrlSeg(reinterpret_cast<m::mlx5_wqe_ctrl_seg*>(b.bytes), wqe_index, opcode, opmod, qpn, fm_ce_se, ds,
                signature, imm);
  std::memcpy(out, b.bytes, 16);
}

EAAS_FFI_EXPORT void eaas_mlx5_encode_raddr(std::uint8_t* out, std::uint64_t raddr, std::uint32_t rkey) {
  Block b;
  m::SetRaddrSeg(reinterpret_cast<m::mlx5_wqe_raddr_seg*>(b.bytes), raddr, rkey);
  std::memcpy(out, b.bytes, 16);
}

EAAS_FFI_EXPORT void eaas_mlx5_encode_data(std::uint8_t* out, std::uint32_t byte_count, std::uint32_t lkey,
                                           std::uint64_t addr) {
  Block b;
  m::SetDataSeg(reinterpret_cast<m::mlx5_wqe_data_seg*>(b.bytes), byte_count, lkey, addr);
  std::memcpy(out, b.bytes, 16);
}

// What one BB holds after the inline segment's 4-byte byte count.
constexpr std::uint32_t kOneBbInline = m::MLX5_SEND_WQE_BB - 4;

// Inline data segment of `size` <= kOneBbInline bytes into `out` (64 bytes);
// returns its length in bytes, or -1 when `size` is over.
EAAS_FFI_EXPORT int eaas_mlx5_encode_inline(std::uint8_t* out, const std::uint8_t* data, std::uint32_t size) {
  if (size > kOneBbInline) return -1;
  Block b;
  const int units = m::SetInlineSeg(reinterpret_cast<m::mlx5_wqe_inl_data_seg*>(b.bytes), data, size);
  std::memcpy(out, b.bytes, static_cast<std::size_t>(units) * 16);
  return units * 16;
}

// Whole WQEs: 64 bytes into `out` (bytes past DS x 16 are 0); return DS, or
// -1 for an opcode other than the two WRITEs / an inline size over
// kMaxInlineBytes.
EAAS_FFI_EXPORT int eaas_mlx5_encode_rdma_write(std::uint8_t* out, std::uint8_t opcode, std::uint16_t wqe_index,
                                                std::uint32_t qpn, std::uint8_t fm_ce_se, std::uint64_t raddr,
                                                std::uint32_t rkey, std::uint64_t laddr, std::uint32_t lkey,
                                                std::uint32_t size, std::uint32_t imm) {
  if (opcode != m::MLX5_OPCODE_RDMA_WRITE && opcode != m::MLX5_OPCODE_RDMA_WRITE_IMM) return -1;
  Block b{};
  const int ds = m::WriteRdmaWrite(b.bytes, opcode, wqe_index, qpn, fm_ce_se, raddr, rkey, laddr, lkey, size, imm);
  std::memcpy(out, b.bytes, 64);
  return ds;
}

EAAS_FFI_EXPORT int eaas_mlx5_encode_inline_write(std::uint8_t* out, std::uint16_t wqe_index, std::uint32_t qpn,
                                                  std::uint8_t fm_ce_se, std::uint64_t raddr, std::uint32_t rkey,
                                                  const std::uint8_t* data, std::uint32_t size) {
  if (size > m::kMaxInlineBytes) return -1;
  Block b{};
  const int ds = m::WriteInlineRdmaWrite(b.bytes, wqe_index, qpn, fm_ce_se, raddr, rkey, data, size);
  std::memcpy(out, b.bytes, 64);
  return ds;
}

EAAS_FFI_EXPORT int eaas_mlx5_encode_sequence_word(std::uint8_t* out, std::uint16_t wqe_index, std::uint32_t qpn,
                                                   std::uint64_t raddr, std::uint32_t rkey, std::uint64_t seq,
                                                   int signaled) {
  Block b{};
  const int ds = m::WriteSequenceWord(b.bytes, wqe_index, qpn, raddr, rkey, seq, signaled != 0);
  std::memcpy(out, b.bytes, 64);
  return ds;
}

// Decodes the 64-byte CQE at `cqe` into `*out`.
EAAS_FFI_EXPORT void eaas_mlx5_decode_cqe(const std::uint8_t* cqe, m::Cqe* out) {
  Block b;
  std::memcpy(b.bytes, cqe, 64);
  *out = m::DecodeCqe(reinterpret_cast<const m::mlx5_cqe64*>(b.bytes));
}

}  // extern "C"
