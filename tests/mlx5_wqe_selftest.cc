// ffi/mlx5_wqe.h against rdma-core's own encoders (<infiniband/mlx5dv.h>):
// for N random seeds, every segment, whole WQE, doorbell and CQE decode is
// built both ways, over the same random stale bytes (a send-queue slot holds
// its previous WQE), and compared byte for byte. Built and run by
// tests/test_mlx5_wqe.py, twice: on rdma-core's layouts and with
// -DEAAS_MLX5_OWN_LAYOUTS on the header's own declarations (what a machine
// without libibverbs-dev builds).
//
// Usage: mlx5_wqe_selftest N   (exit 0: all equal; 1: first mismatch printed)
#include <infiniband/mlx5dv.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "mlx5_wqe.h"

namespace m = eaas::mlx5;

// The header's constants are rdma-core's (trivially so unless OWN_LAYOUTS).
#define SAME(name) static_assert(std::uint32_t(m::name) == std::uint32_t(::name), #name)
SAME(MLX5_SND_DBR);
SAME(MLX5_OPCODE_RDMA_WRITE);
SAME(MLX5_OPCODE_RDMA_WRITE_IMM);
SAME(MLX5_WQE_CTRL_SOLICITED);
SAME(MLX5_WQE_CTRL_CQ_UPDATE);
SAME(MLX5_WQE_CTRL_FENCE);
SAME(MLX5_SEND_WQE_BB);
SAME(MLX5_INLINE_SEG);
SAME(MLX5_CQE_OWNER_MASK);
SAME(MLX5_CQE_REQ);
SAME(MLX5_CQE_RESP_WR_IMM);
SAME(MLX5_CQE_REQ_ERR);
SAME(MLX5_CQE_RESP_ERR);
SAME(MLX5_CQE_INVALID);
#undef SAME

namespace {

struct alignas(64) Block {
  std::uint8_t b[64];
};

std::mt19937_64 rng;
std::uint64_t R() { return rng(); }

// Two blocks holding the same random "previous WQE" bytes.
void Stale(Block* mine, Block* ref) {
  for (auto& byte : mine->b) byte = static_cast<std::uint8_t>(R());
  *ref = *mine;
}

bool Same(const char* what, std::uint64_t seed, const void* mine, const void* ref, std::size_t n) {
  if (std::memcmp(mine, ref, n) == 0) return true;
  std::printf("MISMATCH %s (seed %llu)\n mine:", what, static_cast<unsigned long long>(seed));
  for (std::size_t i = 0; i < n; ++i) std::printf(" %02x", static_cast<const std::uint8_t*>(mine)[i]);
  std::printf("\n  ref:");
  for (std::size_t i = 0; i < n; ++i) std::printf(" %02x", static_cast<const std::uint8_t*>(ref)[i]);
  std::printf("\n");
  return false;
}

bool Check(const char* what, std::uint64_t seed, std::uint64_t mine, std::uint64_t ref) {
  if (mine == ref) return true;
  std::printf("MISMATCH %s (seed %llu): mine %llx, rdma-core %llx\n", what, static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(mine), static_cast<unsigned long long>(ref));
  return false;
}

// rdma-core's control segment: its setter, which leaves the reserved
// dci_stream_channel_id alone (0 for an RC QP) and stores imm as given
// (big-endian, as ibv_send_wr.imm_data).
void RefCtrl(std::uint8_t* p, std::uint16_t idx, std::uint8_t opcode, std::uint8_t opmod, std::uint32_t qpn,
             std::uint8_t fm_ce_se, std::uint8_t ds, std::uint8_t sig, std::uint32_t imm) {
  auto* c = reinterpret_cast<::mlx5_wqe_ctrl_seg*>(p);
  mlx5dv_set_ctrl_seg(c, idx, opcode, opmod, qpn, fm_ce_se, ds, sig, htobe32(imm));
  c->dci_stream_channel_id = 0;
}

void RefRaddr(std::uint8_t* p, std::uint64_t raddr, std::uint32_t rkey) {
  auto* r = reinterpret_cast<::mlx5_wqe_raddr_seg*>(p);
  r->raddr = htobe64(raddr);
  r->rkey = htobe32(rkey);
  r->reserved = 0;
}

// Returns the segment's 16-byte units.
int RefInline(std::uint8_t* p, const std::uint8_t* data, std::uint32_t size) {
  reinterpret_cast<::mlx5_wqe_inl_data_seg*>(p)->byte_count = htobe32(size | ::MLX5_INLINE_SEG);
  const std::uint32_t padded = (4 + size + 15) & ~15u;
  std::memcpy(p + 4, data, size);
  std::memset(p + 4 + size, 0, padded - 4 - size);
  return static_cast<int>(padded / 16);
}

bool OneSeed(std::uint64_t seed) {
  rng.seed(seed);
  Block mine, ref;
  const auto idx = static_cast<std::uint16_t>(R());
  const auto qpn = static_cast<std::uint32_t>(R()) & 0xffffff;
  const auto opmod = static_cast<std::uint8_t>(R()), sig = static_cast<std::uint8_t>(R());
  const auto fm_ce_se = static_cast<std::uint8_t>(R()), ds = static_cast<std::uint8_t>(R());
  const auto opcode = static_cast<std::uint8_t>(R());
  const auto imm = static_cast<std::uint32_t>(R()), rkey = static_cast<std::uint32_t>(R());
  const auto lkey = static_cast<std::uint32_t>(R()), len = static_cast<std::uint32_t>(R());
  const std::uint64_t raddr = R(), laddr = R();
  std::uint8_t data[64];
  for (auto& byte : data) byte = static_cast<std::uint8_t>(R());

  // Segments.
  Stale(&mine, &ref);
  m::SetCtrlSeg(reinterpret_cast<m::mlx5_wqe_ctrl_seg*>(mine.b), idx, opcode, opmod, qpn, fm_ce_se, ds, sig, imm);
  RefCtrl(ref.b, idx, opcode, opmod, qpn, fm_ce_se, ds, sig, imm);
  if (!Same("ctrl segment", seed, &mine, &ref, 64)) return false;

  Stale(&mine, &ref);
  m::SetRaddrSeg(reinterpret_cast<m::mlx5_wqe_raddr_seg*>(mine.b), raddr, rkey);
  RefRaddr(ref.b, raddr, rkey);
  if (!Same("raddr segment", seed, &mine, &ref, 64)) return false;

  Stale(&mine, &ref);
  m::SetDataSeg(reinterpret_cast<m::mlx5_wqe_data_seg*>(mine.b), len, lkey, laddr);
  mlx5dv_set_data_seg(reinterpret_cast<::mlx5_wqe_data_seg*>(ref.b), len, lkey, laddr);
  if (!Same("data segment", seed, &mine, &ref, 64)) return false;

  Stale(&mine, &ref);
  const std::uint32_t inl = static_cast<std::uint32_t>(R() % 61);  // 0..60: what one BB holds
  const int units = m::SetInlineSeg(reinterpret_cast<m::mlx5_wqe_inl_data_seg*>(mine.b), data, inl);
  if (!Check("inline segment units", seed, units, RefInline(ref.b, data, inl))) return false;
  if (!Same("inline segment", seed, &mine, &ref, 64)) return false;

  // Whole WQEs: WRITE and WRITE with immediate (ctrl, raddr, data).
  for (const std::uint8_t op : {std::uint8_t{::MLX5_OPCODE_RDMA_WRITE}, std::uint8_t{::MLX5_OPCODE_RDMA_WRITE_IMM}}) {
    const std::uint32_t op_imm = op == ::MLX5_OPCODE_RDMA_WRITE_IMM ? imm : 0;
    Stale(&mine, &ref);
    const int got = m::WriteRdmaWrite(mine.b, op, idx, qpn, fm_ce_se, raddr, rkey, laddr, lkey, len, op_imm);
    RefCtrl(ref.b, idx, op, 0, qpn, fm_ce_se, 3, 0, op_imm);
    RefRaddr(ref.b + 16, raddr, rkey);
    mlx5dv_set_data_seg(reinterpret_cast<::mlx5_wqe_data_seg*>(ref.b + 32), len, lkey, laddr);
    if (!Check("rdma write ds", seed, got, 3) || !Same("rdma write wqe", seed, &mine, &ref, 64)) return false;
  }

  // Inline WRITE, and the sequence-word publication (fenced inline WRITE).
  Stale(&mine, &ref);
  const std::uint32_t small = static_cast<std::uint32_t>(R() % (m::kMaxInlineBytes + 1));
  int got = m::WriteInlineRdmaWrite(mine.b, idx, qpn, fm_ce_se, raddr, rkey, data, small);
  int want = 2 + RefInline(ref.b + 32, data, small);
  RefCtrl(ref.b, idx, ::MLX5_OPCODE_RDMA_WRITE, 0, qpn, fm_ce_se, static_cast<std::uint8_t>(want), 0, 0);
  RefRaddr(ref.b + 16, raddr, rkey);
  if (!Check("inline write ds", seed, got, want) || !Same("inline write wqe", seed, &mine, &ref, 64)) return false;

  Stale(&mine, &ref);
  const bool signaled = R() & 1;
  const std::uint64_t seq = R();
  got = m::WriteSequenceWord(mine.b, idx, qpn, raddr, rkey, seq, signaled);
  std::uint8_t seq_le[8];
  std::memcpy(seq_le, &seq, 8);  // the wire format's byte order (little-endian host)
  want = 2 + RefInline(ref.b + 32, seq_le, 8);
  RefCtrl(ref.b, idx, ::MLX5_OPCODE_RDMA_WRITE, 0, qpn,
          static_cast<std::uint8_t>(::MLX5_WQE_CTRL_FENCE | (signaled ? ::MLX5_WQE_CTRL_CQ_UPDATE : 0)),
          static_cast<std::uint8_t>(want), 0, 0);
  RefRaddr(ref.b + 16, raddr, rkey);
  if (!Check("sequence word ds", seed, got, want) || !Same("sequence word wqe", seed, &mine, &ref, 64)) return false;

  // Doorbell: the record's send counter (libmlx5: db[MLX5_SND_DBR] =
  // htobe32(cur_post & 0xffff)) and the BlueFlame word (the control
  // segment's first 8 bytes); the receive counter stays untouched.
  std::uint32_t dbrec[2] = {static_cast<std::uint32_t>(R()), static_cast<std::uint32_t>(R())};
  const std::uint32_t rcv = dbrec[0];
  std::uint64_t bf = R(), want_bf;
  std::memcpy(&want_bf, mine.b, 8);
  m::RingDoorbell(dbrec, &bf, reinterpret_cast<const m::mlx5_wqe_ctrl_seg*>(mine.b), idx);
  if (!Check("dbrec[MLX5_SND_DBR]", seed, dbrec[::MLX5_SND_DBR], htobe32(idx)) ||
      !Check("dbrec[MLX5_RCV_DBR]", seed, dbrec[::MLX5_RCV_DBR], rcv) || !Check("blueflame", seed, bf, want_bf))
    return false;

  // CQE decode on random bytes with a random opcode (errors included).
  Stale(&mine, &ref);
  auto* cqe = reinterpret_cast<::mlx5_cqe64*>(ref.b);
  const std::uint8_t opcodes[] = {::MLX5_CQE_REQ, ::MLX5_CQE_RESP_WR_IMM, ::MLX5_CQE_REQ_ERR, ::MLX5_CQE_RESP_ERR,
                                  static_cast<std::uint8_t>(R() & 15)};
  cqe->op_own = static_cast<std::uint8_t>((opcodes[R() % 5] << 4) | (cqe->op_own & 15));
  const m::Cqe d = m::DecodeCqe(reinterpret_cast<const m::mlx5_cqe64*>(ref.b));
  const bool err = mlx5dv_get_cqe_opcode(cqe) == ::MLX5_CQE_REQ_ERR || mlx5dv_get_cqe_opcode(cqe) == ::MLX5_CQE_RESP_ERR;
  const auto* ecqe = reinterpret_cast<const ::mlx5_err_cqe*>(ref.b);
  const std::uint32_t log_size = static_cast<std::uint32_t>(R() % 16), ci = static_cast<std::uint32_t>(R());
  // libmlx5's ownership test (get_sw_cqe): not INVALID and owner == lap parity.
  const bool sw = mlx5dv_get_cqe_opcode(cqe) != ::MLX5_CQE_INVALID &&
                  !((cqe->op_own & ::MLX5_CQE_OWNER_MASK) ^ !!(ci & (1u << log_size)));
  return Check("cqe opcode", seed, d.opcode, mlx5dv_get_cqe_opcode(cqe)) &&
         Check("cqe owner", seed, d.owner, mlx5dv_get_cqe_owner(cqe)) &&
         Check("cqe wqe_counter", seed, d.wqe_counter, be16toh(cqe->wqe_counter)) &&
         Check("cqe qpn", seed, d.qpn, be32toh(cqe->sop_drop_qpn) & 0xffffff) &&
         Check("cqe byte_cnt", seed, d.byte_cnt, err ? 0 : be32toh(cqe->byte_cnt)) &&
         Check("cqe imm", seed, d.imm, err ? 0 : be32toh(cqe->imm_inval_pkey)) &&
         Check("cqe syndrome", seed, d.syndrome, err ? ecqe->syndrome : 0) &&
         Check("cqe vendor syndrome", seed, d.vendor_syndrome, err ? ecqe->vendor_err_synd : 0) &&
         Check("cqe ownership", seed, m::CqeIsOwnedBySoftware(cqe->op_own, ci, log_size), sw);
}

}  // namespace

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 1000;
  for (long seed = 0; seed < n; ++seed) {
    if (!OneSeed(static_cast<std::uint64_t>(seed))) return 1;
  }
  std::printf("mlx5_wqe_selftest: %ld seeds equal (layouts: %s)\n", n,
              EAAS_MLX5_HAVE_RDMA_CORE ? "rdma-core" : "own");
  return 0;
}
