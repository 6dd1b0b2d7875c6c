// The `cuda_ipc` backend of the expert transport: GPUs of one host, one
// process per GPU. Same wire format (wire_format.h), counters and statuses
// (transport_common.h) and custom-call signatures as the CPU `shm` backend,
// with the data path entirely on the GPU:
//
//   eaas_cuda_ipc_dispatch  (client)  kernels store each token's row straight
//                                     into the server GPU's inbox (NVLink)
//   eaas_cuda_ipc_combine   (client)  wait for the replies in device memory
//                                     (acquire loads, %globaltimer deadline),
//                                     then sum them back per token (one kernel)
//   eaas_cuda_ipc_poll      (server)  wait for requests, copy them out (one kernel)
//   eaas_cuda_ipc_reply     (server)  store each reply into the client's inbox
//
// == Memory ==
// Each endpoint owns ONE inbox in its GPU's memory (cudaMalloc, exported with
// cudaIpcGetMemHandle): max_endpoints x num_channels slots with the layout of
// wire_format.h (no segment header; the identity checks live in the
// directory file Python writes, see transport/cuda_ipc.py). Peers' inboxes
// are imported with cudaIpcOpenMemHandle by the control path
// (eaas_cuda_ipc_set_peer) and their device pointers kept in a device array.
// Everything a kernel needs about an endpoint (inbox, peers, sequence
// numbers, tickets, the last poll's accepted requests, counters) is in device
// memory and found through `g_views[endpoint]`, a __device__ table the host
// writes only when an endpoint is opened or closed. Kernel arguments are thus
// only XLA buffers, attributes and the endpoint's generation number (new at
// every open): a kernel launched for an endpoint that has since been closed
// finds another generation in g_views and fails closed (nothing sent,
// servers unavailable, nothing polled) instead of using the new endpoint's
// memory. That makes replaying a captured CUDA graph safe; the handlers are
// nevertheless NOT marked kCmdBufferCompatible: with XLA command buffers on,
// the exchange bench (bench/token_exchange_gpu.py, JAX 0.11.2, 2 x H200) did
// not finish, for a reason not found yet, so XLA runs them as plain thunks.
//
// == Publication (wire_format.h's seqlock, across GPUs) ==
// The blocks that write one message first store the odd sequence number
// (relaxed, system scope) and fence (replies always; requests only when the
// previous request of that slot was not answered, see wire_format.h), then
// copy their rows (block 0 also the header fields); each then fences
// (release, system scope) and increments a per-message counter; the last
// block fences (acquire + release) and stores the even sequence number. Readers
// spin with ld.acquire.sys and re-check the sequence number after copying
// (torn read). Fences are acq_rel, never sc (__threadfence_system): nothing
// here needs a total order and sc fences are slower. Sequence numbers start
// at the host's CLOCK_REALTIME nanoseconds at open, as in shm.
//
// == Kernel boundaries ==
// combine (wait, then sum) and poll (accept, then copy) are each ONE launch:
// the block that draws ticket 0 leads (waits/accepts) and the others wait for
// its release flag (GridSync), so a round trip has four kernels on its
// critical path (dispatch, poll, reply, combine) instead of six.
//
// == Peers ==
// A peer whose inbox is not imported yet gets nothing: dispatch returns
// sent = -1 (STATUS_UNAVAILABLE in combine); poll leaves a request whose
// sender is not imported in its slot. Both raise the peer's flag in a
// host-mapped `wanted` array; the endpoint's control thread (Python) imports
// it and the next call goes through. No host code runs on the data path.
//
// == Trust ==
// As in shm, headers are validated on a private copy and expert ids on the
// copied rows. A reply that fails validation is counted (per reason) and
// skipped like a stale one, and combine keeps waiting for the awaited reply:
// malformed replies in a server's slot cannot fail its exchange early. A
// server with no valid reply by the deadline gets STATUS_BAD_REPLY when an
// invalid reply came during the wait, STATUS_TIMEOUT otherwise. Payload rows
// are read in place (no private copy): a sender that rewrites a slot while it
// is read is caught by the sequence re-check (poll: the request is dropped
// and read again later; combine: that server's status becomes
// STATUS_BAD_REPLY, its rows' values are then undefined).
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "export.h"
#include "hidden_ffi_type.h"
#include "ibgda_post.cuh"
#include "ibgda_writer.h"
#include "nic_link.h"
#include "transport_common.h"
#include "wire_format.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_cuda_ipc_dispatch(XLA_FFI_CallFrame* call_frame);
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_cuda_ipc_combine(XLA_FFI_CallFrame* call_frame);
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_cuda_ipc_poll(XLA_FFI_CallFrame* call_frame);
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_cuda_ipc_reply(XLA_FFI_CallFrame* call_frame);
}  // extern "C"

namespace eaas {
namespace cuda_ipc {
namespace {

constexpr int kMaxEndpointIndex = 1024;  // endpoint indices a process can open
constexpr int kMaxSlots = 256;           // max_endpoints x num_channels per inbox
constexpr int kThreads = 256;            // threads of the multi-block kernels
constexpr int kWarps = kThreads / 32;
// Blocks (SMs) writing one message to a peer: one SM's stores over NVLink are
// far slower than the link (64 rows of 8 KB from 8 blocks: 10 us, ~50 GB/s).
constexpr int kMaxBlocksPerMessage = 64;
constexpr int kMaxCapacity = 8192;  // tokens per message: dispatch lists them in shared memory

// A request the last poll accepted (device memory).
struct Accepted {
  std::int32_t sender, channel, layer, first_row, num_tokens, valid;
  std::uint64_t ticket, seq;
};

// Coordination of the blocks of one fused kernel launch (device memory, all
// zero between launches). The block that draws ticket 0 leads: it runs by
// construction, so the others may wait for it whatever order the hardware
// starts blocks in (no co-residency assumption); `done` finds the last block,
// which resets the three for the next launch on the stream.
struct GridSync {
  std::uint32_t ticket, go, done;
};

// Poll bookkeeping (device memory).
struct PollInfo {
  std::int32_t num_accepted;   // entries of `accepted`
  std::int32_t rows;           // rows in use
  std::int32_t capacity;       // C of the poll
  std::int32_t start;          // slot the next sweep starts at (fairness)
  std::int32_t replied;        // 1 once reply answered the poll (or nothing to answer)
};

// Everything the kernels know about an endpoint; one per endpoint index.
struct View {
  std::uint8_t* inbox;          // [slots] own inbox
  std::uint8_t** peers;         // [max_endpoints] imported inboxes (null: not imported)
  std::int32_t* wanted;         // [max_endpoints] host-mapped: peers to import
  std::uint64_t* send_seq;      // [slots] last seq published per (peer, channel)
  std::uint64_t* last_seen;     // [slots] last seq consumed per inbox slot
  std::uint64_t* pending_ticket;  // [slots] per (peer, channel): awaited reply, 0 none
  std::int32_t* pending_tokens;   // [slots]
  std::int32_t* pending_layer;    // [slots]
  std::int32_t* row_of;           // [channels, max_endpoints, capacity]: row of token t
                                  //   in the message to servers[s], -1 none
  std::uint32_t* request_open;    // [slots] 1: the last request sent on (peer, channel) got no
                                  //   reply yet, so the server may still be reading it
  std::uint32_t* done;            // [max_endpoints + slots + 1] last-block counters
  std::uint32_t* abort;           // [max_endpoints + slots] a block could not write
  std::uint64_t* combine_seq;     // [max_endpoints] seq of the reply combine accepted
  Accepted* accepted;             // [slots]
  std::uint32_t* poll_bad;        // [slots] a row of accepted[m] named a foreign expert
  PollInfo* poll;
  GridSync* combine_sync;         // [num_channels]
  GridSync* poll_sync;
  unsigned long long* counters;   // [kNumCounters]
  // An ibgda endpoint (eaas_ibgda_gpu_open): messages are assembled in the
  // staging slot of (peer, channel) and posted to the peer's QP
  // (ibgda_post.cuh); `peers` is unused. nullptr: a cuda_ipc endpoint.
  ibgda::NicQueue* nic;           // [max_endpoints]
  std::uint8_t* staging;          // [max_endpoints x num_channels slots], mapped host memory
  std::uint64_t generation;  // of the open endpoint; 0: closed
  std::uint64_t deployment_id;
  std::uint64_t slot_bytes, hidden_offset, expert_ids_offset, gates_offset, scales_offset;
  std::int32_t endpoint, max_endpoints, num_channels, capacity, d, k, num_layers, num_experts;
  std::uint32_t hidden_dtype;
  std::uint32_t row_bytes;  // of a request row
};

__device__ View g_views[kMaxEndpointIndex];

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

__device__ __forceinline__ std::uint64_t GlobalTimerNs() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ std::uint64_t LoadAcquireSys(const std::uint64_t* p) {
  std::uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ std::uint64_t LoadRelaxedSys(const std::uint64_t* p) {
  std::uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void StoreRelaxedSys(std::uint64_t* p, std::uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ std::uint8_t* LoadPointer(std::uint8_t* const* p) {
  return reinterpret_cast<std::uint8_t*>(
      LoadRelaxedSys(reinterpret_cast<const std::uint64_t*>(p)));
}

// Release/acquire fences. fence.sc (what __threadfence_system() emits) is
// stronger than any ordering here needs and slower.
__device__ __forceinline__ void FenceSys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void FenceGpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ std::uint32_t LoadAcquireGpu(const std::uint32_t* p) {
  std::uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void StoreReleaseGpu(std::uint32_t* p, std::uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void Count(const View& v, Counter c, unsigned long long n = 1) {
  atomicAdd(&v.counters[c], n);
}

__device__ __forceinline__ std::uint8_t* Slot(const View& v, std::uint8_t* inbox, std::int64_t sender,
                                             std::int64_t channel) {
  return inbox + static_cast<std::size_t>(sender * v.num_channels + channel) * v.slot_bytes;
}

// Whether messages can go to peer p now: its inbox is imported (cuda_ipc),
// or its QP is ready and has not failed (ibgda).
__device__ bool PeerReachable(const View& v, std::int32_t p) {
  if (v.nic != nullptr) {
    const ibgda::NicQueue* q = v.nic + p;
    return ibgda::post::LoadVolatile(&q->ready) != 0 && ibgda::post::LoadVolatile(&q->failed) == 0;
  }
  return LoadPointer(v.peers + p) != nullptr;
}

// Where this endpoint's message to (p, channel) is written: its slot in p's
// imported inbox (cuda_ipc), or the staging slot of (p, channel) that the
// NIC gathers from (ibgda). nullptr when p cannot be sent to.
__device__ std::uint8_t* OutSlot(const View& v, std::int32_t p, int channel) {
  if (v.nic != nullptr) {
    return PeerReachable(v, p) ? v.staging + static_cast<std::size_t>(p * v.num_channels + channel) * v.slot_bytes
                               : nullptr;
  }
  std::uint8_t* peer = LoadPointer(v.peers + p);
  return peer == nullptr ? nullptr : Slot(v, peer, v.endpoint, channel);
}

// How long a block waits for a staging slot, or for send-queue room, before
// the peer counts as unavailable (as ibgda_writer.cc's kStageWait).
constexpr std::uint64_t kNicWaitNs = 20'000'000;

// Thread 0 of every block that writes rows of a message into `slot`
// (OutSlot(v, p, channel)), before they go in: cuda_ipc stores the seqlock's
// odd mark there when `odd_mark` (and fences); ibgda waits until the NIC is
// done with what was staged in the slot before (the odd mark then goes as
// the message's first WQE). false: this block must not write into the slot.
__device__ bool OpenMessage(const View& v, std::int32_t p, int channel, std::uint8_t* slot, std::uint64_t seq,
                            bool odd_mark) {
  if (v.nic != nullptr) {
    return ibgda::post::WaitForStagingSlot(v.nic + p, channel, GlobalTimerNs() + kNicWaitNs);
  }
  if (odd_mark) {
    StoreRelaxedSys(reinterpret_cast<std::uint64_t*>(slot), seq - 1);  // odd: being written
    FenceSys();
  }
  return true;
}

// The byte ranges of a slot that message `h` occupies past its sequence word
// (as ibgda_writer's MessageRanges on CPUs): the header with the used rows of
// the hidden array, then a request's expert ids, gates and float8 scales.
__device__ int MessageRanges(const View& v, const MessageHeader& h, ibgda::MessageRange* out) {
  const std::uint64_t n = h.num_tokens;
  const std::uint64_t row = h.kind == kKindRequest ? v.row_bytes : static_cast<std::uint64_t>(v.d) * sizeof(float);
  int count = 0;
  out[count++] = {sizeof(std::uint64_t), v.hidden_offset - sizeof(std::uint64_t) + n * row};
  if (h.kind == kKindRequest) {
    const std::uint64_t ids = n * static_cast<std::uint64_t>(v.k) * sizeof(std::int32_t);
    out[count++] = {v.expert_ids_offset, ids};
    out[count++] = {v.gates_offset, ids};
    if (h.hidden_dtype == kHiddenF8E4M3) out[count++] = {v.scales_offset, n * sizeof(float)};
  }
  return count;
}

// Makes a complete message visible to peer p: the even sequence word stored
// into its inbox (cuda_ipc), or the message posted to its QP (ibgda). false:
// the NIC would not take it (QP failed, peer gone, send queue full).
__device__ bool PublishMessage(const View& v, std::int32_t p, int channel, std::uint8_t* slot,
                               const MessageHeader& h) {
  if (v.nic == nullptr) {
    StoreRelaxedSys(reinterpret_cast<std::uint64_t*>(slot), h.seq);
    return true;
  }
  ibgda::NicQueue* q = v.nic + p;
  const std::uint64_t remote =
      q->remote_slots + v.slot_bytes * static_cast<std::uint64_t>(v.endpoint * v.num_channels + channel);
  ibgda::MessageRange ranges[4];
  const int count = MessageRanges(v, h, ranges);
  return ibgda::post::PostMessage(q, channel, remote, v.slot_bytes, ranges, count, h.seq,
                                  GlobalTimerNs() + kNicWaitNs);
}

// A private copy of a slot's header (relaxed system-scope loads).
__device__ MessageHeader ReadHeader(const std::uint8_t* slot) {
  MessageHeader h;
  auto* words = reinterpret_cast<std::uint64_t*>(&h);
  const auto* src = reinterpret_cast<const std::uint64_t*>(slot);
  for (int i = 0; i < 8; ++i) words[i] = LoadRelaxedSys(src + i);
  return h;
}

// Copies `bytes` from src to dst with the 32 lanes of a warp; 16-byte
// vectors when both are aligned. Loads bypass L1 (`src` may be written by a
// peer GPU between kernels).
__device__ __forceinline__ void WarpCopy(std::uint8_t* dst, const std::uint8_t* src, std::size_t bytes,
                                         int lane) {
  if ((bytes % 16) == 0 && (reinterpret_cast<std::uintptr_t>(dst) % 16) == 0 &&
      (reinterpret_cast<std::uintptr_t>(src) % 16) == 0) {
    auto* d4 = reinterpret_cast<int4*>(dst);
    const auto* s4 = reinterpret_cast<const int4*>(src);
    for (std::size_t i = lane; i < bytes / 16; i += 32) d4[i] = __ldcg(s4 + i);
  } else {
    for (std::size_t i = lane; i < bytes; i += 32) dst[i] = src[i];
  }
}

// Copies n rows of row_bytes from src (row src_rows[r], or r without
// src_rows) to dst, spread in 16-byte pieces over every thread of `parts`
// blocks (this one is `part`), so that a message's stores leave from many SMs.
// Loads bypass L1 (src may be written by a peer GPU between kernels).
__device__ void CopyRows(std::uint8_t* dst, const std::uint8_t* src, const std::int32_t* src_rows, int n,
                         std::uint32_t row_bytes, int part, int parts) {
  const bool vec = row_bytes % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0 &&
                   reinterpret_cast<std::uintptr_t>(src) % 16 == 0;
  const std::size_t unit = vec ? 16 : 1, per_row = row_bytes / unit;
  const std::size_t total = static_cast<std::size_t>(n) * per_row;
  for (std::size_t i = static_cast<std::size_t>(part) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::size_t>(parts) * blockDim.x) {
    const std::size_t r = i / per_row, c = i % per_row;
    const std::size_t from = src_rows == nullptr ? r : static_cast<std::size_t>(src_rows[r]);
    if (vec) {
      reinterpret_cast<int4*>(dst + r * row_bytes)[c] = __ldcg(reinterpret_cast<const int4*>(src + from * row_bytes) + c);
    } else {
      dst[r * row_bytes + c] = src[from * row_bytes + c];
    }
  }
}

// Publishes a message whose rows the blocks of this kernel (blockIdx.x over
// gridDim.x) wrote: called by thread 0 of every block after __syncthreads.
// Block 0 stores the header fields (all but seq) with its rows: a reader
// looks at a header only once seq changed, and when one may still be inside
// the slot the seqlock's odd mark went first. Every block then releases its
// stores (system scope) and counts itself; the last one acquires them all and
// publishes the message to peer p (PublishMessage), so a message costs two
// fences in a row on the critical path. Returns true in the one block that
// published and false elsewhere or when a block aborted or publishing failed
// (then `*aborted` is set in the last block).
__device__ bool FinishMessage(const View& v, std::size_t counter, std::uint8_t* slot, std::int32_t p, int channel,
                              MessageHeader h, bool* aborted) {
  auto* dst = reinterpret_cast<std::uint64_t*>(slot);
  if (blockIdx.x == 0 && slot != nullptr) {
    h.checksum = HeaderChecksum(h);
    const auto* words = reinterpret_cast<const std::uint64_t*>(&h);
    for (int i = 1; i < 8; ++i) StoreRelaxedSys(dst + i, words[i]);
  }
  FenceSys();  // release: this block's stores (the caller's barrier ordered its threads') before the counter
  const unsigned prev = atomicAdd(&v.done[counter], 1u);
  if (prev != gridDim.x - 1) return false;
  v.done[counter] = 0;
  *aborted = atomicExch(&v.abort[counter], 0u) != 0;
  if (*aborted) return false;
  FenceSys();  // acquire every block's stores (seen through the counter), release them before seq
  if (!PublishMessage(v, p, channel, slot, h)) {
    *aborted = true;
    return false;
  }
  return true;
}

__device__ MessageHeader NewHeader(const View& v, std::uint16_t kind, std::int32_t layer,
                                   std::int32_t channel, std::int32_t num_tokens, std::uint64_t seq,
                                   std::uint64_t ticket) {
  MessageHeader h{};
  h.seq = seq;
  h.deployment_id = v.deployment_id;
  h.ticket = ticket;
  h.kind = kind;
  h.hidden_dtype = static_cast<std::uint16_t>(kind == kKindRequest ? v.hidden_dtype : kHiddenF32);
  h.sender = static_cast<std::uint32_t>(v.endpoint);
  h.layer = static_cast<std::uint32_t>(layer);
  h.micro_batch = static_cast<std::uint32_t>(channel);
  h.num_tokens = static_cast<std::uint32_t>(num_tokens);
  return h;
}

// This block's ticket in a fused launch (0: the leader); every thread gets it.
__device__ int TakeTicket(GridSync* g) {
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = static_cast<int>(atomicAdd(&g->ticket, 1u));
  __syncthreads();
  return ticket;
}

// Leader: what its threads wrote so far becomes visible to the blocks
// returning from WaitForLeader.
__device__ void ReleaseFollowers(GridSync* g) {
  __syncthreads();
  if (threadIdx.x == 0) StoreReleaseGpu(&g->go, 1u);
}

__device__ void WaitForLeader(GridSync* g) {
  if (threadIdx.x == 0) {
    while (LoadAcquireGpu(&g->go) == 0) __nanosleep(32);
  }
  __syncthreads();
}

// Called by every block when its work is done. True in the last block, which
// then sees every block's writes and has reset `g` for the next launch.
__device__ bool LastBlock(GridSync* g) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    FenceGpu();
    last = atomicAdd(&g->done, 1u) == gridDim.x - 1;
    if (last) {
      FenceGpu();
      g->ticket = 0;
      g->go = 0;
      g->done = 0;
    }
  }
  __syncthreads();
  return last != 0;
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// grid (B, S): blocks (., s) send server s's tokens; dynamic shared memory
// holds the token list ([capacity] int32).
__global__ void DispatchKernel(int endpoint, std::uint64_t generation, const std::uint8_t* hidden, const float* scales,
                               const std::int32_t* expert_ids, const float* gates,
                               const std::int32_t* targets, const std::int32_t* servers, int T, int S,
                               int layer, int channel, std::int32_t* sent) {
  const View v = g_views[endpoint];
  if (v.generation != generation) {  // launched for a closed endpoint
    if (blockIdx.x == 0 && threadIdx.x == 0) sent[blockIdx.y] = -1;
    return;
  }
  extern __shared__ std::int32_t tokens[];
  __shared__ std::int32_t warp_counts[kWarps];
  __shared__ std::int32_t count;
  const int s = blockIdx.y, b = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int k = v.k;
  __shared__ int unrouted;
  const std::int32_t p = servers[s];
  if (b == 0 && s == 0) {  // targets naming no server of `servers` (counted once per call)
    if (threadIdx.x == 0) unrouted = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < T * k; i += kThreads) {
      if (targets[i] == -1) continue;
      bool found = false;
      for (int j = 0; j < S; ++j) found |= servers[j] == targets[i];
      if (!found) unrouted = 1;
    }
    __syncthreads();
    if (threadIdx.x == 0 && unrouted) Count(v, kUnroutedTargets);
  }
  if (p == -1) {
    if (b == 0 && threadIdx.x == 0) sent[s] = 0;
    return;
  }
  const bool known = p >= 0 && p < v.max_endpoints;
  // The tokens for p, in increasing order (every block computes the list).
  std::int32_t* row_of = v.row_of + (static_cast<std::size_t>(channel) * v.max_endpoints + s) * v.capacity;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  for (int base = 0; base < T; base += kThreads) {
    const int t = base + threadIdx.x;
    bool mine = false;
    if (t < T) {
      for (int j = 0; j < k; ++j) mine |= targets[t * k + j] == p;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = count;
    for (int w = 0; w < warp; ++w) offset += warp_counts[w];
    const int rank = offset + __popc(ballot & ((1u << lane) - 1u));
    if (mine) tokens[rank] = t;
    if (b == 0 && t < T) row_of[t] = mine ? rank : -1;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < kWarps; ++w) count += warp_counts[w];
    }
    __syncthreads();
  }
  const int n = count;
  const std::size_t si = known ? static_cast<std::size_t>(p) * v.num_channels + channel : 0;
  if (n == 0 || !known) {
    // A server sent nothing keeps what it owes on this channel: a probe of a
    // server no step routes to (runtime/admission.py) outlives the steps.
    if (b == 0 && threadIdx.x == 0) {
      sent[s] = n == 0 ? 0 : -1;
      if (!known) Count(v, kPeerRefused);
    }
    return;
  }
  const std::uint64_t seq = v.send_seq[si] + 2;
  // Thread 0 decides where the block writes, for all its threads: the peer
  // may become unreachable meanwhile (OutSlot would then say nullptr to a
  // later warp).
  __shared__ std::uint8_t* block_slot;
  if (threadIdx.x == 0) {
    // cuda_ipc: the seqlock's odd mark (a system-scope fence on the critical
    // path) only when the server may still be reading the previous request
    // of this slot: it has not answered it (this client gave up waiting).
    // Once answered, the server's poll has committed it and never reads that
    // slot's rows or header again until the sequence number changes.
    block_slot = OutSlot(v, p, channel);
    if (block_slot != nullptr && !OpenMessage(v, p, channel, block_slot, seq, v.request_open[si] != 0)) {
      block_slot = nullptr;
    }
    if (block_slot == nullptr) atomicOr(&v.abort[s], 1u);
  }
  __syncthreads();
  std::uint8_t* const slot = block_slot;
  if (slot != nullptr) {
    auto* dst_ids = reinterpret_cast<std::int32_t*>(slot + v.expert_ids_offset);
    auto* dst_gates = reinterpret_cast<float*>(slot + v.gates_offset);
    auto* dst_scales = reinterpret_cast<float*>(slot + v.scales_offset);
    CopyRows(slot + v.hidden_offset, hidden, tokens, n, v.row_bytes, b, gridDim.x);
    for (int r = b * kThreads + threadIdx.x; r < n; r += gridDim.x * kThreads) {
      const int t = tokens[r];
      for (int j = 0; j < k; ++j) {
        const bool to_p = targets[t * k + j] == p;
        dst_ids[r * k + j] = to_p ? expert_ids[t * k + j] : -1;
        dst_gates[r * k + j] = to_p ? gates[t * k + j] : 0.0f;
      }
      dst_scales[r] = scales[t];
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  bool aborted = false;
  const MessageHeader h = NewHeader(v, kKindRequest, layer, channel, n, seq, seq);
  if (FinishMessage(v, s, slot, p, channel, h, &aborted)) {
    v.send_seq[si] = seq;
    v.request_open[si] = 1;
    v.pending_ticket[si] = seq;
    v.pending_tokens[si] = n;
    v.pending_layer[si] = layer;
    sent[s] = n;
    Count(v, kRequestsSent);
  } else if (aborted) {
    v.wanted[p] = 1;
    v.pending_ticket[si] = 0;
    sent[s] = -1;
    Count(v, kPeerUnavailable);
  }
}

// What combine makes of a reply published in a server's slot.
enum class ReplyVerdict {
  kTorn,     // rewritten while read: not seen, look again
  kStale,    // valid, for another ticket (an earlier request): skipped
  kInvalid,  // failed validation: counted and skipped
  kAwaited,  // valid, the awaited ticket, layer and token count
};

// Judges the reply published with sequence number `s1` in `slot` (server p's,
// this channel) on a private copy of its header, against the awaited
// `ticket`, `layer` and token count `n`; sets `*drop` to the counter of the
// failed check when kInvalid.
__device__ ReplyVerdict JudgeReply(const View& v, const std::uint8_t* slot, std::uint64_t s1, std::int32_t p,
                                   int channel, std::uint64_t ticket, int layer, int n, Counter* drop) {
  const auto* seq_ptr = reinterpret_cast<const std::uint64_t*>(slot);
  const MessageHeader h = ReadHeader(slot);
  Counter bad = h.seq != s1 ? kTornReads
                            : CheckMessageHeader(h, v.deployment_id, v.capacity, v.num_layers, v.hidden_dtype,
                                                 kKindReply, p, channel);
  bool stale = false;
  if (bad == kNumCounters) {
    if (h.ticket != ticket) {
      stale = true;
    } else if (h.layer != static_cast<std::uint32_t>(layer)) {
      bad = kDropLayer;
    } else if (h.num_tokens != static_cast<std::uint32_t>(n)) {
      bad = kDropReplySize;
    }
  }
  FenceSys();  // the header loads above come before the re-check of seq (seqlock)
  if (bad == kTornReads || LoadRelaxedSys(seq_ptr) != s1) return ReplyVerdict::kTorn;
  if (stale) return ReplyVerdict::kStale;
  *drop = bad;
  return bad == kNumCounters ? ReplyVerdict::kAwaited : ReplyVerdict::kInvalid;
}

// Waits until `deadline` for server p's reply to `ticket` (layer, n tokens)
// in slot `si` of this endpoint's inbox (server index s of the call).
// Invalid replies are counted and skipped like stale ones, and the wait goes
// on: a peer spamming malformed replies into the slot cannot fail the
// exchange before the real reply or the deadline. Returns kStatusOk (the
// reply's seq then in v.combine_seq[s]) or, at the deadline, kStatusBadReply
// when an invalid reply came meanwhile, else kStatusTimeout. The deadline is
// checked after every message too, so that nothing a peer publishes keeps
// the wait going past it.
__device__ std::int32_t WaitForReply(const View& v, int s, std::int32_t p, int channel, std::size_t si,
                                     std::uint64_t ticket, int layer, int n, std::uint64_t deadline) {
  const std::uint8_t* slot = Slot(v, v.inbox, p, channel);
  const auto* seq_ptr = reinterpret_cast<const std::uint64_t*>(slot);
  bool saw_invalid = false;
  for (;;) {
    const std::uint64_t s1 = LoadAcquireSys(seq_ptr);
    const bool fresh = s1 != 0 && (s1 & 1) == 0 && s1 != v.last_seen[si];
    if (fresh) {
      Counter drop = kNumCounters;
      const ReplyVerdict verdict = JudgeReply(v, slot, s1, p, channel, ticket, layer, n, &drop);
      if (verdict == ReplyVerdict::kTorn) {
        Count(v, kTornReads);
      } else {
        v.last_seen[si] = s1;
        if (verdict == ReplyVerdict::kAwaited) {
          v.combine_seq[s] = s1;
          v.request_open[si] = 0;  // answered: the server is done reading it
          Count(v, kRepliesAccepted);
          return kStatusOk;
        }
        if (verdict == ReplyVerdict::kStale) {
          Count(v, kStaleReplies);
        } else {
          Count(v, drop);
          saw_invalid = true;
        }
      }
    }
    if (GlobalTimerNs() > deadline) {
      Count(v, kTimeouts);
      return saw_invalid ? kStatusBadReply : kStatusTimeout;
    }
    if (!fresh) __nanosleep(64);
  }
}

// Combine's leader block: warp w waits for servers w, w + kWarps, ... (lane 0)
// and writes their status.
__device__ void WaitForReplies(const View& v, const std::int32_t* sent, const std::int32_t* servers, int S,
                               int layer, int channel, std::int64_t timeout_ns, std::int32_t* status,
                               std::int32_t* waited_us) {
  __shared__ std::uint64_t started;
  if (threadIdx.x == 0) started = GlobalTimerNs();
  __syncthreads();
  const std::uint64_t deadline = started + static_cast<std::uint64_t>(timeout_ns);
  if (threadIdx.x % 32 != 0) return;
  for (int s = threadIdx.x / 32; s < S; s += blockDim.x / 32) {
    const std::int32_t p = servers[s], n = sent[s];
    waited_us[s] = 0;
    if (p == -1 || n == 0) {
      status[s] = kStatusNothingSent;
      continue;
    }
    if (n < 0 || p < 0 || p >= v.max_endpoints) {
      status[s] = kStatusUnavailable;
      continue;
    }
    const std::size_t si = static_cast<std::size_t>(p) * v.num_channels + channel;
    const std::uint64_t ticket = v.pending_ticket[si];
    if (ticket == 0 || v.pending_tokens[si] != n || v.pending_layer[si] != layer) {
      status[s] = kStatusBadReply;  // no matching dispatch outstanding (misuse)
      Count(v, kUnmatchedCombines);
      continue;
    }
    v.pending_ticket[si] = 0;  // consumed: a late reply to it is stale
    status[s] = WaitForReply(v, s, p, channel, si, ticket, layer, n, deadline);
    waited_us[s] = static_cast<std::int32_t>(min((GlobalTimerNs() - started) / 1000, std::uint64_t{INT32_MAX}));
  }
}

// This block's share (`part` of gridDim.x) of out[t] = sum over servers s (in
// order) with status OK of their reply row for t; then re-checks that no
// accepted reply was rewritten meanwhile.
__device__ void SumReplies(const View& v, const std::int32_t* servers, int S, int T, int channel, int part,
                           std::int32_t* status, float* out) {
  const int d = v.d;
  const std::int32_t* row_of = v.row_of + static_cast<std::size_t>(channel) * v.max_endpoints * v.capacity;
  const bool vec = d % 4 == 0;
  const std::int64_t width = vec ? d / 4 : d;
  const std::int64_t total = static_cast<std::int64_t>(T) * width;
  for (std::int64_t i = part * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / width, c = i % width;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < S; ++s) {
      if (status[s] != kStatusOk) continue;
      const int r = row_of[static_cast<std::size_t>(s) * v.capacity + t];
      if (r < 0) continue;
      const auto* rows = reinterpret_cast<const float*>(Slot(v, v.inbox, servers[s], channel) +
                                                        v.hidden_offset);
      if (vec) {
        const float4 x = __ldcg(reinterpret_cast<const float4*>(rows + static_cast<std::int64_t>(r) * d) + c);
        acc.x += x.x;
        acc.y += x.y;
        acc.z += x.z;
        acc.w += x.w;
      } else {
        acc.x += __ldcg(rows + static_cast<std::int64_t>(r) * d + c);
      }
    }
    if (vec) {
      reinterpret_cast<float4*>(out + t * d)[c] = acc;
    } else {
      out[t * d + c] = acc.x;
    }
  }
  __syncthreads();
  if (threadIdx.x < S && status[threadIdx.x] == kStatusOk) {
    const int s = threadIdx.x;
    const auto* seq_ptr = reinterpret_cast<const std::uint64_t*>(Slot(v, v.inbox, servers[s], channel));
    if (LoadRelaxedSys(seq_ptr) != v.combine_seq[s] &&
        atomicCAS(status + s, kStatusOk, kStatusBadReply) == kStatusOk) {
      Count(v, kTornReads);
    }
  }
}

// Combine in one launch (no kernel boundary between the wait and the sum):
// the leader waits for the replies, then every block sums its share.
__global__ void CombineKernel(int endpoint, std::uint64_t generation, const std::int32_t* sent,
                              const std::int32_t* servers, int S, int T, int layer, int channel,
                              const std::int32_t* timeout_us, std::int32_t* status, std::int32_t* waited_us,
                              float* out) {
  const View v = g_views[endpoint];
  if (v.generation != generation) {  // launched for a closed endpoint
    if (blockIdx.x == 0) {
      for (int s = threadIdx.x; s < S; s += blockDim.x) {
        status[s] = kStatusUnavailable;
        waited_us[s] = 0;
      }
    }
    return;
  }
  GridSync* sync = v.combine_sync + channel;
  const int ticket = TakeTicket(sync);
  if (ticket == 0) {
    // The deadline is an operand (the client adapts it between steps); negative reads as 0.
    const std::int64_t timeout_ns = std::int64_t{max(*timeout_us, 0)} * 1000;
    WaitForReplies(v, sent, servers, S, layer, channel, timeout_ns, status, waited_us);
    ReleaseFollowers(sync);
  } else {
    WaitForLeader(sync);
  }
  SumReplies(v, servers, S, T, channel, ticket, status, out);
  LastBlock(sync);
}

// Poll's leader, first warp: wait until at least one valid request from an
// imported sender has arrived (or the deadline), then accept requests in slot
// order from poll->start while they fit in C rows and max_messages.
__device__ void AcceptRequests(const View& v, int C, int max_messages, std::int64_t timeout_ns,
                               std::int32_t* num_rows) {
  __shared__ std::uint64_t cand_seq[kMaxSlots];  // 0: no candidate in that slot
  __shared__ MessageHeader cand[kMaxSlots];
  const int lane = threadIdx.x;
  const int nslots = v.max_endpoints * v.num_channels;
  const std::uint64_t deadline = GlobalTimerNs() + static_cast<std::uint64_t>(timeout_ns);
  PollInfo* info = v.poll;
  if (lane == 0 && info->replied == 0 && info->num_accepted > 0) {
    Count(v, kUnreplied, info->num_accepted);
  }
  const int start = info->start;
  int accepted = 0, used = 0, first_deferred = -1;
  for (;;) {
    for (int si = lane; si < nslots; si += 32) {
      cand_seq[si] = 0;
      const std::uint8_t* slot = v.inbox + static_cast<std::size_t>(si) * v.slot_bytes;
      const auto* seq_ptr = reinterpret_cast<const std::uint64_t*>(slot);
      const std::uint64_t s1 = LoadAcquireSys(seq_ptr);
      if (s1 == 0 || (s1 & 1) || s1 == v.last_seen[si]) continue;
      const int sender = si / v.num_channels, channel = si % v.num_channels;
      const MessageHeader h = ReadHeader(slot);
      const Counter bad = h.seq != s1 ? kTornReads
                                      : CheckMessageHeader(h, v.deployment_id, v.capacity, v.num_layers,
                                                           v.hidden_dtype, kKindRequest, sender, channel);
      FenceSys();
      if (bad == kTornReads || LoadRelaxedSys(seq_ptr) != s1) {
        Count(v, kTornReads);
        continue;
      }
      if (bad != kNumCounters) {
        v.last_seen[si] = s1;
        Count(v, bad);
        continue;
      }
      if (!PeerReachable(v, sender)) {  // cannot answer it yet
        v.wanted[sender] = 1;
        continue;
      }
      cand[si] = h;
      cand_seq[si] = s1;
    }
    __syncwarp();
    if (lane == 0) {
      first_deferred = -1;
      for (int j = 0; j < nslots; ++j) {
        const int si = (start + j) % nslots;
        if (cand_seq[si] == 0) continue;
        const MessageHeader& h = cand[si];
        const int n = static_cast<int>(h.num_tokens);
        if (accepted >= max_messages || used + n > C) {
          Count(v, kDeferred);
          if (first_deferred < 0) first_deferred = si;
          continue;
        }
        v.accepted[accepted] = Accepted{si / v.num_channels, si % v.num_channels,
                                        static_cast<std::int32_t>(h.layer), used, n, 1, h.ticket,
                                        cand_seq[si]};
        ++accepted;
        used += n;
      }
    }
    // Lane 0 decides for the warp (the lanes' clocks may straddle the deadline).
    const int stop = __shfl_sync(0xffffffffu, accepted > 0 || GlobalTimerNs() > deadline ? 1 : 0, 0);
    if (stop) break;
    __nanosleep(64);
  }
  if (lane == 0) {
    info->num_accepted = accepted;
    info->rows = used;
    info->capacity = C;
    info->start = first_deferred >= 0 ? first_deferred : (start + 1) % nslots;
    info->replied = accepted == 0;
    *num_rows = used;
  }
}

// This block's share (`part` of gridDim.x) of copying the accepted requests'
// rows into the outputs (rows past the last one: padding) and checking their
// expert ids against `hosted`.
__device__ void CopyRequests(const View& v, const std::int32_t* hosted, int C, int part, std::uint8_t* out_hidden,
                             float* out_scales, std::int32_t* out_ids, float* out_gates, std::int32_t* out_layer) {
  const int lane = threadIdx.x % 32, k = v.k;
  const int M = v.poll->num_accepted;
  for (int r = part * kWarps + threadIdx.x / 32; r < C; r += gridDim.x * kWarps) {
    int m = 0;
    while (m < M && !(r >= v.accepted[m].first_row && r < v.accepted[m].first_row + v.accepted[m].num_tokens)) ++m;
    std::uint8_t* dst = out_hidden + static_cast<std::size_t>(r) * v.row_bytes;
    if (m == M) {  // padding
      if (v.row_bytes % 16 == 0) {
        for (std::size_t i = lane; i < v.row_bytes / 16; i += 32) reinterpret_cast<int4*>(dst)[i] = int4{0, 0, 0, 0};
      } else {
        for (std::size_t i = lane; i < v.row_bytes; i += 32) dst[i] = 0;
      }
      for (int j = lane; j < k; j += 32) {
        out_ids[r * k + j] = -1;
        out_gates[r * k + j] = 0.0f;
      }
      if (lane == 0) {
        out_scales[r] = 1.0f;
        out_layer[r] = -1;
      }
      continue;
    }
    const Accepted a = v.accepted[m];
    const int rr = r - a.first_row;
    const std::uint8_t* slot = Slot(v, v.inbox, a.sender, a.channel);
    WarpCopy(dst, slot + v.hidden_offset + static_cast<std::size_t>(rr) * v.row_bytes, v.row_bytes, lane);
    const auto* ids = reinterpret_cast<const std::int32_t*>(slot + v.expert_ids_offset);
    const auto* gts = reinterpret_cast<const float*>(slot + v.gates_offset);
    bool bad = false;
    for (int j = lane; j < k; j += 32) {
      const std::int32_t e = __ldcg(ids + rr * k + j);
      out_ids[r * k + j] = e;
      out_gates[r * k + j] = e == -1 ? 0.0f : __ldcg(gts + rr * k + j);
      if (e != -1 && (e < 0 || e >= v.num_experts || hosted[a.layer * v.num_experts + e] == 0)) bad = true;
    }
    if (bad) atomicOr(&v.poll_bad[m], 1u);
    if (lane == 0) {
      out_scales[r] = v.hidden_dtype == kHiddenF8E4M3
                          ? __ldcg(reinterpret_cast<const float*>(slot + v.scales_offset) + rr)
                          : 1.0f;
      out_layer[r] = a.layer;
    }
  }
}

// Commits the poll (the last block, once every row is copied): a request
// rewritten while copied (torn) is dropped and stays unseen (read again by
// the next poll); one naming a foreign expert is dropped and counted. Dropped
// requests' rows become inert (expert -1, gate 0, layer -1) and get no reply.
__device__ void CommitPoll(const View& v, std::int32_t* out_ids, float* out_gates, std::int32_t* out_layer) {
  __shared__ int drop;
  const int k = v.k, M = v.poll->num_accepted;
  for (int m = 0; m < M; ++m) {
    Accepted& a = v.accepted[m];
    if (threadIdx.x == 0) {
      const auto* seq_ptr = reinterpret_cast<const std::uint64_t*>(Slot(v, v.inbox, a.sender, a.channel));
      const bool torn = LoadRelaxedSys(seq_ptr) != a.seq;
      const bool bad = atomicExch(&v.poll_bad[m], 0u) != 0;
      const std::size_t si = static_cast<std::size_t>(a.sender) * v.num_channels + a.channel;
      if (torn) {
        Count(v, kTornReads);
      } else {
        v.last_seen[si] = a.seq;
        Count(v, bad ? kDropExpert : kRequestsAccepted);
      }
      drop = torn || bad;
      if (drop) a.valid = 0;
    }
    __syncthreads();
    if (drop) {
      for (int i = threadIdx.x; i < a.num_tokens * k; i += blockDim.x) {
        out_ids[a.first_row * k + i] = -1;
        out_gates[a.first_row * k + i] = 0.0f;
      }
      for (int i = threadIdx.x; i < a.num_tokens; i += blockDim.x) out_layer[a.first_row + i] = -1;
    }
    __syncthreads();
  }
}

// Poll in one launch (no kernel boundary between accepting and copying): the
// leader's first warp accepts, then every block copies its share of the rows
// and the last one commits.
__global__ void PollKernel(int endpoint, std::uint64_t generation, const std::int32_t* hosted, int C,
                           int max_messages, std::int64_t timeout_ns, std::uint8_t* out_hidden, float* out_scales,
                           std::int32_t* out_ids, float* out_gates, std::int32_t* out_layer,
                           std::int32_t* num_rows) {
  const View v = g_views[endpoint];
  if (v.generation != generation) {  // launched for a closed endpoint: nothing polled
    if (blockIdx.x == 0 && threadIdx.x == 0) *num_rows = 0;
    return;
  }
  GridSync* sync = v.poll_sync;
  const int ticket = TakeTicket(sync);
  if (ticket == 0) {
    if (threadIdx.x < 32) AcceptRequests(v, C, max_messages, timeout_ns, num_rows);
    ReleaseFollowers(sync);
  } else {
    WaitForLeader(sync);
  }
  CopyRequests(v, hosted, C, ticket, out_hidden, out_scales, out_ids, out_gates, out_layer);
  if (LastBlock(sync)) CommitPoll(v, out_ids, out_gates, out_layer);
}

// grid (B, slots): blocks (., m) answer accepted request m; the last block of
// the grid marks the poll answered (a second reply sends nothing).
__global__ void ReplyKernel(int endpoint, std::uint64_t generation, const float* results, std::int32_t* replies) {
  const View v = g_views[endpoint];
  if (v.generation != generation) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *replies = 0;
    return;
  }
  const PollInfo info = *v.poll;
  const int m = blockIdx.y, b = blockIdx.x;
  if (b == 0 && m == 0 && threadIdx.x == 0) {
    int valid = 0;
    for (int i = 0; i < info.num_accepted; ++i) valid += v.accepted[i].valid;
    *replies = info.replied ? 0 : valid;
  }
  if (!info.replied && m < info.num_accepted && v.accepted[m].valid) {
    const Accepted a = v.accepted[m];
    const std::size_t si = static_cast<std::size_t>(a.sender) * v.num_channels + a.channel;
    const std::size_t counter = static_cast<std::size_t>(v.max_endpoints) + si;
    const std::uint64_t seq = v.send_seq[si] + 2;
    const std::size_t row = static_cast<std::size_t>(v.d) * sizeof(float);
    __shared__ std::uint8_t* block_slot;  // thread 0's decision, for every thread (as in DispatchKernel)
    if (threadIdx.x == 0) {  // always the odd mark: a late reply may still be read (wire_format.h)
      block_slot = OutSlot(v, a.sender, a.channel);
      if (block_slot != nullptr && !OpenMessage(v, a.sender, a.channel, block_slot, seq, true)) {
        block_slot = nullptr;
      }
      if (block_slot == nullptr) atomicOr(&v.abort[counter], 1u);
    }
    __syncthreads();
    std::uint8_t* const slot = block_slot;
    if (slot != nullptr) {
      CopyRows(slot + v.hidden_offset,
               reinterpret_cast<const std::uint8_t*>(results + static_cast<std::size_t>(a.first_row) * v.d),
               nullptr, a.num_tokens, static_cast<std::uint32_t>(row), b, gridDim.x);
    }
    __syncthreads();
    bool aborted = false;
    const MessageHeader h = NewHeader(v, kKindReply, a.layer, a.channel, a.num_tokens, seq, a.ticket);
    if (threadIdx.x == 0 && FinishMessage(v, counter, slot, a.sender, a.channel, h, &aborted)) {
      v.send_seq[si] = seq;
      Count(v, kRepliesSent);
    } else if (threadIdx.x == 0 && aborted) {
      v.wanted[a.sender] = 1;
      Count(v, kPeerUnavailable);
    }
  }
  if (threadIdx.x == 0) {  // every block has read `info`: the last one may change it
    FenceGpu();
    const std::size_t grid = static_cast<std::size_t>(v.max_endpoints) + v.max_endpoints * v.num_channels;
    if (atomicAdd(&v.done[grid], 1u) == gridDim.x * gridDim.y - 1) {
      v.done[grid] = 0;
      v.poll->replied = 1;
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: open endpoints
// ---------------------------------------------------------------------------

using Geometry = EndpointGeometry;

struct Endpoint {
  Geometry geo;
  int device = 0;
  View view{};             // host copy of g_views[endpoint]
  void* state = nullptr;   // one device allocation for every array of `view` but
                           // the inbox and `wanted`
  std::int32_t* wanted_host = nullptr;  // cudaHostAlloc'ed (mapped)
  cudaStream_t control = nullptr;       // for the control path's copies
  std::atomic<std::int64_t> poll_rows{-1};  // C of the last poll enqueued (reply checks it)
  std::mutex control_mu;                // the control path's calls (imports, counters)
  std::map<std::int64_t, void*> imported;  // peer -> cudaIpcOpenMemHandle pointer
  std::vector<void*> retired;  // replaced imports, closed with the endpoint (a
                               // kernel may still be writing through them)
  // An ibgda endpoint (eaas_ibgda_gpu_open): its inbox is host memory the
  // NIC writes into (mapped into the GPU), and `writer` owns the NIC, its
  // QPs and the staging area. Everything of it the GPU reads or writes is
  // registered with CUDA (`registered`, unregistered before it goes).
  std::unique_ptr<ibgda::NicWriter> writer;
  std::uint8_t* host_inbox = nullptr;
  std::size_t host_inbox_bytes = 0;
  std::uint64_t* doorbells = nullptr;  // one word per peer QP: its BlueFlame register, modelled
  std::size_t doorbells_bytes = 0;
  std::uint64_t* doorbells_device = nullptr;
  std::vector<std::uint8_t*> queues_device;  // per peer: its QP's queue segment, as the GPU sees it
  std::vector<void*> registered;
};

// The open endpoints. g_mu guards the map only: nobody holds it while calling
// CUDA, so a handler's launch that blocks (a full launch queue behind a
// spinning kernel) never stalls the control path that would unblock it.
std::mutex g_mu;
std::map<std::int64_t, std::shared_ptr<Endpoint>>& Endpoints() {
  static auto* m = new std::map<std::int64_t, std::shared_ptr<Endpoint>>();
  return *m;
}
std::uint64_t g_last_generation = 0;  // guarded by g_mu

std::string CudaText(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

void WriteView(std::int64_t index, const View& view, cudaStream_t stream) {
  cudaMemcpyToSymbolAsync(g_views, &view, sizeof(View), static_cast<std::size_t>(index) * sizeof(View),
                          cudaMemcpyHostToDevice, stream);
  cudaStreamSynchronize(stream);
}

void Release(Endpoint* ep) {
  for (auto& kv : ep->imported) cudaIpcCloseMemHandle(kv.second);
  for (void* p : ep->retired) cudaIpcCloseMemHandle(p);
  for (void* p : ep->registered) cudaHostUnregister(p);
  ep->writer.reset();  // stops the NIC (it writes into the inbox), frees its queues and staging area
  if (ep->host_inbox) munmap(ep->host_inbox, ep->host_inbox_bytes);
  if (ep->doorbells) munmap(ep->doorbells, ep->doorbells_bytes);
  if (ep->view.inbox && ep->host_inbox == nullptr) cudaFree(ep->view.inbox);
  if (ep->state) cudaFree(ep->state);
  if (ep->view.nic) cudaFree(ep->view.nic);
  if (ep->wanted_host) cudaFreeHost(ep->wanted_host);
  if (ep->control) cudaStreamDestroy(ep->control);
}

// Host memory the GPU reaches: page-aligned, registered with CUDA (recorded
// in ep->registered). Its device address into *device_ptr. "" or an error.
std::string MapIntoGpu(Endpoint* ep, void* host, std::size_t bytes, void** device_ptr) {
  cudaError_t e = cudaHostRegister(host, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (e != cudaSuccess) return "cudaHostRegister(" + std::to_string(bytes) + " bytes): " + CudaText(e);
  ep->registered.push_back(host);
  if ((e = cudaHostGetDevicePointer(device_ptr, host, 0)) != cudaSuccess) {
    return "cudaHostGetDevicePointer: " + CudaText(e);
  }
  return "";
}

// Anonymous page-aligned host memory, zeroed; nullptr when there is none.
std::uint8_t* MapPages(std::size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<std::uint8_t*>(p);
}

// Allocates and initialises an endpoint's memory: its inbox in device memory
// (`handle`: its IPC handle), or with `handle` null in host memory mapped
// into the GPU (an ibgda endpoint: the NIC writes there). Not yet visible
// to the kernels (WriteView). "" or an error.
std::string Create(std::int64_t index, const Geometry& geo, int device, Endpoint* ep,
                   cudaIpcMemHandle_t* handle) {
  ep->geo = geo;
  ep->device = device;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return "cudaSetDevice(" + std::to_string(device) + "): " + CudaText(e);
  const SlotLayout layout = geo.Slot();
  const std::size_t slots = geo.NumSlots();
  const std::size_t E = static_cast<std::size_t>(geo.max_endpoints);
  // Carve the state arrays out of one allocation (8-byte aligned pieces).
  std::size_t offset = 0;
  auto take = [&offset](std::size_t bytes) {
    const std::size_t at = offset;
    offset = AlignUp(offset + bytes, 64);
    return at;
  };
  const std::size_t o_peers = take(E * sizeof(void*));
  const std::size_t o_send = take(slots * 8), o_seen = take(slots * 8), o_ticket = take(slots * 8);
  const std::size_t o_tokens = take(slots * 4), o_layer = take(slots * 4);
  const std::size_t o_rows = take(static_cast<std::size_t>(geo.num_channels) * E * geo.capacity * 4);
  // done: [E] dispatch per server, [slots] reply per message, then the reply
  // grid's counter.
  const std::size_t o_done = take((E + slots + 1) * 4), o_abort = take((E + slots) * 4);
  const std::size_t o_open = take(slots * 4);
  const std::size_t o_csync = take(static_cast<std::size_t>(geo.num_channels) * sizeof(GridSync));
  const std::size_t o_psync = take(sizeof(GridSync));
  const std::size_t o_cseq = take(E * 8), o_acc = take(slots * sizeof(Accepted));
  const std::size_t o_bad = take(slots * 4), o_poll = take(sizeof(PollInfo));
  const std::size_t o_counters = take(kNumCounters * sizeof(unsigned long long));
  const std::size_t state_bytes = offset;
  if (handle == nullptr) {
    ep->host_inbox_bytes = AlignUp(slots * layout.bytes, 4096);
    ep->host_inbox = MapPages(ep->host_inbox_bytes);
    if (ep->host_inbox == nullptr) return "allocating the inbox (" + std::to_string(ep->host_inbox_bytes) + " bytes)";
    const std::string failed = MapIntoGpu(ep, ep->host_inbox, ep->host_inbox_bytes,
                                          reinterpret_cast<void**>(&ep->view.inbox));
    if (!failed.empty()) return "mapping the inbox into the GPU: " + failed;
  }
  if ((e = cudaStreamCreateWithFlags(&ep->control, cudaStreamNonBlocking)) != cudaSuccess ||
      (handle != nullptr && (e = cudaMalloc(&ep->view.inbox, slots * layout.bytes)) != cudaSuccess) ||
      (e = cudaMalloc(&ep->state, state_bytes)) != cudaSuccess ||
      (e = cudaHostAlloc(reinterpret_cast<void**>(&ep->wanted_host), E * 4, cudaHostAllocMapped)) != cudaSuccess) {
    return "allocating the endpoint's GPU memory (" + std::to_string(slots * layout.bytes + state_bytes) +
           " bytes on device " + std::to_string(device) + "): " + CudaText(e);
  }
  std::memset(ep->wanted_host, 0, E * 4);
  if (handle != nullptr) cudaMemsetAsync(ep->view.inbox, 0, slots * layout.bytes, ep->control);
  cudaMemsetAsync(ep->state, 0, state_bytes, ep->control);
  auto* base = static_cast<std::uint8_t*>(ep->state);
  View& v = ep->view;
  v.peers = reinterpret_cast<std::uint8_t**>(base + o_peers);
  if ((e = cudaHostGetDevicePointer(reinterpret_cast<void**>(&v.wanted), ep->wanted_host, 0)) != cudaSuccess) {
    return "cudaHostGetDevicePointer: " + CudaText(e);
  }
  v.send_seq = reinterpret_cast<std::uint64_t*>(base + o_send);
  v.last_seen = reinterpret_cast<std::uint64_t*>(base + o_seen);
  v.pending_ticket = reinterpret_cast<std::uint64_t*>(base + o_ticket);
  v.pending_tokens = reinterpret_cast<std::int32_t*>(base + o_tokens);
  v.pending_layer = reinterpret_cast<std::int32_t*>(base + o_layer);
  v.row_of = reinterpret_cast<std::int32_t*>(base + o_rows);
  v.request_open = reinterpret_cast<std::uint32_t*>(base + o_open);
  v.done = reinterpret_cast<std::uint32_t*>(base + o_done);
  v.abort = reinterpret_cast<std::uint32_t*>(base + o_abort);
  v.combine_seq = reinterpret_cast<std::uint64_t*>(base + o_cseq);
  v.accepted = reinterpret_cast<Accepted*>(base + o_acc);
  v.poll_bad = reinterpret_cast<std::uint32_t*>(base + o_bad);
  v.poll = reinterpret_cast<PollInfo*>(base + o_poll);
  v.combine_sync = reinterpret_cast<GridSync*>(base + o_csync);
  v.poll_sync = reinterpret_cast<GridSync*>(base + o_psync);
  v.counters = reinterpret_cast<unsigned long long*>(base + o_counters);
  v.generation = ++g_last_generation;
  v.deployment_id = geo.deployment_id;
  v.slot_bytes = layout.bytes;
  v.hidden_offset = layout.hidden_offset;
  v.expert_ids_offset = layout.expert_ids_offset;
  v.gates_offset = layout.gates_offset;
  v.scales_offset = layout.scales_offset;
  v.endpoint = static_cast<std::int32_t>(index);
  v.max_endpoints = static_cast<std::int32_t>(geo.max_endpoints);
  v.num_channels = static_cast<std::int32_t>(geo.num_channels);
  v.capacity = static_cast<std::int32_t>(geo.capacity);
  v.d = static_cast<std::int32_t>(geo.d);
  v.k = static_cast<std::int32_t>(geo.k);
  v.num_layers = static_cast<std::int32_t>(geo.num_layers);
  v.num_experts = static_cast<std::int32_t>(geo.num_experts);
  v.hidden_dtype = geo.hidden_dtype;
  v.row_bytes = static_cast<std::uint32_t>(geo.d * HiddenElementBytes(v.hidden_dtype));
  // Sequence numbers start at the wall clock (see wire_format.h); nothing replied yet.
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  const std::uint64_t start =
      ((static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<std::uint64_t>(ts.tv_nsec)) &
       ~std::uint64_t{1}) + 2;
  const std::vector<std::uint64_t> seqs(slots, start);
  cudaMemcpyAsync(v.send_seq, seqs.data(), slots * 8, cudaMemcpyHostToDevice, ep->control);
  const PollInfo idle{0, 0, -1, 0, 1};
  cudaMemcpyAsync(v.poll, &idle, sizeof(idle), cudaMemcpyHostToDevice, ep->control);
  if ((e = cudaStreamSynchronize(ep->control)) != cudaSuccess) return "initialising the inbox: " + CudaText(e);
  if (handle != nullptr && (e = cudaIpcGetMemHandle(handle, v.inbox)) != cudaSuccess) {
    return "cudaIpcGetMemHandle: " + CudaText(e);
  }
  return "";
}

// The kernels see the endpoint from now on. "" or an error.
std::string Publish(std::int64_t index, Endpoint* ep) {
  WriteView(index, ep->view, ep->control);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : "publishing the endpoint to the kernels: " + CudaText(e);
}

// The ibgda part of an endpoint Create made with a host inbox: its NIC
// (listening on `host`), the staging area, the QPs' queues and doorbell
// words mapped into the GPU, and the per-peer NicQueue array. "" or an error.
std::string AttachNic(std::int64_t index, const std::string& host, Endpoint* ep) {
  const Geometry& geo = ep->geo;
  ibgda::NicWriterConfig config;
  config.host = host;
  config.inbox = ep->host_inbox;
  config.inbox_bytes = ep->host_inbox_bytes;
  config.slots_offset = 0;
  config.slot_bytes = geo.Slot().bytes;
  config.max_endpoints = geo.max_endpoints;
  config.num_channels = geo.num_channels;
  config.endpoint = index;
  config.device_posts = true;
  std::string failed = ibgda::NicWriter::Open(config, &ep->writer);
  if (!failed.empty()) return failed;
  const auto E = static_cast<std::size_t>(geo.max_endpoints);
  ep->doorbells_bytes = AlignUp(E * sizeof(std::uint64_t), 4096);
  ep->doorbells = reinterpret_cast<std::uint64_t*>(MapPages(ep->doorbells_bytes));
  if (ep->doorbells == nullptr) return "ibgda: allocating the doorbell page";
  if (!(failed = MapIntoGpu(ep, ep->doorbells, ep->doorbells_bytes,
                            reinterpret_cast<void**>(&ep->doorbells_device))).empty() ||
      !(failed = MapIntoGpu(ep, ep->writer->staging(), ep->writer->staging_bytes(),
                            reinterpret_cast<void**>(&ep->view.staging))).empty()) {
    return "ibgda: " + failed;
  }
  for (std::size_t p = 0; p < E; ++p) {
    const ibgda::QueueView q = ep->writer->Queue(static_cast<std::int64_t>(p));
    void* device = nullptr;
    if (!(failed = MapIntoGpu(ep, q.segment, q.segment_bytes, &device)).empty()) return "ibgda: " + failed;
    ep->queues_device.push_back(static_cast<std::uint8_t*>(device));
  }
  const cudaError_t e = cudaMalloc(&ep->view.nic, E * sizeof(ibgda::NicQueue));
  if (e != cudaSuccess) return "ibgda: allocating the queue table: " + CudaText(e);
  cudaMemsetAsync(ep->view.nic, 0, E * sizeof(ibgda::NicQueue), ep->control);
  const cudaError_t synced = cudaStreamSynchronize(ep->control);
  return synced == cudaSuccess ? "" : "ibgda: " + CudaText(synced);
}

// The GPU's address of `host`, which lies in the host range starting at
// `host_base` that the GPU sees at `device_base`.
template <typename T>
T* OnDevice(T* host, const void* host_base, std::uint8_t* device_base) {
  const auto offset = reinterpret_cast<std::uintptr_t>(host) - reinterpret_cast<std::uintptr_t>(host_base);
  return reinterpret_cast<T*>(device_base + offset);
}

// Peer p's NicQueue becomes not ready: kernels start no new message to it
// (control_mu held). A kernel already past its checks may still post to the
// QP after the control path resets it; the NIC then fails that QP (an error
// completion), and like any failed QP it stays failed until the peer
// restarts (ibgda_writer.h, Failure). Closing that window needs connection
// generations checked by the kernels under the queue lock.
void WithdrawQueue(Endpoint* ep, std::int64_t p) {
  const std::uint32_t flag = 0;
  cudaMemcpyAsync(&ep->view.nic[p].ready, &flag, sizeof(flag), cudaMemcpyHostToDevice, ep->control);
  if (cudaStreamSynchronize(ep->control) != cudaSuccess) cudaGetLastError();
}

// Writes peer p's NicQueue for the kernels, ready, with fresh counters (its
// QP was just connected: nothing posted yet); control_mu held, and the queue
// withdrawn before. "" or an error.
// (The queue pointers stay those of AttachNic's mapping: a QP keeps its
// segment for the NIC's life.)
std::string PublishQueue(Endpoint* ep, std::int64_t p) {
  ibgda::NicQueue q{};
  {
    const ibgda::QueueView view = ep->writer->Queue(p);
    std::uint8_t* segment = ep->queues_device[static_cast<std::size_t>(p)];
    q.sq = OnDevice(view.sq, view.segment, segment);
    q.dbrec = OnDevice(view.dbrec, view.segment, segment);
    q.cq = OnDevice(view.cq, view.segment, segment);
    q.bf = ep->doorbells_device + p;
    q.remote_slots = view.slots_addr;
    q.staging_addr = reinterpret_cast<std::uintptr_t>(ep->writer->staging()) +
                     static_cast<std::uint64_t>(p * ep->geo.num_channels) * ep->geo.Slot().bytes;
    q.qpn = view.qpn;
    q.rkey = view.rkey;
    q.lkey = ep->writer->staging_lkey();
    q.log_sq = view.log_sq;
    q.log_cq = view.log_cq;
  }
  // Everything but `ready` first, then `ready` (stream order): a kernel that
  // sees it set sees the rest.
  ibgda::NicQueue* dst = ep->view.nic + p;
  cudaMemcpyAsync(dst, &q, offsetof(ibgda::NicQueue, ready), cudaMemcpyHostToDevice, ep->control);
  cudaMemcpyAsync(&dst->staged_until, &q.staged_until, sizeof(q.staged_until), cudaMemcpyHostToDevice, ep->control);
  const std::uint32_t flag = 1;
  cudaMemcpyAsync(&dst->ready, &flag, sizeof(flag), cudaMemcpyHostToDevice, ep->control);
  const cudaError_t e = cudaStreamSynchronize(ep->control);
  return e == cudaSuccess ? "" : "ibgda: updating the queue table: " + CudaText(e);
}

// The geometry arguments of the open calls, as they come.
struct OpenArgs {
  std::int64_t max_endpoints, num_channels, capacity, d, k, num_layers, num_experts, hidden_dtype;
};

// Opens endpoint `index` on CUDA device `device`: a cuda_ipc endpoint (its
// inbox's IPC handle into *handle) or, with `nic_host`, an ibgda one whose
// NIC listens there (handle unused). Returns 0 and the endpoint in *out; -2
// if already open in this process; -1 for any other error (message in err).
int OpenEndpoint(std::uint64_t deployment_id, std::int64_t index, std::int64_t device, const OpenArgs& a,
                 const char* nic_host, cudaIpcMemHandle_t* handle, std::shared_ptr<Endpoint>* out, char* err,
                 std::int64_t errlen) {
  Geometry geo;
  std::string msg = MakeGeometry(
      {kMaxEndpointIndex, ibgda::kMaxNicChannels, kMaxSlots, kMaxCapacity, 1 << 16, 256, 1 << 16, 1 << 20}, index,
      deployment_id, a.max_endpoints, a.num_channels, a.capacity, a.d, a.k, a.num_layers, a.num_experts,
      a.hidden_dtype, &geo);
  if (!msg.empty()) {
    CopyError(msg, err, errlen);
    return -1;
  }
  std::lock_guard<std::mutex> lock(g_mu);
  if (Endpoints().count(index)) {
    CopyError("GPU endpoint " + std::to_string(index) + " is already open in this process", err, errlen);
    return -2;
  }
  auto ep = std::make_shared<Endpoint>();
  msg = Create(index, geo, static_cast<int>(device), ep.get(), nic_host == nullptr ? handle : nullptr);
  if (msg.empty() && nic_host != nullptr) msg = AttachNic(index, nic_host, ep.get());
  if (msg.empty()) msg = Publish(index, ep.get());
  if (!msg.empty()) {
    Release(ep.get());
    cudaGetLastError();
    CopyError(msg, err, errlen);
    return -1;
  }
  Endpoints()[index] = ep;
  *out = std::move(ep);
  return 0;
}

// Whether a kernel saw an error completion on peer p's QP (control_mu held).
bool QueueFailed(Endpoint* ep, std::int64_t p) {
  std::uint32_t failed = 0;
  cudaMemcpyAsync(&failed, &ep->view.nic[p].failed, sizeof(failed), cudaMemcpyDeviceToHost, ep->control);
  if (cudaStreamSynchronize(ep->control) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return failed != 0;
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

std::shared_ptr<Endpoint> Lookup(std::int64_t index) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = Endpoints().find(index);
  return it == Endpoints().end() ? nullptr : it->second;
}

// The open endpoint `index`, or null with `*error` set.
std::shared_ptr<Endpoint> Find(const char* where, std::int64_t index, ffi::Error* error) {
  std::shared_ptr<Endpoint> ep = Lookup(index);
  if (ep == nullptr) {
    *error = ffi::Error::InvalidArgument(std::string(where) + ": GPU endpoint " + std::to_string(index) +
                                         " is not open in this process (open it with "
                                         "eaas_jax.transport.cuda_ipc.CudaIpcEndpoint, or an "
                                         "eaas_jax.transport.ibgda.IbgdaEndpoint in a GPU process)");
    return nullptr;
  }
  int device = -1;
  cudaGetDevice(&device);
  if (device != ep->device) {
    *error = ffi::Error::InvalidArgument(std::string(where) + ": runs on CUDA device " + std::to_string(device) +
                                         " but endpoint " + std::to_string(index) + " lives on device " +
                                         std::to_string(ep->device));
    return nullptr;
  }
  return ep;
}

ffi::Error Launched(const char* where) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(where) + ": kernel launch failed: " + CudaText(e));
}

// A timeout attribute in microseconds as the kernels' nanoseconds (clamped
// to [0, 2^40] us as in shm).
std::int64_t TimeoutNs(std::int64_t timeout_us) {
  return std::clamp<std::int64_t>(timeout_us, 0, std::int64_t{1} << 40) * 1000;
}

// Blocks for a message of `bytes`: about two 16-byte stores per thread, at
// most kMaxBlocksPerMessage.
int BlocksFor(std::int64_t bytes) {
  constexpr std::int64_t kBytesPerBlock = kThreads * 32;
  return static_cast<int>(std::clamp<std::int64_t>((bytes + kBytesPerBlock - 1) / kBytesPerBlock, 1,
                                                   kMaxBlocksPerMessage));
}

ffi::Error DispatchImpl(cudaStream_t stream, ffi::AnyBuffer hidden, ffi::Buffer<ffi::F32, 1> scales,
                        ffi::Buffer<ffi::S32, 2> expert_ids, ffi::Buffer<ffi::F32, 2> gates,
                        ffi::Buffer<ffi::S32, 2> targets, ffi::Buffer<ffi::S32, 1> servers,
                        ffi::AnyBuffer /*after*/, ffi::ResultBuffer<ffi::S32, 1> sent, std::int64_t endpoint,
                        std::int64_t layer, std::int64_t micro_batch) {
  static constexpr const char* kWhere = "eaas_cuda_ipc_dispatch";
  ffi::Error error;
  const std::shared_ptr<Endpoint> ep = Find(kWhere, endpoint, &error);
  if (ep == nullptr) return error;
  const Geometry& geo = ep->geo;
  const auto hd = hidden.dimensions();
  const std::int64_t T = hd.size() == 2 ? hd[0] : -1;
  const std::int64_t S = servers.dimensions()[0];
  if (hd.size() != 2 || hd[1] != geo.d || hidden.element_type() != HiddenFfiType(geo.hidden_dtype) ||
      scales.dimensions()[0] != T || expert_ids.dimensions()[0] != T || expert_ids.dimensions()[1] != geo.k ||
      gates.dimensions()[0] != T || gates.dimensions()[1] != geo.k || targets.dimensions()[0] != T ||
      targets.dimensions()[1] != geo.k || sent->dimensions()[0] != S) {
    return ffi::Error::InvalidArgument(std::string(kWhere) +
                                       ": expected hidden [T, d=" + std::to_string(geo.d) +
                                       "] of the dispatch dtype, scales [T], expert_ids/gates/targets [T, k=" +
                                       std::to_string(geo.k) + "], sent [S]");
  }
  if (T > geo.capacity) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": " + std::to_string(T) +
                                       " tokens exceed the mailbox capacity " + std::to_string(geo.capacity));
  }
  if (S > geo.max_endpoints || layer < 0 || layer >= geo.num_layers || micro_batch < 0 ||
      micro_batch >= geo.num_channels) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": servers longer than max_endpoints, or layer " +
                                       std::to_string(layer) + " / micro_batch " + std::to_string(micro_batch) +
                                       " out of range");
  }
  if (S == 0) return ffi::Error::Success();
  DispatchKernel<<<dim3(BlocksFor(T * static_cast<std::int64_t>(ep->view.row_bytes)), static_cast<unsigned>(S)), kThreads,
                   static_cast<std::size_t>(geo.capacity) * sizeof(std::int32_t), stream>>>(
      static_cast<int>(endpoint), ep->view.generation, static_cast<const std::uint8_t*>(hidden.untyped_data()),
      scales.typed_data(),
      expert_ids.typed_data(), gates.typed_data(), targets.typed_data(), servers.typed_data(),
      static_cast<int>(T), static_cast<int>(S), static_cast<int>(layer), static_cast<int>(micro_batch),
      sent->typed_data());
  return Launched(kWhere);
}

ffi::Error CombineImpl(cudaStream_t stream, ffi::Buffer<ffi::S32, 1> sent, ffi::Buffer<ffi::S32, 2> targets,
                       ffi::Buffer<ffi::S32, 1> servers, ffi::Buffer<ffi::S32, 0> timeout_us,
                       ffi::AnyBuffer /*after*/, ffi::ResultBuffer<ffi::F32, 2> out,
                       ffi::ResultBuffer<ffi::S32, 1> status, ffi::ResultBuffer<ffi::S32, 1> waited_us,
                       std::int64_t endpoint, std::int64_t layer, std::int64_t micro_batch) {
  static constexpr const char* kWhere = "eaas_cuda_ipc_combine";
  ffi::Error error;
  const std::shared_ptr<Endpoint> ep = Find(kWhere, endpoint, &error);
  if (ep == nullptr) return error;
  const Geometry& geo = ep->geo;
  const std::int64_t T = targets.dimensions()[0];
  const std::int64_t S = servers.dimensions()[0];
  if (targets.dimensions()[1] != geo.k || sent.dimensions()[0] != S || out->dimensions()[0] != T ||
      out->dimensions()[1] != geo.d || status->dimensions()[0] != S || waited_us->dimensions()[0] != S ||
      T > geo.capacity ||
      S > std::min<std::int64_t>(geo.max_endpoints, kThreads)) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": expected sent/servers/status/waited [S <= " +
                                       std::to_string(std::min<std::int64_t>(geo.max_endpoints, kThreads)) +
                                       "], targets [T <= capacity, k=" + std::to_string(geo.k) +
                                       "], out [T, d=" + std::to_string(geo.d) + "]");
  }
  if (layer < 0 || layer >= geo.num_layers || micro_batch < 0 || micro_batch >= geo.num_channels) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": layer / micro_batch out of range");
  }
  const std::int64_t work = T * (geo.d % 4 == 0 ? geo.d / 4 : geo.d);
  const int blocks = static_cast<int>(std::clamp<std::int64_t>((work + kThreads - 1) / kThreads, 1, 528));
  CombineKernel<<<blocks, kThreads, 0, stream>>>(static_cast<int>(endpoint), ep->view.generation, sent.typed_data(),
                                                 servers.typed_data(), static_cast<int>(S), static_cast<int>(T),
                                                 static_cast<int>(layer), static_cast<int>(micro_batch),
                                                 timeout_us.typed_data(), status->typed_data(),
                                                 waited_us->typed_data(), out->typed_data());
  return Launched(kWhere);
}

ffi::Error PollImpl(cudaStream_t stream, ffi::Buffer<ffi::S32, 2> hosted, ffi::AnyBuffer /*after*/,
                    ffi::Result<ffi::AnyBuffer> out_hidden, ffi::ResultBuffer<ffi::F32, 1> out_scales,
                    ffi::ResultBuffer<ffi::S32, 2> out_expert_ids, ffi::ResultBuffer<ffi::F32, 2> out_gates,
                    ffi::ResultBuffer<ffi::S32, 1> out_layer, ffi::ResultBuffer<ffi::S32, 0> out_num_rows,
                    std::int64_t endpoint, std::int64_t max_messages, std::int64_t timeout_us) {
  static constexpr const char* kWhere = "eaas_cuda_ipc_poll";
  ffi::Error error;
  const std::shared_ptr<Endpoint> ep = Find(kWhere, endpoint, &error);
  if (ep == nullptr) return error;
  const Geometry& geo = ep->geo;
  const std::int64_t C = out_hidden->dimensions()[0];
  if (hosted.dimensions()[0] != geo.num_layers || hosted.dimensions()[1] != geo.num_experts ||
      out_hidden->dimensions().size() != 2 || out_hidden->dimensions()[1] != geo.d ||
      out_hidden->element_type() != HiddenFfiType(geo.hidden_dtype) || out_scales->dimensions()[0] != C ||
      out_expert_ids->dimensions()[0] != C || out_expert_ids->dimensions()[1] != geo.k ||
      out_gates->dimensions()[0] != C || out_gates->dimensions()[1] != geo.k || out_layer->dimensions()[0] != C) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": expected hosted [num_layers, num_experts], "
                                       "hidden [C, d] of the dispatch dtype, scales [C], expert_ids/gates [C, k], "
                                       "layer [C]");
  }
  if (C < geo.capacity || C >= (std::int64_t{1} << 30) || max_messages < 1) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": poll capacity " + std::to_string(C) +
                                       " must be at least the mailbox capacity " + std::to_string(geo.capacity) +
                                       " and max_messages >= 1");
  }
  const std::int64_t timeout_ns = TimeoutNs(timeout_us);
  ep->poll_rows = C;
  const int ix = static_cast<int>(endpoint);
  const int blocks = static_cast<int>(std::clamp<std::int64_t>((C + kWarps - 1) / kWarps, 1, 264));
  PollKernel<<<blocks, kThreads, 0, stream>>>(ix, ep->view.generation, hosted.typed_data(), static_cast<int>(C),
                                              static_cast<int>(std::min<std::int64_t>(max_messages, kMaxSlots)),
                                              timeout_ns, static_cast<std::uint8_t*>(out_hidden->untyped_data()),
                                              out_scales->typed_data(), out_expert_ids->typed_data(),
                                              out_gates->typed_data(), out_layer->typed_data(),
                                              out_num_rows->typed_data());
  return Launched(kWhere);
}

ffi::Error ReplyImpl(cudaStream_t stream, ffi::Buffer<ffi::F32, 2> results, ffi::Buffer<ffi::S32, 0> /*num_rows*/,
                     ffi::ResultBuffer<ffi::S32, 0> token, std::int64_t endpoint) {
  static constexpr const char* kWhere = "eaas_cuda_ipc_reply";
  ffi::Error error;
  const std::shared_ptr<Endpoint> ep = Find(kWhere, endpoint, &error);
  if (ep == nullptr) return error;
  const Geometry& geo = ep->geo;
  if (results.dimensions()[1] != geo.d || results.dimensions()[0] != ep->poll_rows.load()) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": out is [" +
                                       std::to_string(results.dimensions()[0]) + ", " +
                                       std::to_string(results.dimensions()[1]) + "], expected [C=" +
                                       std::to_string(ep->poll_rows.load()) + " (the last poll's), d=" +
                                       std::to_string(geo.d) + "]");
  }
  const int ix = static_cast<int>(endpoint);
  ReplyKernel<<<dim3(BlocksFor(geo.capacity * geo.d * static_cast<std::int64_t>(sizeof(float))),
                     static_cast<unsigned>(geo.NumSlots())),
                kThreads, 0, stream>>>(
      ix, ep->view.generation, results.typed_data(), token->typed_data());
  return Launched(kWhere);
}

}  // namespace
}  // namespace cuda_ipc
}  // namespace eaas

// ---------------------------------------------------------------------------
// Exported symbols
// ---------------------------------------------------------------------------
namespace eaas::cuda_ipc {
using F32R2 = ffi::Buffer<ffi::F32, 2>;
using F32R1 = ffi::Buffer<ffi::F32, 1>;
using S32R2 = ffi::Buffer<ffi::S32, 2>;
using S32R1 = ffi::Buffer<ffi::S32, 1>;
using S32R0 = ffi::Buffer<ffi::S32, 0>;
using Stream = ffi::PlatformStream<cudaStream_t>;
}  // namespace eaas::cuda_ipc

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_cuda_ipc_dispatch, eaas::cuda_ipc::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<eaas::cuda_ipc::Stream>()
                                  .Arg<ffi::AnyBuffer>()         // hidden [T, d], dispatch dtype
                                  .Arg<eaas::cuda_ipc::F32R1>()  // scales [T]
                                  .Arg<eaas::cuda_ipc::S32R2>()  // expert_ids [T, k]
                                  .Arg<eaas::cuda_ipc::F32R2>()  // gates [T, k]
                                  .Arg<eaas::cuda_ipc::S32R2>()  // targets [T, k]
                                  .Arg<eaas::cuda_ipc::S32R1>()  // servers [S]
                                  .Arg<ffi::AnyBuffer>()         // after (ordering)
                                  .Ret<eaas::cuda_ipc::S32R1>()  // sent [S]
                                  .Attr<std::int64_t>("endpoint")
                                  .Attr<std::int64_t>("layer")
                                  .Attr<std::int64_t>("micro_batch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_cuda_ipc_combine, eaas::cuda_ipc::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<eaas::cuda_ipc::Stream>()
                                  .Arg<eaas::cuda_ipc::S32R1>()  // sent [S]
                                  .Arg<eaas::cuda_ipc::S32R2>()  // targets [T, k]
                                  .Arg<eaas::cuda_ipc::S32R1>()  // servers [S]
                                  .Arg<eaas::cuda_ipc::S32R0>()  // timeout_us []
                                  .Arg<ffi::AnyBuffer>()         // after (ordering)
                                  .Ret<eaas::cuda_ipc::F32R2>()  // out [T, d]
                                  .Ret<eaas::cuda_ipc::S32R1>()  // status [S]
                                  .Ret<eaas::cuda_ipc::S32R1>()  // waited_us [S]
                                  .Attr<std::int64_t>("endpoint")
                                  .Attr<std::int64_t>("layer")
                                  .Attr<std::int64_t>("micro_batch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_cuda_ipc_poll, eaas::cuda_ipc::PollImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<eaas::cuda_ipc::Stream>()
                                  .Arg<eaas::cuda_ipc::S32R2>()  // hosted [L, E]
                                  .Arg<ffi::AnyBuffer>()         // after (ordering)
                                  .Ret<ffi::AnyBuffer>()         // hidden [C, d], dispatch dtype
                                  .Ret<eaas::cuda_ipc::F32R1>()  // scales [C]
                                  .Ret<eaas::cuda_ipc::S32R2>()  // expert_ids [C, k]
                                  .Ret<eaas::cuda_ipc::F32R2>()  // gates [C, k]
                                  .Ret<eaas::cuda_ipc::S32R1>()  // layer [C]
                                  .Ret<eaas::cuda_ipc::S32R0>()  // num_rows []
                                  .Attr<std::int64_t>("endpoint")
                                  .Attr<std::int64_t>("max_messages")
                                  .Attr<std::int64_t>("timeout_us"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_cuda_ipc_reply, eaas::cuda_ipc::ReplyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<eaas::cuda_ipc::Stream>()
                                  .Arg<eaas::cuda_ipc::F32R2>()  // out [C, d]
                                  .Arg<eaas::cuda_ipc::S32R0>()  // num_rows []
                                  .Ret<eaas::cuda_ipc::S32R0>()  // token []
                                  .Attr<std::int64_t>("endpoint"));

extern "C" {

// Number of CUDA devices this process sees (0 when none or no driver).
EAAS_FFI_EXPORT int eaas_cuda_ipc_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

// Opens endpoint `endpoint` on CUDA device `device`: allocates its inbox and
// writes the inbox's 64-byte IPC handle into handle_out. Returns 0; -2 if
// already open in this process; -1 for any other error (message in err).
EAAS_FFI_EXPORT int eaas_cuda_ipc_open(std::uint64_t deployment_id, std::int64_t endpoint, std::int64_t device,
                                       std::int64_t max_endpoints, std::int64_t num_channels,
                                       std::int64_t capacity, std::int64_t d, std::int64_t k,
                                       std::int64_t num_layers, std::int64_t num_experts,
                                       std::int64_t hidden_dtype, std::uint8_t* handle_out, char* err,
                                       std::int64_t errlen) {
  using namespace eaas::cuda_ipc;
  cudaIpcMemHandle_t handle{};
  std::shared_ptr<Endpoint> ep;
  const int rc = OpenEndpoint(deployment_id, endpoint, device,
                              {max_endpoints, num_channels, capacity, d, k, num_layers, num_experts, hidden_dtype},
                              nullptr, &handle, &ep, err, errlen);
  if (rc == 0) std::memcpy(handle_out, &handle, sizeof(handle));
  return rc;
}

// Closes an endpoint: waits for its device's work, unpublishes it from the
// kernels and frees its memory. Returns 0, or -1 if not open.
EAAS_FFI_EXPORT int eaas_cuda_ipc_close(std::int64_t endpoint) {
  using namespace eaas;
  using namespace eaas::cuda_ipc;
  const std::shared_ptr<Endpoint> ep = TakeEndpoint(Endpoints(), g_mu, endpoint);
  if (ep == nullptr) return -1;
  std::lock_guard<std::mutex> lock(ep->control_mu);
  cudaSetDevice(ep->device);
  WriteView(endpoint, View{}, ep->control);  // kernels starting from now on fail closed
  cudaDeviceSynchronize();                   // the ones already running finish
  Release(ep.get());
  cudaGetLastError();
  return 0;
}

// Imports `peer`'s inbox from its 64-byte IPC handle (null: forget the peer).
// The next kernel that writes to it uses the new inbox. Returns 0, -1 with a
// message in err.
EAAS_FFI_EXPORT int eaas_cuda_ipc_set_peer(std::int64_t endpoint, std::int64_t peer, const std::uint8_t* handle,
                                           char* err, std::int64_t errlen) {
  using namespace eaas;
  using namespace eaas::cuda_ipc;
  const std::shared_ptr<Endpoint> ep = Lookup(endpoint);
  if (ep == nullptr) {
    CopyError("cuda_ipc endpoint " + std::to_string(endpoint) + " is not open", err, errlen);
    return -1;
  }
  std::lock_guard<std::mutex> lock(ep->control_mu);
  if (peer < 0 || peer >= ep->geo.max_endpoints || peer == endpoint) {
    CopyError("peer " + std::to_string(peer) + " is not another endpoint in [0, max_endpoints)", err, errlen);
    return -1;
  }
  if (ep->writer != nullptr) {
    CopyError("endpoint " + std::to_string(endpoint) + " is an ibgda endpoint: its peers are reached through its NIC",
              err, errlen);
    return -1;
  }
  cudaSetDevice(ep->device);
  void* ptr = nullptr;
  if (handle != nullptr) {
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handle, sizeof(h));
    const cudaError_t e = cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      cudaGetLastError();
      CopyError("importing the inbox of endpoint " + std::to_string(peer) + ": " + CudaText(e) +
                    " (cuda_ipc peers must be other processes on this host)",
                err, errlen);
      return -1;
    }
  }
  cudaMemcpyAsync(ep->view.peers + peer, &ptr, sizeof(ptr), cudaMemcpyHostToDevice, ep->control);
  const cudaError_t e = cudaStreamSynchronize(ep->control);
  auto old = ep->imported.find(peer);
  if (old != ep->imported.end()) {
    ep->retired.push_back(old->second);
    ep->imported.erase(old);
  }
  if (ptr != nullptr) ep->imported[peer] = ptr;
  if (e != cudaSuccess) {
    CopyError("updating the peer table: " + CudaText(e), err, errlen);
    return -1;
  }
  return 0;
}

// Copies and clears the flags of peers a kernel wanted to write to or answer
// but had not imported: out[p] = 1. Returns how many, or -1 if not open.
EAAS_FFI_EXPORT int eaas_cuda_ipc_take_wanted(std::int64_t endpoint, std::int32_t* out, std::int64_t n) {
  using namespace eaas;
  using namespace eaas::cuda_ipc;
  const std::shared_ptr<Endpoint> ep = Lookup(endpoint);
  if (ep == nullptr) return -1;
  std::lock_guard<std::mutex> lock(ep->control_mu);
  int count = 0;
  for (std::int64_t p = 0; p < ep->geo.max_endpoints && p < n; ++p) {
    volatile std::int32_t* flag = ep->wanted_host + p;
    out[p] = *flag;
    if (out[p]) {
      *flag = 0;
      ++count;
    }
  }
  return count;
}

// Writes min(n, number of counters) counters (eaas_shm_stat_names order).
// Returns the number of counters, or -1 if the endpoint is not open.
EAAS_FFI_EXPORT int eaas_cuda_ipc_stats(std::int64_t endpoint, std::int64_t* out, std::int64_t n) {
  using namespace eaas;
  using namespace eaas::cuda_ipc;
  const std::shared_ptr<Endpoint> ep = Lookup(endpoint);
  if (ep == nullptr) return -1;
  std::lock_guard<std::mutex> lock(ep->control_mu);
  unsigned long long values[eaas::kNumCounters] = {};
  cudaSetDevice(ep->device);
  cudaMemcpyAsync(values, ep->view.counters, sizeof(values), cudaMemcpyDeviceToHost, ep->control);
  if (cudaStreamSynchronize(ep->control) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  for (std::int64_t i = 0; i < n && i < eaas::kNumCounters; ++i) out[i] = static_cast<std::int64_t>(values[i]);
  return eaas::kNumCounters;
}

// --- ibgda endpoints on GPUs (eaas_jax/transport/ibgda.py) -------------------
// The kernels above, with messages posted to a NIC by the GPU (ibgda_post.cuh)
// instead of stored into imported inboxes. Closed with eaas_cuda_ipc_close,
// counters from eaas_cuda_ipc_stats; the NIC handle (card[5]) takes
// nic_model_abi.cc's fault injection.

// As eaas_cuda_ipc_open, with the inbox in host memory the NIC writes into
// and a NIC listening on the IPv4 address `host`. Its card into card[0..4]:
// port, QPN base, inbox rkey, slots address, link key; card[5]: the NIC's
// handle. Returns 0; -2 if already open in this process; -1 with a message.
EAAS_FFI_EXPORT int eaas_ibgda_gpu_open(std::uint64_t deployment_id, std::int64_t endpoint, std::int64_t device,
                                        std::int64_t max_endpoints, std::int64_t num_channels,
                                        std::int64_t capacity, std::int64_t d, std::int64_t k,
                                        std::int64_t num_layers, std::int64_t num_experts,
                                        std::int64_t hidden_dtype, const char* host, std::uint64_t* card, char* err,
                                        std::int64_t errlen) {
  using namespace eaas;
  using namespace eaas::cuda_ipc;
  if (host == nullptr || card == nullptr) {
    CopyError("ibgda: no address to listen on", err, errlen);
    return -1;
  }
  std::shared_ptr<Endpoint> ep;
  const int rc = OpenEndpoint(deployment_id, endpoint, device,
                              {max_endpoints, num_channels, capacity, d, k, num_layers, num_experts, hidden_dtype},
                              host, nullptr, &ep, err, errlen);
  if (rc != 0) return rc;
  const ibgda::Card& c = ep->writer->card();
  card[0] = c.port;
  card[1] = c.qpn_base;
  card[2] = c.inbox_rkey;
  card[3] = c.slots_addr;
  card[4] = c.link_key;
  card[5] = static_cast<std::uint64_t>(ep->writer->nic());
  return 0;
}

// Connects `endpoint`'s QP for `peer` to the peer whose card is (port,
// qpn_base, rkey, slots_addr, link_key) at `host`, as eaas_ibgda_connect
// does for CPU endpoints; the peer is not ready (sent to) before
// eaas_ibgda_gpu_peer(op 1). 0 or -1.
EAAS_FFI_EXPORT int eaas_ibgda_gpu_connect(std::int64_t endpoint, std::int64_t peer, const char* host,
                                           std::uint64_t port, std::uint64_t qpn_base, std::uint64_t rkey,
                                           std::uint64_t slots_addr, std::uint64_t link_key, char* err,
                                           std::int64_t errlen) {
  using namespace eaas;
  using namespace eaas::cuda_ipc;
  const std::shared_ptr<Endpoint> ep = Lookup(endpoint);
  if (ep == nullptr || ep->writer == nullptr) {
    CopyError("ibgda GPU endpoint " + std::to_string(endpoint) + " is not open", err, errlen);
    return -1;
  }
  if (host == nullptr || port > 0xffff || qpn_base > 0xffffff || rkey > 0xffffffffu || peer < 0 ||
      peer >= ep->geo.max_endpoints || peer == endpoint) {
    CopyError("ibgda: malformed peer card, or no such peer", err, errlen);
    return -1;
  }
  const ibgda::Card card{static_cast<std::uint32_t>(port), static_cast<std::uint32_t>(qpn_base),
                         static_cast<std::uint32_t>(rkey), slots_addr, link_key};
  // The TCP connection first, outside the lock (it may take up to a second).
  std::unique_ptr<nic::Conn> link;
  std::string failed = nic::Connect(host, static_cast<std::uint16_t>(port), link_key, &link);
  if (!failed.empty()) {
    CopyError("ibgda: cannot reach endpoint " + std::to_string(peer) + "'s NIC: " + failed, err, errlen);
    return -1;
  }
  std::lock_guard<std::mutex> lock(ep->control_mu);
  if (ep->writer == nullptr) {  // closed meanwhile (close releases under control_mu)
    CopyError("ibgda GPU endpoint " + std::to_string(endpoint) + " is not open", err, errlen);
    return -1;
  }
  cudaSetDevice(ep->device);
  WithdrawQueue(ep.get(), peer);
  failed = ep->writer->Connect(peer, std::move(link), card);
  if (failed.empty()) return 0;
  CopyError(failed, err, errlen);
  return -1;
}

// The peer's state (ibgda_writer.h, PeerState), as eaas_ibgda_peer: `op` 1
// first marks a connected peer ready (the kernels send to it from then on),
// 2 disconnects it. A QP on which a kernel saw an error completion is
// kFailed. -1: no such endpoint.
EAAS_FFI_EXPORT int eaas_ibgda_gpu_peer(std::int64_t endpoint, std::int64_t peer, int op) {
  using namespace eaas;
  using namespace eaas::cuda_ipc;
  const std::shared_ptr<Endpoint> ep = Lookup(endpoint);
  if (ep == nullptr || ep->writer == nullptr) return -1;
  if (peer < 0 || peer >= ep->geo.max_endpoints) return static_cast<int>(ibgda::PeerState::kIdle);
  std::lock_guard<std::mutex> lock(ep->control_mu);
  if (ep->writer == nullptr) return -1;  // closed meanwhile
  cudaSetDevice(ep->device);
  ibgda::NicWriter& writer = *ep->writer;
  if (op == 1 && writer.SetReady(peer) && !PublishQueue(ep.get(), peer).empty()) {
    writer.MarkFailed(peer);  // not reachable from the kernels: say so
  }
  if (op == 2) {
    WithdrawQueue(ep.get(), peer);
    writer.Disconnect(peer);
  }
  if (writer.State(peer) == ibgda::PeerState::kReady && QueueFailed(ep.get(), peer)) writer.MarkFailed(peer);
  return static_cast<int>(writer.State(peer));
}

}  // extern "C"
