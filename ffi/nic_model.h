// A software NIC that executes mlx5 send-queue work requests, so the host and
// GPU side of the `ibgda` transport (ffi/mlx5_wqe.h) can be tested without
// ConnectX hardware. It executes what the WQEs say and nothing else.
//
// == What it models ==
// A NIC (one protection domain) owns memory regions and RC queue pairs.
//  * Region: a registered range [addr, addr + length) of this process's memory
//    (the caller's buffer, e.g. a shared-memory mailbox), with an lkey, an
//    rkey and ibverbs access flags. Local reads (the gather of an RDMA WRITE)
//    are always allowed, as in verbs; remote writes need kAccessRemoteWrite.
//    lkey != rkey, and keys are unique in the process (ConnectX uses one key
//    for both, per device): stricter than hardware, so a transport that sends
//    its local key, or its own region's rkey, as the peer's rkey fails here.
//  * QP: RC, states RESET/INIT/RTR/RTS/ERR (ibv_qp_state values), connected
//    to a peer QP of the same or another NIC of this process, or of a NIC in
//    another process across a TCP link (below). Its doorbell
//    record, send queue (2^n 64-byte basic blocks) and completion queue (2^m
//    mlx5_cqe64, one CQ per QP) live in one POSIX shared-memory segment
//    (QueueLayout) that another process (the transport's FFI handler, later
//    a GPU kernel through a host mapping) maps by name, writes WQEs into,
//    rings through the doorbell record, and polls CQEs from. The model reads
//    the doorbell record only (a BlueFlame doorbell is a latency shortcut
//    that carries nothing the record does not), so posting is steps 1-3 of
//    "Posting" in mlx5_wqe.h.
//
// == Progress ==  (nic_model.cc)
// Progress() is what the NIC does when it looks at its queues: for each QP
// whose doorbell record moved, it copies each new WQE out of the send queue
// once (a writer cannot change it between check and use), validates it
// completely (nic_wqe_check.cc) and, only if valid, snapshots the bytes to
// write; then it places bytes in the peer's region, and writes CQEs. Tests
// call Progress() directly; Start() runs it on a thread.
//
// == Validation ==  (nic_wqe_check.cc; every violation -> an error CQE)
// A violation produces an MLX5_CQE_REQ_ERR CQE (always, signalled or not,
// as the IB spec requires of errors) whose syndrome is the PRM's for the
// class of error and whose vendor syndrome is the model's own reason
// (Violation, below: tests check the exact rule), and moves the QP to ERR.
// WQEs posted after that, and those in flight behind a failed one, complete
// with MLX5_CQE_SYNDROME_WR_FLUSH_ERR. A rejected WQE writes nothing: all
// checks run before the first byte is placed, and placement only touches
// ranges that passed the bounds checks.
//
// == Ordering and faults ==  (Faults)
// Accepted WQEs go to the QP's in-flight list in send-queue order. Bytes are
// placed in chunks of kChunkBytes (aligned to the destination address, so an
// aligned 8-byte sequence word is one chunk, as a PCIe write keeps it whole).
// Without faults, chunks are placed in order at once. The knobs:
//  * latency_us: a WQE's bytes are placed no earlier than that after it was
//    taken from the send queue;
//  * reorder: each placement picks a random chunk of any placeable WQE. What
//    mlx5 allows: WQEs without the fence flag may be placed in any order and
//    byte ranges in any order; a WQE with MLX5_WQE_CTRL_FENCE starts only
//    once every earlier WQE of its QP is placed, and the WQEs after it start
//    after it (in-order issue): they wait with it, then may interleave with it.
//    CQEs are still written in send-queue order (a WQE completes only after
//    every earlier one);
//  * loss_permille: each chunk transmission is lost with that probability and
//    retransmitted (after latency_us); a WQE whose transmissions are lost
//    more than retry_count times fails with TRANSPORT_RETRY_EXC_ERR (bytes it
//    placed before stay placed, as on hardware);
//  * link_down: every transmission is lost (so, after retry_count attempts,
//    retry exceeded on every WQE in flight).
// Bounded randomness: one std::mt19937_64 per NIC, seeded by Faults::seed.
//
// == Not modelled (left for later) ==
//  * Receive queues: RDMA WRITE with immediate is validated like a WRITE and
//    then completes with RNR_RETRY_EXC_ERR, what hardware reports when the
//    responder never has a receive WQE for it. Nothing is placed.
//  * WQEs of more than one BB (scatter lists, long inline data): the model's
//    QPs have a max WQE size of one BB (max_send_sge 1, max_inline_data 28),
//    what mlx5_wqe.h writes; larger DS is a local QP operation error.
//  * CQ overrun (the consumer's CQ doorbell record is not read).
//  * Over a link: RDMA READ/atomics, WRITE with immediate (still the local
//    RNR error), NAK-sequence-error (a gap is repaired by the timeout only),
//    loss of ACK/NAK frames, reconnecting a link, more than one connection
//    per requester QP, any address but IPv4.
//
// == Two NICs joined by TCP ==  (nic_link.cc: frames, sockets; nic_model.cc:
// "over a link": what they mean)
// A NIC listens on an IPv4 address (Listen: ephemeral port; 127.0.0.1, or a
// network namespace's veth address in the two-host tests) and accepts frames
// only on connections that began with its random link key (nic_link.h). ConnectQp moves a QP
// INIT -> RTR with a peer QP (peer address, peer QPN) of a NIC that is
// usually in another process; the requester QP opens its own connection
// (port 0: a responder-only QP). ValidateWqe then makes only the requester's
// checks (WqeContext::OverLink); each valid WRITE gets ceil(size / kMtu)
// consecutive PSNs, and each packet goes out as a WRITE frame (FrameHeader:
// magic, version, kind, sender/destination QPN, PSN, rkey, remote address,
// length; payload). The responder checks a frame exactly like a local write
// (CheckRemoteWrite: rkey, access, bounds incl. wrap; QP in RTR/RTS, sent by
// its peer QP) and accepts the next PSN only: it places the bytes and ACKs,
// or NAKs with the Violation (-> the requester's error CQE, syndrome and all);
// duplicates are re-acked and never placed twice; later PSNs are dropped
// (with the responder's reorder fault: placed now, acked cumulatively once
// the gap is filled, as mlx5 may place unfenced writes out of order). The
// requester completes WQEs in order once all their PSNs are acked; a fenced
// WQE is not sent before every earlier one is acked. Without an ACK for
// kRetransmitTimeout (+ 2 x latency_us) it goes back to the oldest unacked
// PSN (go-back-N); retry_count timeouts in a row fail that WQE with
// TRANSPORT_RETRY_EXC_ERR and flush the rest (QP to ERR), which is what a
// closed connection or link_down comes to. loss_permille and link_down drop
// WRITE frames at the sender. A malformed frame (magic, version, kind,
// length > kMtu, payload on ACK/NAK) or one for an unknown QPN closes the
// connection; nothing is placed outside a region that passed the checks.
#ifndef EAAS_FFI_NIC_MODEL_H_
#define EAAS_FFI_NIC_MODEL_H_

#include <poll.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "mlx5_wqe.h"
#include "nic_link.h"

namespace eaas {
namespace nic {

// CQE syndromes (the PRM's, rdma-core's MLX5_CQE_SYNDROME_*; own names, so
// this header does not depend on which mlx5dv.h is installed).
enum Syndrome : std::uint8_t {
  kSyndromeLocalLength = 0x01,
  kSyndromeLocalQpOp = 0x02,
  kSyndromeLocalProt = 0x04,
  kSyndromeWrFlush = 0x05,
  kSyndromeRemoteAccess = 0x13,
  kSyndromeTransportRetryExceeded = 0x15,
  kSyndromeRnrRetryExceeded = 0x16,
};

// Why the model rejected a WQE: an error CQE's vendor syndrome (mirrored by
// eaas_jax/transport/nic_model.py: Violation, SYNDROMES).
enum class Violation : std::uint8_t {
  kNone = 0,
  kQpState,         // QP not in RTS (RESET/INIT/RTR)               local QP op
  kDoorbell,        // doorbell record backwards / ahead by > SQ size local QP op
  kWqeIndex,        // ctrl WQE index != the send queue's position   local QP op
  kQpn,             // ctrl QPN != the QP's                          local QP op
  kOpcode,          // not RDMA WRITE (with immediate)                local QP op
  kDsZero,          // DS 0                                          local QP op
  kDsTooLarge,      // DS over one BB (the QPs' max WQE size)         local QP op
  kDsMismatch,      // DS disagrees with the segments                local QP op
  kInlineTooLong,   // inline byte count > kMaxInlineBytes           local length
  kBadLkey,         // data segment lkey not registered              local protection
  kLocalBounds,     // gather range outside the lkey's region        local protection
  kPeerGone,        // peer QP missing / not in RTR or RTS           retry exceeded
  kBadRkey,         // rkey not registered at the peer               remote access
  kRemoteAccess,    // peer region without remote-write access       remote access
  kRemoteBounds,    // target range outside the rkey's region        remote access
  kNoReceiveQueue,  // WRITE with immediate: no receive WQE (model)  RNR retry exceeded
  kRetryExceeded,   // every transmission lost retry_count + 1 times  retry exceeded
  kFlushed,         // posted / in flight after the QP went to ERR   WR flush
};

// ibverbs access flags (IBV_ACCESS_*).
enum Access : std::uint32_t {
  kAccessLocalWrite = 1,
  kAccessRemoteWrite = 2,
  kAccessRemoteRead = 4,
};

// ibv_qp_state values.
enum class QpState : std::uint32_t { kReset = 0, kInit = 1, kRtr = 2, kRts = 3, kErr = 6 };

inline constexpr std::size_t kChunkBytes = 64;
// Every WQE the model executes is one send-queue basic block.
inline constexpr std::size_t kWqeBytes = 64;
static_assert(kWqeBytes == mlx5::MLX5_SEND_WQE_BB, "one BB");

// The shared-memory segment of a QP: this header, the doorbell record, the
// send queue, the CQ. The creator writes the header and publishes `magic`
// last; a mapper checks every field against the segment's size.
inline constexpr std::uint64_t kQueueMagic = 0x315155514349414eull;  // "NAICQUQ1"
struct QueueLayout {
  std::uint64_t magic;
  std::uint32_t qpn;
  std::uint32_t log_sq_bbs;      // send queue: 2^log_sq_bbs BBs
  std::uint32_t log_cq_entries;  // CQ: 2^log_cq_entries CQEs
  std::uint32_t reserved;
  std::uint64_t dbrec_offset;    // 2 x u32 big-endian (MLX5_RCV_DBR, MLX5_SND_DBR)
  std::uint64_t sq_offset;
  std::uint64_t cq_offset;
  std::uint64_t total_bytes;
  std::uint8_t pad[8];
};
static_assert(sizeof(QueueLayout) == 64, "queue layout header");
// Offsets and size of a segment with these queue sizes.
QueueLayout MakeQueueLayout(std::uint32_t qpn, std::uint32_t log_sq_bbs, std::uint32_t log_cq_entries);

struct Faults {
  std::int64_t latency_us = 0;
  bool reorder = false;
  std::uint32_t loss_permille = 0;
  bool link_down = false;
  std::uint32_t retry_count = 7;  // ibv_qp_attr.retry_cnt's largest value
  std::uint64_t seed = 1;
};

struct Region {
  std::uint8_t* addr;
  std::uint64_t length;
  std::uint32_t lkey;
  std::uint32_t rkey;
  std::uint32_t access;
};

using Clock = std::chrono::steady_clock;

// One WQE taken from the send queue, until its CQE (or its turn to complete
// without one) comes: a write still being placed, or a failure.
struct InFlight {
  std::uint16_t wqe_index = 0;
  std::uint8_t opcode = 0;
  bool signaled = false;
  bool fenced = false;
  Violation why = Violation::kNone;  // kNone: a write
  std::uint8_t* dst = nullptr;       // inside a peer region (checked)
  std::vector<std::uint8_t> bytes;   // the WRITE's data, read when it was taken
  std::vector<std::size_t> unplaced;  // chunk offsets into `bytes` still to place;
                                      // over a link: packet offsets not acked yet
  std::uint64_t raddr = 0;           // over a link: where, checked by the responder
  std::uint32_t rkey = 0;
  std::uint32_t psn0 = 0;            // over a link: PSN of the packet at offset 0
  Clock::time_point due{};           // no placement before
  std::uint32_t losses = 0;
};

// Everything ValidateWqe needs to know about the QP and the fabric.
class WqeContext {
 public:
  virtual ~WqeContext() = default;
  virtual const Region* LocalByLkey(std::uint32_t lkey) const = 0;
  // The peer QP's region for `rkey`; *peer_ok false when the peer QP is
  // missing or not in RTR/RTS (then the result is nullptr).
  virtual const Region* RemoteByRkey(std::uint32_t rkey, bool* peer_ok) const = 0;
  // The peer is across a TCP link: its responder checks the remote side.
  virtual bool OverLink() const { return false; }
};

// A WQE that passed validation: what to write where.
struct ValidWrite {
  bool signaled;
  bool fenced;
  std::uint8_t* dst;        // nullptr over a link
  std::uint64_t raddr;
  std::uint32_t rkey;
  const std::uint8_t* src;  // in a local region or in `wqe` (inline)
  std::uint32_t size;
};

// Checks the one-BB WQE `wqe` (a private copy) taken at send-queue position
// `expected_index` of QP `qpn` (in RTS). Returns kNone and fills *out, or the
// first rule it breaks. Local rules come before remote ones, as on hardware
// (the requester checks its WQE before it sends a packet).
Violation ValidateWqe(const std::uint8_t (&wqe)[kWqeBytes], std::uint16_t expected_index,
                      std::uint32_t qpn, const WqeContext& ctx, ValidWrite* out);

// The responder's checks of a WRITE of `size` bytes at `raddr` to the
// region of its rkey (nullptr: not registered): kNone, kBadRkey,
// kRemoteAccess or kRemoteBounds. The same for a peer in this process and
// one across a link.
Violation CheckRemoteWrite(const Region* remote, std::uint64_t raddr, std::uint64_t size);

// The PRM's syndrome for a violation.
std::uint8_t SyndromeOf(Violation v);

class Nic;

struct Qp {
  std::uint32_t qpn = 0;
  QpState state = QpState::kReset;
  std::string segment_name;
  std::uint8_t* base = nullptr;  // the mapped segment
  QueueLayout layout{};
  std::uint32_t sq_consumer = 0;  // WQEs taken (mod 2^16 is the next index)
  std::uint32_t cq_producer = 0;  // CQEs written
  std::int64_t peer_nic = -1;
  std::uint32_t peer_qpn = 0;
  std::deque<InFlight> in_flight;
  // A peer across a TCP link (ConnectQp): `link` carries this QP's WRITE
  // frames out and their ACK/NAKs back (nullptr: a responder-only QP).
  bool remote = false;
  std::unique_ptr<Conn> link;
  std::uint32_t next_psn = 0;  // requester: PSN for the next packet taken
  std::uint32_t send_psn = 0;  // requester: next PSN to transmit (go-back-N rewinds it)
  std::uint32_t una_psn = 0;   // requester: oldest PSN not acked
  std::uint32_t timeouts = 0;  // requester: retransmission timeouts without progress
  Clock::time_point rto_due{};
  std::uint32_t expected_psn = 0;  // responder: everything before it is placed
  std::set<std::uint32_t> placed_ahead;  // responder, reorder fault: PSNs placed beyond it

  ~Qp();
  volatile std::uint32_t* dbrec() const {
    return reinterpret_cast<volatile std::uint32_t*>(base + layout.dbrec_offset);
  }
  std::uint8_t* sq() const { return base + layout.sq_offset; }
  std::uint8_t* cq() const { return base + layout.cq_offset; }
};

// A NIC. All NICs of the process share one mutex (ModelMutex): a write on
// one NIC's QP reads the peer NIC's regions and QPs, and one lock cannot be
// taken in two orders. The methods expect it held, except Start/Stop.
class Nic {
 public:
  explicit Nic(std::int64_t id) : id_(id) {}
  ~Nic();
  Nic(const Nic&) = delete;
  Nic& operator=(const Nic&) = delete;

  std::int64_t id() const { return id_; }
  void SetFaults(const Faults& f);
  // Returns "" and the keys, or why not.
  std::string RegisterRegion(void* addr, std::uint64_t length, std::uint32_t access, std::uint32_t* lkey,
                             std::uint32_t* rkey);
  std::string CreateQp(std::uint32_t log_sq_bbs, std::uint32_t log_cq_entries, std::uint32_t* qpn);
  // ibv_modify_qp's state machine: RESET->INIT->RTR (names the peer)->RTS,
  // any->ERR, any->RESET (empties the queues).
  std::string ModifyQp(std::uint32_t qpn, QpState to, std::int64_t peer_nic, std::uint32_t peer_qpn);
  // Listens on the IPv4 address `host` (ephemeral port) for peer NICs'
  // links; *key: the link key a connection must say first (nic_link.h).
  std::string Listen(const std::string& host, std::uint16_t* port, std::uint64_t* key);
  // INIT -> RTR with the peer QP `peer_qpn` of the NIC at the other end of
  // `link` (a connection to its listening port: nic_link.h's Connect, made
  // before taking ModelMutex, as it may block; nullptr: only receive from
  // that QP, send nothing).
  std::string ConnectQp(std::uint32_t qpn, std::unique_ptr<Conn> link, std::uint32_t peer_qpn);
  Qp* FindQp(std::uint32_t qpn);
  const Region* FindLkey(std::uint32_t lkey) const;
  const Region* FindRkey(std::uint32_t rkey) const;

  // Takes new WQEs, places at most `max_chunks` chunks (< 0: no limit) and
  // writes the CQEs that are due. Returns how many chunks and CQEs it did.
  std::int64_t Progress(std::int64_t max_chunks);

  // A thread calling Progress (under ModelMutex): again at once after a
  // round that did work, else once a link has frames (or room) or after
  // `interval_us`, when the doorbell records are read again.
  void Start(std::int64_t interval_us);
  void Stop();

 private:
  void TakeNewWqes(Qp& qp);
  void Enqueue(Qp& qp, InFlight entry);
  bool PlaceOneChunk(Clock::time_point now);
  std::int64_t Complete(Qp& qp);
  void Fail(Qp& qp, std::size_t index, Violation why);
  void WriteCqe(Qp& qp, const InFlight& entry);
  // The link (nic_model.cc, "over a link"): the responder side, and one QP's
  // requester side.
  void ServeLinks();
  bool Respond(Conn& c, const FrameHeader& h, const std::vector<std::uint8_t>& payload);
  void DriveLink(Qp& qp, Clock::time_point now);
  void OnReply(Qp& qp, const FrameHeader& h, Clock::time_point now);
  // The sockets the progress thread waits on between rounds.
  std::vector<pollfd> LinkFds() const;

  std::int64_t id_;
  Faults faults_;
  std::mt19937_64 rng_{1};
  std::map<std::uint32_t, Region> regions_;  // by lkey
  std::map<std::uint32_t, std::uint32_t> rkeys_;  // rkey -> lkey
  std::map<std::uint32_t, std::unique_ptr<Qp>> qps_;
  std::uint32_t next_qpn_ = 0x100;
  int listen_fd_ = -1;
  std::uint64_t link_key_ = 0;
  std::vector<std::unique_ptr<Conn>> accepted_;
  std::thread thread_;
  std::atomic<bool> running_{false};
};

// The table of NICs by id (the C ABI's handles); ModelMutex held.
std::mutex& ModelMutex();
std::int64_t AddNic();
Nic* FindNic(std::int64_t id);  // nullptr when there is none
// Takes the NIC out of the table; destroy it after releasing ModelMutex
// (its progress thread takes the mutex).
std::unique_ptr<Nic> RemoveNic(std::int64_t id);

}  // namespace nic
}  // namespace eaas

#endif  // EAAS_FFI_NIC_MODEL_H_
