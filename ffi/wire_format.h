// Wire format of the eaas expert transport, shared by every backend (shm,
// cuda_ipc, ibgda). Host-side C++17, no XLA dependency; plain-old-data only, so
// device code can use the same structs.
//
// == Mailboxes ==
// Every process of a deployment (attention client or expert server) has an
// endpoint index e in [0, max_endpoints) and owns ONE inbox holding
// max_endpoints x num_channels mailbox slots. Slot (sender, channel) is written
// one-sidedly, and only, by endpoint `sender`; `channel` is the micro-batch
// index. A request and its reply travel in the two endpoints' inboxes: client c
// writes request slot (c, mb) of server s's inbox, s answers in slot (s, mb) of
// c's inbox. At most one message per (sender, receiver, channel) is in flight
// (a client sends micro-batch mb's next request only after combining the
// previous reply), so a slot is never overwritten before it was consumed by a
// well-behaved receiver; when it is anyway (a client gave up on a slow server
// and sent its next request) the seqlock below detects the torn read and the
// ticket tells a stale reply from the expected one.
//
// == Slot layout == (SlotLayout; every array 64-byte aligned)
//   MessageHeader                      64 bytes
//   hidden      [capacity, d]          sized for float32 (the widest hidden
//                                      dtype); requests: the tokens' hidden
//                                      states, rows of d elements of the
//                                      message's hidden_dtype, packed;
//                                      replies: the [n, d] float32 expert
//                                      output (partial sums per token)
//   expert_ids  [capacity, k] int32    requests only; -1 = no expert
//   gates       [capacity, k] float32  requests only
//   scales      [capacity] float32     requests in float8 only: row r's
//                                      values are its e4m3 codes x scales[r]
// Only the first `num_tokens` rows of each array are meaningful.
//
// == Publication protocol (a seqlock whose sequence only grows) ==
// Writer (the only one of its slot):
//   1. relaxed store seq = prev + 1 (odd: "being written"), release fence;
//      a writer that knows the receiver is done with the slot's previous
//      message may skip this step (cuda_ipc requests whose reply arrived: the
//      server's poll committed them and reads that slot again only once seq
//      changes), since no reader can then be inside the slot;
//   2. write the payload rows and header fields (seq field excluded);
//   3. release store seq = prev + 2 (even: published).
// Sequence numbers only grow and are never reset: a sender starts each of its
// counters at the CLOCK_REALTIME nanoseconds of its start (rounded to even), so
// a restarted sender's numbers (and tickets) do not repeat its predecessor's.
// Reader: acquire-load seq; 0 (never written), odd (being written) or equal to
// the last value it consumed from that slot: nothing new. Otherwise copy the
// header and payload out into private memory, acquire fence, reload seq; if it
// changed, the copy is torn: drop it and look again later. Every field is
// validated on the private copy, never re-read from shared memory.
//
// == Validation (a receiver never trusts a peer) ==
// checksum (FNV-1a 32 of header bytes [0, 60) including the published seq),
// deployment_id, kind, sender == the slot's owner, micro_batch == the slot's
// channel, 0 < num_tokens <= capacity, layer < num_layers, hidden_dtype
// supported, every expert id -1 or hosted by the receiving server (requests),
// ticket == the one the client waits for (replies; an older ticket is a stale
// reply and skipped). Bad messages are dropped and counted per reason; a
// client waiting for a reply keeps waiting for the valid one until its
// deadline, so a malformed message in a slot costs that message only.
//
// Multi-byte fields are little-endian (the only byte order supported).
#ifndef EAAS_FFI_WIRE_FORMAT_H_
#define EAAS_FFI_WIRE_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the eaas wire format is little-endian only"
#endif

// Functions device code calls too (the cuda_ipc kernels) are marked
// EAAS_HOST_DEVICE.
#if defined(__CUDACC__)
#define EAAS_HOST_DEVICE __host__ __device__
#else
#define EAAS_HOST_DEVICE
#endif

namespace eaas {

// 32-bit FNV-1a parameters (http://www.isthe.com/chongo/tech/comp/fnv/).
inline constexpr std::uint32_t kFnv1a32OffsetBasis = 2166136261u;  // 0x811C9DC5
inline constexpr std::uint32_t kFnv1a32Prime = 16777619u;          // 0x01000193

// FNV-1a over `size` bytes starting at `data`, continuing from `seed` (pass the
// previous result to hash a message in several pieces). `data` may be null
// when `size` is 0; the hash of an empty input is the offset basis.
EAAS_HOST_DEVICE inline constexpr std::uint32_t Fnv1a32(const std::uint8_t* data,
                                       std::size_t size,
                                       std::uint32_t seed = kFnv1a32OffsetBasis) {
  std::uint32_t hash = seed;
  for (std::size_t i = 0; i < size; ++i) {
    hash ^= static_cast<std::uint32_t>(data[i]);
    hash *= kFnv1a32Prime;  // unsigned arithmetic: wraps modulo 2^32
  }
  return hash;
}

// Version of this wire format (message header + slot layout).
inline constexpr std::uint32_t kWireFormatVersion = 2;

// MessageHeader::kind.
enum MessageKind : std::uint16_t {
  kKindRequest = 1,  // client -> server: tokens, expert ids, gates
  kKindReply = 2,    // server -> client: [n, d] float32 partial sums
};

// MessageHeader::hidden_dtype. Replies are always float32; requests carry the
// deployment's dispatch dtype (every endpoint of a deployment agrees on it).
enum HiddenDtype : std::uint16_t {
  kHiddenF32 = 1,
  kHiddenBF16 = 2,
  kHiddenF8E4M3 = 3,  // float8_e4m3fn codes + a float32 scale per row
};

// Bytes of one hidden element of `dtype`; 0 for an unknown dtype.
inline constexpr std::size_t HiddenElementBytes(std::uint32_t dtype) {
  return dtype == kHiddenF32 ? 4 : dtype == kHiddenBF16 ? 2 : dtype == kHiddenF8E4M3 ? 1 : 0;
}

// The 64-byte header of every message, every backend.
struct MessageHeader {
  std::uint64_t seq;            //  0: published last (release); odd = being
                                //     written; only grows
  std::uint64_t deployment_id;  //  8: must equal the receiver's
  std::uint64_t ticket;         // 16: request: its own seq; reply: the
                                //     request's ticket (echoed)
  std::uint16_t kind;           // 24: MessageKind
  std::uint16_t hidden_dtype;   // 26: HiddenDtype
  std::uint32_t sender;         // 28: sender endpoint == the slot's owner
  std::uint32_t layer;          // 32: model layer
  std::uint32_t micro_batch;    // 36: == the slot's channel
  std::uint32_t num_tokens;     // 40: rows of the payload in use
  std::uint32_t reserved[4];    // 44: zero (covered by the checksum)
  std::uint32_t checksum;       // 60: FNV-1a 32 of bytes [0, 60)
};
static_assert(sizeof(MessageHeader) == 64, "MessageHeader must be 64 bytes");
static_assert(offsetof(MessageHeader, seq) == 0, "seq first");
static_assert(offsetof(MessageHeader, kind) == 24, "layout");
static_assert(offsetof(MessageHeader, num_tokens) == 40, "layout");
static_assert(offsetof(MessageHeader, checksum) == 60, "checksum last");
static_assert(std::is_standard_layout<MessageHeader>::value &&
                  std::is_trivially_copyable<MessageHeader>::value,
              "MessageHeader is plain old data");

// Checksum of a header: FNV-1a over every byte except the checksum field.
EAAS_HOST_DEVICE inline std::uint32_t HeaderChecksum(const MessageHeader& h) {
  return Fnv1a32(reinterpret_cast<const std::uint8_t*>(&h),
                 offsetof(MessageHeader, checksum));
}

inline constexpr std::size_t AlignUp(std::size_t x, std::size_t a) {
  return (x + a - 1) / a * a;
}

// Byte layout of one mailbox slot (see the top of this file).
struct SlotLayout {
  std::size_t hidden_offset;
  std::size_t expert_ids_offset;
  std::size_t gates_offset;
  std::size_t scales_offset;
  std::size_t bytes;  // whole slot, a multiple of 64

  static constexpr SlotLayout Make(std::size_t capacity, std::size_t d,
                                   std::size_t k) {
    SlotLayout l{};
    l.hidden_offset = sizeof(MessageHeader);
    l.expert_ids_offset = AlignUp(l.hidden_offset + capacity * d * 4, 64);
    l.gates_offset = AlignUp(l.expert_ids_offset + capacity * k * 4, 64);
    l.scales_offset = AlignUp(l.gates_offset + capacity * k * 4, 64);
    l.bytes = AlignUp(l.scales_offset + capacity * 4, 64);
    return l;
  }
};

}  // namespace eaas

#endif  // EAAS_FFI_WIRE_FORMAT_H_
