// The software NIC's validation of one WQE (see nic_model.h, "Validation"):
// every rule a ConnectX requester or responder enforces on an RDMA WRITE
// that the transport could get wrong, each with the PRM's syndrome.
#include <cstdint>
#include <cstring>

#include "nic_model.h"

namespace eaas {
namespace nic {
namespace {

namespace m = eaas::mlx5;

std::uint32_t LoadBe32(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return m::Bswap32(v);
}

std::uint64_t LoadBe64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return m::Bswap64(v);
}

// Whether [addr, addr + size) lies inside the region; written so that no sum
// can wrap (a raddr near 2^64 must not pass for a small one).
bool Inside(const Region& r, std::uint64_t addr, std::uint64_t size) {
  const auto base = reinterpret_cast<std::uintptr_t>(r.addr);
  return addr >= base && size <= r.length && addr - base <= r.length - size;
}

// A data segment's byte count of 0 means 2^31 bytes (the PRM), the largest
// message; bit 31 is the inline flag, so no other count is larger.
constexpr std::uint64_t kZeroByteCount = std::uint64_t{1} << 31;

}  // namespace

Violation CheckRemoteWrite(const Region* remote, std::uint64_t raddr, std::uint64_t size) {
  if (remote == nullptr) return Violation::kBadRkey;
  if ((remote->access & kAccessRemoteWrite) == 0) return Violation::kRemoteAccess;
  if (!Inside(*remote, raddr, size)) return Violation::kRemoteBounds;
  return Violation::kNone;
}

std::uint8_t SyndromeOf(Violation v) {
  switch (v) {
    case Violation::kNone:
      return 0;
    case Violation::kQpState:
    case Violation::kDoorbell:
    case Violation::kWqeIndex:
    case Violation::kQpn:
    case Violation::kOpcode:
    case Violation::kDsZero:
    case Violation::kDsTooLarge:
    case Violation::kDsMismatch:
      return kSyndromeLocalQpOp;
    case Violation::kInlineTooLong:
      return kSyndromeLocalLength;
    case Violation::kBadLkey:
    case Violation::kLocalBounds:
      return kSyndromeLocalProt;
    case Violation::kBadRkey:
    case Violation::kRemoteAccess:
    case Violation::kRemoteBounds:
      return kSyndromeRemoteAccess;
    case Violation::kPeerGone:
    case Violation::kRetryExceeded:
      return kSyndromeTransportRetryExceeded;
    case Violation::kNoReceiveQueue:
      return kSyndromeRnrRetryExceeded;
    case Violation::kFlushed:
      return kSyndromeWrFlush;
  }
  return kSyndromeLocalQpOp;
}

Violation ValidateWqe(const std::uint8_t (&wqe)[kWqeBytes], std::uint16_t expected_index, std::uint32_t qpn,
                      const WqeContext& ctx, ValidWrite* out) {
  // Control segment: opmod | WQE index | opcode, QPN | DS, fm_ce_se.
  const std::uint32_t opmod_idx_opcode = LoadBe32(wqe + 0);
  const std::uint32_t qpn_ds = LoadBe32(wqe + 4);
  const std::uint8_t fm_ce_se = wqe[11];
  const auto opcode = static_cast<std::uint8_t>(opmod_idx_opcode & 0xff);
  const auto index = static_cast<std::uint16_t>(opmod_idx_opcode >> 8);
  const std::uint32_t ds = qpn_ds & 0x3f;  // 6 bits in the PRM

  if (index != expected_index) return Violation::kWqeIndex;
  if ((qpn_ds >> 8) != qpn) return Violation::kQpn;
  if (opcode != m::MLX5_OPCODE_RDMA_WRITE && opcode != m::MLX5_OPCODE_RDMA_WRITE_IMM) return Violation::kOpcode;
  if (ds == 0) return Violation::kDsZero;
  if (ds > kWqeBytes / 16) return Violation::kDsTooLarge;
  // ctrl + raddr + (data | inline): at least three units.
  if (ds < 3) return Violation::kDsMismatch;

  const std::uint8_t* raddr_seg = wqe + 16;
  const std::uint8_t* payload_seg = wqe + 32;
  const std::uint32_t byte_count = LoadBe32(payload_seg);
  const std::uint8_t* src;
  std::uint64_t size;
  if (byte_count & m::MLX5_INLINE_SEG) {
    size = byte_count & ~std::uint32_t{m::MLX5_INLINE_SEG};
    if (size > m::kMaxInlineBytes) return Violation::kInlineTooLong;
    if (ds != 2 + (4 + size + 15) / 16) return Violation::kDsMismatch;
    src = payload_seg + 4;
  } else {
    if (ds != m::kRdmaWriteDs) return Violation::kDsMismatch;
    size = byte_count == 0 ? kZeroByteCount : byte_count;
    const Region* local = ctx.LocalByLkey(LoadBe32(payload_seg + 4));
    if (local == nullptr) return Violation::kBadLkey;
    const std::uint64_t laddr = LoadBe64(payload_seg + 8);
    if (!Inside(*local, laddr, size)) return Violation::kLocalBounds;
    src = reinterpret_cast<const std::uint8_t*>(static_cast<std::uintptr_t>(laddr));
  }

  // The responder's checks (across a link, the responder makes them).
  const std::uint64_t raddr = LoadBe64(raddr_seg);
  const std::uint32_t rkey = LoadBe32(raddr_seg + 8);
  std::uint8_t* dst = nullptr;
  if (!ctx.OverLink()) {
    bool peer_ok = false;
    const Region* remote = ctx.RemoteByRkey(rkey, &peer_ok);
    if (!peer_ok) return Violation::kPeerGone;
    const Violation v = CheckRemoteWrite(remote, raddr, size);
    if (v != Violation::kNone) return v;
    dst = reinterpret_cast<std::uint8_t*>(static_cast<std::uintptr_t>(raddr));
  }
  // A well-formed WRITE with immediate still needs a receive WQE the model lacks.
  if (opcode == m::MLX5_OPCODE_RDMA_WRITE_IMM) return Violation::kNoReceiveQueue;

  out->signaled = (fm_ce_se & m::MLX5_WQE_CTRL_CQ_UPDATE) != 0;
  out->fenced = (fm_ce_se & m::MLX5_WQE_CTRL_FENCE) != 0;
  out->dst = dst;
  out->raddr = raddr;
  out->rkey = rkey;
  out->src = src;
  out->size = static_cast<std::uint32_t>(size);
  return Violation::kNone;
}

}  // namespace nic
}  // namespace eaas
