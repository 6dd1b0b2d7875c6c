// The GPU side of the `ibgda` backend's send path: a CUDA thread posts a
// message to a peer's RC queue pair itself (WQEs into the send queue, the
// doorbell record, the doorbell) and reclaims the send queue from its CQEs,
// as ffi/ibgda_writer.cc does on CPUs (same WQEs: see "A message" there).
// The kernels of ffi/cuda_ipc_transport.cu call it for an endpoint opened
// with a NIC (eaas_ibgda_gpu_open); the control path (connecting QPs,
// readiness) stays ibgda_writer.cc's.
//
// == Memory ==
// The send queue, doorbell record, CQ and doorbell word, the staging area the
// WRITEs gather from and the inbox the peers write into are host memory
// mapped into the GPU (cudaHostRegister): the model NIC (ffi/nic_model.h) is
// a CPU thread and reads and writes them there. With an mlx5 NIC the queues
// and mailboxes would be GPU memory and the doorbell the UAR page.
//
// == Ownership ==
// NicQueue is in device memory, one per peer. The host writes it whole when
// the peer becomes ready (counters 0: the QP was just reset) and clears
// `ready` when it goes; in between only kernels touch it. Posting and
// reclaiming take `lock` (the server's reply kernel answers several channels
// of one client from different blocks); `completed` and `staged_until` are
// also read without it, by blocks waiting for a staging slot (both only
// grow while the QP lives).
#ifndef EAAS_FFI_IBGDA_POST_CUH_
#define EAAS_FFI_IBGDA_POST_CUH_

#include <cstdint>

#include "mlx5_wqe.h"

namespace eaas {
namespace ibgda {

inline constexpr int kMaxNicChannels = 64;  // the GPU endpoints' channel limit (MakeGeometry)

struct NicQueue {
  // Written by the host (ready last).
  std::uint8_t* sq;                 // device mapping of the send queue
  volatile std::uint32_t* dbrec;    // device mapping of the doorbell record
  const std::uint8_t* cq;           // device mapping of the CQ
  std::uint64_t* bf;                // device mapping of this QP's doorbell word
  std::uint64_t remote_slots;       // the peer's inbox slot (0, 0), in its address space
  std::uint64_t staging_addr;       // staging slot (peer, 0), in this process's address space (the NIC's)
  std::uint32_t qpn, rkey, lkey, log_sq, log_cq;
  // Kernels only.
  std::uint32_t posted;     // BBs posted (running count)
  std::uint32_t completed;  // BBs whose WQEs completed
  std::uint32_t cqes;       // CQEs consumed
  std::uint32_t lock;
  std::uint32_t failed;     // an error CQE came: the QP is in ERR
  std::uint32_t ready;      // 1: messages may go out (host-written)
  std::uint32_t staged_until[kMaxNicChannels];  // `posted` after the last message staged per channel
};

// Bytes [offset, offset + size) of a slot that a message occupies.
struct MessageRange {
  std::uint64_t offset, size;
};

namespace post {

__device__ __forceinline__ std::uint32_t LoadVolatile(const std::uint32_t* p) {
  return *reinterpret_cast<const volatile std::uint32_t*>(p);
}

__device__ __forceinline__ std::uint64_t NowNs() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ bool TryLock(NicQueue* q) {
  if (atomicCAS(&q->lock, 0u, 1u) != 0u) return false;
  __threadfence();  // acquire the previous holder's updates
  return true;
}

__device__ __forceinline__ void Unlock(NicQueue* q) {
  __threadfence();  // release this holder's updates
  atomicExch(&q->lock, 0u);
}

// Consumes the CQEs the NIC wrote (lock held): a success frees the send
// queue up to the WQE it names; an error means the QP is in ERR.
__device__ void Reclaim(NicQueue* q) {
  namespace m = eaas::mlx5;
  const std::uint32_t mask = (1u << q->log_cq) - 1;
  for (;;) {
    const std::uint8_t* at = q->cq + (q->cqes & mask) * sizeof(m::mlx5_cqe64);
    // wqe_counter, signature and op_own are the CQE's last 4 bytes: acquire
    // them in one load, then copy the rest (written before op_own).
    std::uint32_t tail;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(tail) : "l"(at + 60) : "memory");
    if (!m::CqeIsOwnedBySoftware(static_cast<std::uint8_t>(tail >> 24), q->cqes, q->log_cq)) return;
    m::mlx5_cqe64 cqe;
    const auto* src = reinterpret_cast<const volatile std::uint32_t*>(at);
    auto* dst = reinterpret_cast<std::uint32_t*>(&cqe);
    for (int i = 0; i < 15; ++i) dst[i] = src[i];
    dst[15] = tail;
    const m::Cqe c = m::DecodeCqe(&cqe);
    ++q->cqes;
    if (m::CqeIsError(c.opcode)) {
      atomicExch(&q->failed, 1u);
      continue;
    }
    const auto next = static_cast<std::uint16_t>(c.wqe_counter + 1);
    const std::uint32_t completed = q->posted - static_cast<std::uint16_t>(static_cast<std::uint16_t>(q->posted) - next);
    atomicExch(&q->completed, completed);
  }
}

// Waits until the staging slot of `channel` is free again (the NIC has
// completed the message staged there before) or `deadline` passes, the QP
// fails or the peer goes. One thread; true when the slot may be written.
__device__ bool WaitForStagingSlot(NicQueue* q, int channel, std::uint64_t deadline) {
  for (;;) {
    if (LoadVolatile(&q->ready) == 0 || LoadVolatile(&q->failed) != 0) return false;
    const std::uint32_t until = LoadVolatile(&q->staged_until[channel]);
    if (static_cast<std::int32_t>(LoadVolatile(&q->completed) - until) >= 0) return true;
    if (TryLock(q)) {
      Reclaim(q);
      Unlock(q);
      if (static_cast<std::int32_t>(LoadVolatile(&q->completed) - until) >= 0) return true;
    }
    if (NowNs() > deadline) return false;
    __nanosleep(500);
  }
}

// Posts the message staged for `channel` (its bytes: `ranges`, sorted, past
// the sequence word; `remote`: its slot in the peer's inbox) and rings the
// doorbell: the odd sequence word inline, the ranges (the first one fenced),
// the even sequence word inline, fenced and signalled. One thread; false
// when the QP failed, the peer went, or the send queue had no room by
// `deadline`.
__device__ bool PostMessage(NicQueue* q, int channel, std::uint64_t remote, std::uint64_t slot_bytes,
                            const MessageRange* ranges, int count, std::uint64_t seq, std::uint64_t deadline) {
  namespace m = eaas::mlx5;
  while (!TryLock(q)) {
    if (NowNs() > deadline) return false;
    __nanosleep(100);
  }
  const std::uint32_t sq_size = 1u << q->log_sq;
  const auto wqes = static_cast<std::uint32_t>(count) + 2;
  bool ok = false;
  for (;;) {
    Reclaim(q);
    if (LoadVolatile(&q->ready) == 0 || LoadVolatile(&q->failed) != 0) break;
    if (q->posted - LoadVolatile(&q->completed) + wqes <= sq_size) {
      ok = true;
      break;
    }
    if (NowNs() > deadline) break;
    __nanosleep(500);
  }
  if (ok) {
    const std::uint64_t local = q->staging_addr + slot_bytes * static_cast<std::uint64_t>(channel);
    // Each WQE is built in registers and stored as four 16-byte words: the
    // send queue is host memory, and one BB is then one PCIe write burst.
    alignas(16) std::uint8_t wqe[m::MLX5_SEND_WQE_BB];
    const auto store = [&] {
      auto* dst = reinterpret_cast<int4*>(q->sq + (q->posted & (sq_size - 1)) * m::MLX5_SEND_WQE_BB);
      const auto* src = reinterpret_cast<const int4*>(wqe);
      for (int i = 0; i < 4; ++i) dst[i] = src[i];
      ++q->posted;
    };
    const std::uint64_t odd = seq - 1;
    m::WriteInlineRdmaWrite(wqe, static_cast<std::uint16_t>(q->posted), q->qpn, 0, remote, q->rkey, &odd, sizeof(odd));
    store();
    for (int i = 0; i < count; ++i) {
      m::WriteRdmaWrite(wqe, m::MLX5_OPCODE_RDMA_WRITE, static_cast<std::uint16_t>(q->posted), q->qpn,
                        i == 0 ? m::MLX5_WQE_CTRL_FENCE : 0, remote + ranges[i].offset, q->rkey,
                        local + ranges[i].offset, q->lkey, static_cast<std::uint32_t>(ranges[i].size), 0);
      store();
    }
    m::WriteSequenceWord(wqe, static_cast<std::uint16_t>(q->posted), q->qpn, remote, q->rkey, seq, /*signaled=*/true);
    store();
    m::RingDoorbell(q->dbrec, q->bf, reinterpret_cast<const m::mlx5_wqe_ctrl_seg*>(wqe),
                    static_cast<std::uint16_t>(q->posted));
    atomicExch(&q->staged_until[channel], q->posted);
  }
  Unlock(q);
  return ok;
}

}  // namespace post
}  // namespace ibgda
}  // namespace eaas

#endif  // EAAS_FFI_IBGDA_POST_CUH_
