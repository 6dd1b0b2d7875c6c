// Every device-callable function of ffi/mlx5_wqe.h in one kernel: compiled
// to PTX by tests/test_mlx5_wqe.py (nvcc only, no GPU needed), so the header
// stays valid device code on both layouts.
#include "mlx5_wqe.h"

namespace m = eaas::mlx5;

__global__ void PostAndPoll(std::uint8_t* sq, std::uint32_t* dbrec, std::uint64_t* bf, const std::uint8_t* cq,
                            m::Cqe* out, std::uint64_t seq) {
  const std::uint16_t pi = static_cast<std::uint16_t>(3 * threadIdx.x);
  std::uint8_t* wqe = sq + 3 * 64 * threadIdx.x;
  m::WriteRdmaWrite(wqe, m::MLX5_OPCODE_RDMA_WRITE_IMM, pi, 0x42, 0, 0x1000, 7, 0x2000, 8, 4096, seq);
  const std::uint8_t bytes[5] = {1, 2, 3, 4, 5};
  m::WriteInlineRdmaWrite(wqe + 64, pi + 1, 0x42, m::MLX5_WQE_CTRL_SOLICITED, 0x1000, 7, bytes, sizeof(bytes));
  m::WriteSequenceWord(wqe + 128, pi + 2, 0x42, 0x1000, 7, seq, true);
  m::RingDoorbell(dbrec, bf, reinterpret_cast<const m::mlx5_wqe_ctrl_seg*>(wqe + 128), pi + 3);
  const auto* cqe = reinterpret_cast<const m::mlx5_cqe64*>(cq + 64 * threadIdx.x);
  if (m::CqeIsOwnedBySoftware(cqe->op_own, threadIdx.x, 6)) out[threadIdx.x] = m::DecodeCqe(cqe);
}
