// mlx5 work-queue entries, doorbells and completions for the `ibgda`
// transport: the GPU (or, on CPUs, the FFI handler) writes send-queue WQEs,
// rings the doorbell and polls CQEs itself, with no verbs call on the data
// path. One header for host and device code (CUDA kernels and the CPU
// handler write the same bytes).
//
// == Layouts ==
// The segment and CQE layouts are rdma-core's (<infiniband/mlx5dv.h>, Debian
// libibverbs-dev) where that header is installed: this file uses its structs
// and constants and only adds writers device code can call (rdma-core's
// setters are host-only and leave some bytes untouched). Without the header
// the build still succeeds on layout-equivalent declarations below (the
// `ibgda` backend then reports itself unavailable: eaas_mlx5_have_rdma_core()).
// Either way every offset this file writes or reads is static_asserted
// against the PRM's offsets. All multi-byte fields are big-endian.
//
// == A WQE (RC send queue) ==
// 64-byte basic blocks (BB). A WQE is 16-byte segments: control, then
// remote-address, then either one data segment (gather from a registered
// region) or an inline data segment (the bytes themselves, padded to 16).
// The control segment's DS counts the WQE's 16-byte units; its WQE index is
// the send-queue producer counter (in BBs, mod 2^16) of the WQE's first BB.
// Every WQE written here fits one BB, so the ring never splits a WQE.
//
// == Posting ==  (Doorbell below)
//   1. write the WQE(s) into the send queue;
//   2. barrier: the NIC must see the WQEs before the doorbell record;
//   3. doorbell record: dbrec[MLX5_SND_DBR] = big-endian producer counter
//      (BBs posted, mod 2^16) -- what the NIC reads after a missed doorbell;
//   4. barrier: the record before the doorbell;
//   5. doorbell: the first 8 bytes of the last WQE's control segment (opcode,
//      WQE index, QPN, DS) in one 64-bit store to the UAR's BlueFlame
//      register, then a flush of the write-combining buffer.
//
// == Publishing a message (payload, then the sequence word) ==
// The payload goes as an RDMA WRITE from the registered mailbox (data
// segment); the slot's sequence word follows as a second RDMA WRITE on the
// same QP with the 8 bytes inline (WriteSequenceWord) and the fence mode
// MLX5_WQE_CTRL_FENCE, so the NIC starts it only after the QP's earlier work
// requests. Both writes travel on one RC QP, whose packets the responder
// executes in PSN order; ConnectX places them in that order in memory
// registered without IBV_ACCESS_RELAXED_ORDERING, so a receiver that
// acquire-loads the new sequence word sees the payload, as the seqlock in
// wire_format.h requires. (The InfiniBand spec itself guarantees a write's
// data only once a later SEND, WRITE with immediate or atomic completed;
// WriteRdmaWriteImm gives that guarantee at the cost of a receive queue.)
//
// == Completions ==
// Only signalled WQEs (MLX5_WQE_CTRL_CQ_UPDATE) produce a CQE; its
// wqe_counter is the WQE index of the WQE that completed, which frees every
// BB up to it. A CQE is the software's once its owner bit equals the parity
// of how many times the consumer wrapped the CQ (CqeIsOwnedBySoftware).
#ifndef EAAS_FFI_MLX5_WQE_H_
#define EAAS_FFI_MLX5_WQE_H_

#include <cstddef>
#include <cstdint>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the mlx5 encoders assume a little-endian host and device"
#endif

#if defined(__CUDACC__)
#define EAAS_MLX5_FN __host__ __device__ __forceinline__
#else
#define EAAS_MLX5_FN inline
#endif

// EAAS_MLX5_OWN_LAYOUTS forces the declarations below even where rdma-core
// is installed: the self-test builds both variants and compares their bytes
// with rdma-core's setters.
#if __has_include(<infiniband/mlx5dv.h>) && !defined(EAAS_MLX5_OWN_LAYOUTS)
#include <infiniband/mlx5dv.h>
#define EAAS_MLX5_HAVE_RDMA_CORE 1
#else
#define EAAS_MLX5_HAVE_RDMA_CORE 0
#endif

namespace eaas {
namespace mlx5 {

#if EAAS_MLX5_HAVE_RDMA_CORE
// rdma-core's names, also as eaas::mlx5::NAME (as the declarations below).
using ::MLX5_CQE_INVALID;
using ::MLX5_CQE_OWNER_MASK;
using ::MLX5_CQE_REQ;
using ::MLX5_CQE_REQ_ERR;
using ::MLX5_CQE_RESP_ERR;
using ::MLX5_CQE_RESP_WR_IMM;
using ::MLX5_INLINE_SEG;
using ::MLX5_OPCODE_RDMA_WRITE;
using ::MLX5_OPCODE_RDMA_WRITE_IMM;
using ::MLX5_SEND_WQE_BB;
using ::MLX5_SND_DBR;
using ::MLX5_WQE_CTRL_CQ_UPDATE;
using ::MLX5_WQE_CTRL_FENCE;
using ::MLX5_WQE_CTRL_SOLICITED;
using ::mlx5_cqe64;
using ::mlx5_err_cqe;
using ::mlx5_wqe_ctrl_seg;
using ::mlx5_wqe_data_seg;
using ::mlx5_wqe_inl_data_seg;
using ::mlx5_wqe_raddr_seg;
#else
// Layout-equivalent to rdma-core's (same names, same values), reduced to the
// fields used here; the rest is reserved padding.
enum : std::uint32_t {
  MLX5_SND_DBR = 1,
  MLX5_OPCODE_RDMA_WRITE = 0x08,
  MLX5_OPCODE_RDMA_WRITE_IMM = 0x09,
  MLX5_WQE_CTRL_SOLICITED = 1 << 1,
  MLX5_WQE_CTRL_CQ_UPDATE = 2 << 2,
  MLX5_WQE_CTRL_FENCE = 4 << 5,
  MLX5_SEND_WQE_BB = 64,
  MLX5_INLINE_SEG = 0x80000000u,
  MLX5_CQE_OWNER_MASK = 1,
  MLX5_CQE_REQ = 0,
  MLX5_CQE_RESP_WR_IMM = 1,
  MLX5_CQE_REQ_ERR = 13,
  MLX5_CQE_RESP_ERR = 14,
  MLX5_CQE_INVALID = 15,
};
struct mlx5_wqe_ctrl_seg {
  std::uint32_t opmod_idx_opcode;
  std::uint32_t qpn_ds;
  std::uint8_t signature;
  std::uint16_t dci_stream_channel_id;
  std::uint8_t fm_ce_se;
  std::uint32_t imm;
} __attribute__((__packed__)) __attribute__((__aligned__(4)));
struct mlx5_wqe_raddr_seg {
  std::uint64_t raddr;
  std::uint32_t rkey;
  std::uint32_t reserved;
};
struct mlx5_wqe_data_seg {
  std::uint32_t byte_count;
  std::uint32_t lkey;
  std::uint64_t addr;
};
struct mlx5_wqe_inl_data_seg {
  std::uint32_t byte_count;
};
struct mlx5_cqe64 {
  std::uint8_t rsvd0[36];
  std::uint32_t imm_inval_pkey;
  std::uint8_t rsvd40[4];
  std::uint32_t byte_cnt;
  std::uint64_t timestamp;
  std::uint32_t sop_drop_qpn;
  std::uint16_t wqe_counter;
  std::uint8_t signature;
  std::uint8_t op_own;
};
struct mlx5_err_cqe {
  std::uint8_t rsvd0[54];
  std::uint8_t vendor_err_synd;
  std::uint8_t syndrome;
  std::uint32_t s_wqe_opcode_qpn;
  std::uint16_t wqe_counter;
  std::uint8_t signature;
  std::uint8_t op_own;
};
#endif

// The PRM's offsets of every field written or read here.
static_assert(sizeof(mlx5_wqe_ctrl_seg) == 16, "ctrl segment size");
static_assert(offsetof(mlx5_wqe_ctrl_seg, opmod_idx_opcode) == 0, "ctrl opmod_idx_opcode");
static_assert(offsetof(mlx5_wqe_ctrl_seg, qpn_ds) == 4, "ctrl qpn_ds");
static_assert(offsetof(mlx5_wqe_ctrl_seg, signature) == 8, "ctrl signature");
static_assert(offsetof(mlx5_wqe_ctrl_seg, dci_stream_channel_id) == 9, "ctrl dci_stream_channel_id");
static_assert(offsetof(mlx5_wqe_ctrl_seg, fm_ce_se) == 11, "ctrl fm_ce_se");
static_assert(offsetof(mlx5_wqe_ctrl_seg, imm) == 12, "ctrl imm");
static_assert(sizeof(mlx5_wqe_raddr_seg) == 16, "raddr segment size");
static_assert(offsetof(mlx5_wqe_raddr_seg, raddr) == 0, "raddr raddr");
static_assert(offsetof(mlx5_wqe_raddr_seg, rkey) == 8, "raddr rkey");
static_assert(offsetof(mlx5_wqe_raddr_seg, reserved) == 12, "raddr reserved");
static_assert(sizeof(mlx5_wqe_data_seg) == 16, "data segment size");
static_assert(offsetof(mlx5_wqe_data_seg, byte_count) == 0, "data byte_count");
static_assert(offsetof(mlx5_wqe_data_seg, lkey) == 4, "data lkey");
static_assert(offsetof(mlx5_wqe_data_seg, addr) == 8, "data addr");
static_assert(sizeof(mlx5_wqe_inl_data_seg) == 4, "inline segment header size");
static_assert(offsetof(mlx5_wqe_inl_data_seg, byte_count) == 0, "inline byte_count");
static_assert(sizeof(mlx5_cqe64) == 64, "cqe64 size");
static_assert(offsetof(mlx5_cqe64, imm_inval_pkey) == 36, "cqe imm_inval_pkey");
static_assert(offsetof(mlx5_cqe64, byte_cnt) == 44, "cqe byte_cnt");
static_assert(offsetof(mlx5_cqe64, sop_drop_qpn) == 56, "cqe sop_drop_qpn");
static_assert(offsetof(mlx5_cqe64, wqe_counter) == 60, "cqe wqe_counter");
static_assert(offsetof(mlx5_cqe64, op_own) == 63, "cqe op_own");
static_assert(sizeof(mlx5_err_cqe) == 64, "error cqe size");
static_assert(offsetof(mlx5_err_cqe, vendor_err_synd) == 54, "error cqe vendor_err_synd");
static_assert(offsetof(mlx5_err_cqe, syndrome) == 55, "error cqe syndrome");
static_assert(offsetof(mlx5_err_cqe, s_wqe_opcode_qpn) == 56, "error cqe s_wqe_opcode_qpn");
static_assert(offsetof(mlx5_err_cqe, wqe_counter) == 60, "error cqe wqe_counter");
static_assert(offsetof(mlx5_err_cqe, op_own) == 63, "error cqe op_own");

static_assert(MLX5_SEND_WQE_BB == 64, "send-queue basic block");
// Largest inline payload of a one-BB WRITE: BB - ctrl - raddr - inline header.
inline constexpr std::uint32_t kMaxInlineBytes = MLX5_SEND_WQE_BB - 16 - 16 - 4;
// DS of a WRITE with a data segment (ctrl + raddr + data).
inline constexpr std::uint8_t kRdmaWriteDs = 3;

// Byte swaps as plain shifts: usable on the device (no htobe32 there), and
// compilers turn them into bswap / prmt.
EAAS_MLX5_FN std::uint16_t Bswap16(std::uint16_t v) {
  return static_cast<std::uint16_t>((v >> 8) | (v << 8));
}
EAAS_MLX5_FN std::uint32_t Bswap32(std::uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
}
EAAS_MLX5_FN std::uint64_t Bswap64(std::uint64_t v) {
  return (static_cast<std::uint64_t>(Bswap32(static_cast<std::uint32_t>(v))) << 32) |
         Bswap32(static_cast<std::uint32_t>(v >> 32));
}

// --- segment writers --------------------------------------------------------
// Each writes every byte of its segment (reserved ones as 0): a send-queue
// slot still holds the bytes of the WQE it carried one lap earlier.

// Control segment. `imm` in host order (the receiver's CQE carries it
// big-endian, as ibv_send_wr.imm_data would be); `fm_ce_se` is a mask of
// MLX5_WQE_CTRL_* (fence mode, CQ update, solicited event).
EAAS_MLX5_FN void SetCtrlSeg(mlx5_wqe_ctrl_seg* seg, std::uint16_t wqe_index, std::uint8_t opcode,
                             std::uint8_t opmod, std::uint32_t qpn, std::uint8_t fm_ce_se,
                             std::uint8_t ds, std::uint8_t signature, std::uint32_t imm) {
  seg->opmod_idx_opcode = Bswap32((std::uint32_t{opmod} << 24) | (std::uint32_t{wqe_index} << 8) | opcode);
  seg->qpn_ds = Bswap32((qpn << 8) | ds);
  seg->signature = signature;
  seg->dci_stream_channel_id = 0;
  seg->fm_ce_se = fm_ce_se;
  seg->imm = Bswap32(imm);
}

EAAS_MLX5_FN void SetRaddrSeg(mlx5_wqe_raddr_seg* seg, std::uint64_t raddr, std::uint32_t rkey) {
  seg->raddr = Bswap64(raddr);
  seg->rkey = Bswap32(rkey);
  seg->reserved = 0;
}

EAAS_MLX5_FN void SetDataSeg(mlx5_wqe_data_seg* seg, std::uint32_t byte_count, std::uint32_t lkey,
                             std::uint64_t addr) {
  seg->byte_count = Bswap32(byte_count);
  seg->lkey = Bswap32(lkey);
  seg->addr = Bswap64(addr);
}

// Inline data segment: byte count with MLX5_INLINE_SEG set, the bytes, zeros
// up to the next 16-byte boundary. Returns its size in 16-byte units (for
// DS). The caller keeps `size` within the WQE (kMaxInlineBytes for one BB).
EAAS_MLX5_FN std::uint8_t SetInlineSeg(mlx5_wqe_inl_data_seg* seg, const void* data, std::uint32_t size) {
  seg->byte_count = Bswap32(size | MLX5_INLINE_SEG);
  auto* dst = reinterpret_cast<std::uint8_t*>(seg) + sizeof(*seg);
  const auto* src = static_cast<const std::uint8_t*>(data);
  const std::uint32_t padded = (static_cast<std::uint32_t>(sizeof(*seg)) + size + 15) / 16 * 16;
  for (std::uint32_t i = 0; i < padded - sizeof(*seg); ++i) dst[i] = i < size ? src[i] : 0;
  return static_cast<std::uint8_t>(padded / 16);
}

// --- whole WQEs (one BB each; `wqe` is the BB's first byte) -------------------
namespace detail {
EAAS_MLX5_FN mlx5_wqe_ctrl_seg* Ctrl(void* wqe) { return static_cast<mlx5_wqe_ctrl_seg*>(wqe); }
EAAS_MLX5_FN mlx5_wqe_raddr_seg* Raddr(void* wqe) {
  return reinterpret_cast<mlx5_wqe_raddr_seg*>(static_cast<std::uint8_t*>(wqe) + sizeof(mlx5_wqe_ctrl_seg));
}
EAAS_MLX5_FN void* AfterRaddr(void* wqe) {
  return static_cast<std::uint8_t*>(wqe) + sizeof(mlx5_wqe_ctrl_seg) + sizeof(mlx5_wqe_raddr_seg);
}
}  // namespace detail

// RDMA WRITE of `size` bytes at (laddr, lkey) to (raddr, rkey); with
// `opcode` MLX5_OPCODE_RDMA_WRITE_IMM the responder also consumes a receive
// WQE and gets a CQE carrying `imm`. Returns DS.
EAAS_MLX5_FN std::uint8_t WriteRdmaWrite(void* wqe, std::uint8_t opcode, std::uint16_t wqe_index,
                                         std::uint32_t qpn, std::uint8_t fm_ce_se, std::uint64_t raddr,
                                         std::uint32_t rkey, std::uint64_t laddr, std::uint32_t lkey,
                                         std::uint32_t size, std::uint32_t imm) {
  SetCtrlSeg(detail::Ctrl(wqe), wqe_index, opcode, 0, qpn, fm_ce_se, kRdmaWriteDs, 0, imm);
  SetRaddrSeg(detail::Raddr(wqe), raddr, rkey);
  SetDataSeg(static_cast<mlx5_wqe_data_seg*>(detail::AfterRaddr(wqe)), size, lkey, laddr);
  return kRdmaWriteDs;
}

// RDMA WRITE of `size` <= kMaxInlineBytes bytes carried in the WQE itself
// (no lkey: the bytes are read when the WQE is written). Returns DS.
EAAS_MLX5_FN std::uint8_t WriteInlineRdmaWrite(void* wqe, std::uint16_t wqe_index, std::uint32_t qpn,
                                               std::uint8_t fm_ce_se, std::uint64_t raddr,
                                               std::uint32_t rkey, const void* data, std::uint32_t size) {
  SetRaddrSeg(detail::Raddr(wqe), raddr, rkey);
  const std::uint8_t ds =
      2 + SetInlineSeg(static_cast<mlx5_wqe_inl_data_seg*>(detail::AfterRaddr(wqe)), data, size);
  SetCtrlSeg(detail::Ctrl(wqe), wqe_index, MLX5_OPCODE_RDMA_WRITE, 0, qpn, fm_ce_se, ds, 0, 0);
  return ds;
}

// The publication of a slot's sequence word (8 bytes, little-endian as in
// wire_format.h) after its payload's WRITE on the same QP: an inline WRITE
// with the fence mode set (see "Publishing a message" above); `signaled`
// asks for a CQE (to reclaim the send-queue slots). Returns DS.
EAAS_MLX5_FN std::uint8_t WriteSequenceWord(void* wqe, std::uint16_t wqe_index, std::uint32_t qpn,
                                            std::uint64_t raddr, std::uint32_t rkey, std::uint64_t seq,
                                            bool signaled) {
  const auto flags = static_cast<std::uint8_t>(std::uint32_t{MLX5_WQE_CTRL_FENCE} |
                                               (signaled ? std::uint32_t{MLX5_WQE_CTRL_CQ_UPDATE} : 0u));
  return WriteInlineRdmaWrite(wqe, wqe_index, qpn, flags, raddr, rkey, &seq, sizeof(seq));
}

// --- doorbell -----------------------------------------------------------------

// Orders earlier stores before later ones as the NIC sees them, and drains
// write-combining buffers (the BlueFlame register is mapped write-combining).
// Device: a system-scope fence (the send queue and record live in GPU memory
// the NIC reads over PCIe; the UAR page is I/O memory mapped into the GPU).
EAAS_MLX5_FN void NicWriteBarrier() {
#if defined(__CUDA_ARCH__)
  __threadfence_system();
#elif defined(__x86_64__) || defined(__i386__)
  __asm__ __volatile__("sfence" ::: "memory");
#elif defined(__aarch64__)
  __asm__ __volatile__("dmb oshst" ::: "memory");  // outer shareable: the NIC
#else
  __sync_synchronize();
#endif
}

// The doorbell record's send counter: BBs posted so far, mod 2^16, big-endian.
EAAS_MLX5_FN void SetDoorbellRecord(volatile std::uint32_t* dbrec, std::uint16_t sq_producer) {
  dbrec[MLX5_SND_DBR] = Bswap32(sq_producer);
}

// Posting steps 2-5 (header comment): `sq_producer` counts the BBs written,
// including the last WQE, whose control segment `last_ctrl` is; `bf` is the
// UAR's BlueFlame register (8-byte aligned). One thread per QP at a time.
EAAS_MLX5_FN void RingDoorbell(volatile std::uint32_t* dbrec, volatile std::uint64_t* bf,
                               const mlx5_wqe_ctrl_seg* last_ctrl, std::uint16_t sq_producer) {
  NicWriteBarrier();  // WQEs before the record
  SetDoorbellRecord(dbrec, sq_producer);
  NicWriteBarrier();  // record before the doorbell
  // One 64-bit store: opmod_idx_opcode and qpn_ds, already big-endian.
  const auto* words = reinterpret_cast<const std::uint32_t*>(last_ctrl);
  *bf = std::uint64_t{words[0]} | (std::uint64_t{words[1]} << 32);
  NicWriteBarrier();  // flush the write-combining buffer now, not later
}

// --- completions -------------------------------------------------------------

// A CQE, decoded. Error CQEs (opcode MLX5_CQE_REQ_ERR / MLX5_CQE_RESP_ERR)
// carry the syndrome (MLX5_CQE_SYNDROME_*) and the vendor's own; both are 0
// for the others.
struct Cqe {
  std::uint8_t opcode;           // MLX5_CQE_*
  std::uint8_t owner;            // the owner bit
  std::uint16_t wqe_counter;     // WQE index of the completed WQE
  std::uint32_t byte_cnt;        // bytes received (responder CQEs)
  std::uint32_t qpn;             // the QP the CQE is for
  std::uint32_t imm;             // immediate (responder WRITE_IMM), host order
  std::uint8_t syndrome;         // error CQEs only
  std::uint8_t vendor_syndrome;  // error CQEs only
};

EAAS_MLX5_FN bool CqeIsError(std::uint8_t opcode) {
  return opcode == MLX5_CQE_REQ_ERR || opcode == MLX5_CQE_RESP_ERR;
}

// Whether CQE number `consumer_index` (the consumer's running count; the CQ
// has 2^log_cq_size entries) was written by the NIC in the current lap. Read
// op_own with an acquire load (device: ld.acquire) before decoding the rest.
EAAS_MLX5_FN bool CqeIsOwnedBySoftware(std::uint8_t op_own, std::uint32_t consumer_index,
                                       std::uint32_t log_cq_size) {
  return (op_own >> 4) != MLX5_CQE_INVALID &&
         (op_own & MLX5_CQE_OWNER_MASK) == ((consumer_index >> log_cq_size) & 1);
}

EAAS_MLX5_FN Cqe DecodeCqe(const mlx5_cqe64* cqe) {
  Cqe out{};
  out.opcode = static_cast<std::uint8_t>(cqe->op_own >> 4);
  out.owner = cqe->op_own & MLX5_CQE_OWNER_MASK;
  out.wqe_counter = Bswap16(cqe->wqe_counter);
  out.byte_cnt = Bswap32(cqe->byte_cnt);
  out.qpn = Bswap32(cqe->sop_drop_qpn) & 0xffffffu;
  out.imm = Bswap32(cqe->imm_inval_pkey);
  if (CqeIsError(out.opcode)) {
    const auto* err = reinterpret_cast<const mlx5_err_cqe*>(cqe);
    out.syndrome = err->syndrome;
    out.vendor_syndrome = err->vendor_err_synd;
    out.byte_cnt = 0;  // not a byte count in an error CQE
    out.imm = 0;
  }
  return out;
}

}  // namespace mlx5
}  // namespace eaas

#endif  // EAAS_FFI_MLX5_WQE_H_
