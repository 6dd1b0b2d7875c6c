// The software NIC's queues and progress engine (see nic_model.h): QP
// segments, the doorbell record, taking WQEs, placing bytes under the fault
// knobs, and writing CQEs.
#include "nic_model.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "shm_segment.h"

namespace eaas {
namespace nic {
namespace {

namespace m = eaas::mlx5;

std::map<std::int64_t, std::unique_ptr<Nic>>& NicTable() {
  static auto* table = new std::map<std::int64_t, std::unique_ptr<Nic>>();
  return *table;
}

// The fabric as one QP's WQE sees it: its NIC's regions, its peer's.
class QpContext : public WqeContext {
 public:
  QpContext(const Nic& nic, const Qp& qp) : nic_(nic), qp_(qp) {}
  const Region* LocalByLkey(std::uint32_t lkey) const override { return nic_.FindLkey(lkey); }
  const Region* RemoteByRkey(std::uint32_t rkey, bool* peer_ok) const override {
    Nic* peer = FindNic(qp_.peer_nic);
    const Qp* peer_qp = peer == nullptr ? nullptr : peer->FindQp(qp_.peer_qpn);
    *peer_ok = peer_qp != nullptr && (peer_qp->state == QpState::kRtr || peer_qp->state == QpState::kRts);
    return *peer_ok ? peer->FindRkey(rkey) : nullptr;
  }
  bool OverLink() const override { return qp_.remote; }

 private:
  const Nic& nic_;
  const Qp& qp_;
};

// Chunk offsets of a write of `size` bytes to `dst`: boundaries at multiples
// of kChunkBytes of the destination address.
std::vector<std::size_t> Chunks(const std::uint8_t* dst, std::size_t size) {
  std::vector<std::size_t> out;
  const auto a = reinterpret_cast<std::uintptr_t>(dst);
  for (std::size_t off = 0; off < size; off = static_cast<std::size_t>((a + off) / kChunkBytes + 1) * kChunkBytes - a) {
    out.push_back(off);
  }
  return out;
}

std::size_t ChunkEnd(const InFlight& e, std::size_t off) {
  const auto a = reinterpret_cast<std::uintptr_t>(e.dst);
  return std::min(e.bytes.size(), static_cast<std::size_t>(((a + off) / kChunkBytes + 1) * kChunkBytes - a));
}

bool Done(const InFlight& e) { return e.why != Violation::kNone || e.unplaced.empty(); }

// Before placing a chunk: the chunks placed before it become visible to other
// CPUs first (a receiver that acquire-loads a sequence word placed by a later
// chunk then sees the payload placed by earlier ones), as PCIe keeps a NIC's
// posted writes in order. Free on x86; a barrier on weakly ordered CPUs.
void PlacementBarrier() { std::atomic_thread_fence(std::memory_order_release); }

// PSN order with wrap-around: a before b.
bool Before(std::uint32_t a, std::uint32_t b) { return static_cast<std::int32_t>(a - b) < 0; }

// Packets a requester keeps unacked at most, and its retransmission timeout:
// generous, so a loaded machine's scheduling delay is not taken for loss
// (retry_count such timeouts without progress fail a WQE).
constexpr std::uint32_t kWindow = 64;
constexpr auto kRetransmitTimeout = std::chrono::milliseconds(10);
// How many times a round reads a responder link's socket while frames keep
// coming (Pump reads a few frames at a time): up to 256 MTU frames, 1 MiB.
constexpr int kBurstsPerRound = 64;

// The PSN of the packet at offset `off` of a write over a link.
std::uint32_t PsnAt(const InFlight& e, std::size_t off) { return e.psn0 + static_cast<std::uint32_t>(off / kMtu); }

}  // namespace

std::mutex& ModelMutex() {
  static auto* mu = new std::mutex();
  return *mu;
}

Nic* FindNic(std::int64_t id) {
  auto it = NicTable().find(id);
  return it == NicTable().end() ? nullptr : it->second.get();
}

QueueLayout MakeQueueLayout(std::uint32_t qpn, std::uint32_t log_sq_bbs, std::uint32_t log_cq_entries) {
  QueueLayout l{};
  l.magic = kQueueMagic;
  l.qpn = qpn;
  l.log_sq_bbs = log_sq_bbs;
  l.log_cq_entries = log_cq_entries;
  l.dbrec_offset = sizeof(QueueLayout);
  l.sq_offset = l.dbrec_offset + 64;  // the record gets a cache line of its own
  l.cq_offset = l.sq_offset + (std::uint64_t{m::MLX5_SEND_WQE_BB} << log_sq_bbs);
  l.total_bytes = l.cq_offset + (std::uint64_t{sizeof(m::mlx5_cqe64)} << log_cq_entries);
  return l;
}

Qp::~Qp() {
  if (base != nullptr) {
    munmap(base, layout.total_bytes);
    shm_unlink(segment_name.c_str());
  }
}

Nic::~Nic() {
  Stop();
  if (listen_fd_ >= 0) close(listen_fd_);
}

void Nic::SetFaults(const Faults& f) {
  faults_ = f;
  rng_.seed(f.seed);
}

std::string Nic::RegisterRegion(void* addr, std::uint64_t length, std::uint32_t access, std::uint32_t* lkey,
                                std::uint32_t* rkey) {
  if (addr == nullptr || length == 0) return "a region needs an address and a length";
  if (reinterpret_cast<std::uintptr_t>(addr) > UINTPTR_MAX - length) return "the region wraps around";
  if (access & ~std::uint32_t{kAccessLocalWrite | kAccessRemoteWrite | kAccessRemoteRead}) {
    return "unknown access flags";
  }
  // Two keys per region, neither 0 (rdma-core's "no key"), unique in the
  // process (ConnectX's are per device): a sender that names its own region
  // where the peer's belongs is caught.
  static std::uint32_t next_key = 1;
  const std::uint32_t n = next_key++;
  Region r{static_cast<std::uint8_t*>(addr), length, (n << 8) | 0x11, (n << 8) | 0x22, access};
  regions_[r.lkey] = r;
  rkeys_[r.rkey] = r.lkey;
  *lkey = r.lkey;
  *rkey = r.rkey;
  return "";
}

const Region* Nic::FindLkey(std::uint32_t lkey) const {
  auto it = regions_.find(lkey);
  return it == regions_.end() ? nullptr : &it->second;
}

const Region* Nic::FindRkey(std::uint32_t rkey) const {
  auto it = rkeys_.find(rkey);
  return it == rkeys_.end() ? nullptr : FindLkey(it->second);
}

Qp* Nic::FindQp(std::uint32_t qpn) {
  auto it = qps_.find(qpn);
  return it == qps_.end() ? nullptr : it->second.get();
}

std::string Nic::CreateQp(std::uint32_t log_sq_bbs, std::uint32_t log_cq_entries, std::uint32_t* qpn) {
  // 2^15 BBs at most: the 16-bit WQE index must tell a full queue from an empty one.
  if (log_sq_bbs > 15 || log_cq_entries > 22) return "queue sizes: log_sq_bbs <= 15, log_cq_entries <= 22";
  auto qp = std::make_unique<Qp>();
  qp->qpn = next_qpn_++;
  qp->layout = MakeQueueLayout(qp->qpn, log_sq_bbs, log_cq_entries);
  // pid and NIC id make the name unique to this process and NIC.
  qp->segment_name = "/eaas-nic-" + std::to_string(getpid()) + "-" + std::to_string(id_) + "-" +
                     std::to_string(qp->qpn);
  const int fd = shm_open(qp->segment_name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return "cannot create NIC queue segment " + qp->segment_name + ": " + ErrnoText(errno);
  void* base = nullptr;
  const std::string failed = SizeAndMapSegment(fd, qp->segment_name, "NIC queue segment", qp->layout.total_bytes, &base);
  if (!failed.empty()) return failed;
  qp->base = static_cast<std::uint8_t*>(base);
  // CQEs start invalid (what the driver does to a new CQ).
  for (std::uint32_t i = 0; i < (1u << log_cq_entries); ++i) {
    qp->cq()[i * sizeof(m::mlx5_cqe64) + 63] = static_cast<std::uint8_t>(m::MLX5_CQE_INVALID << 4);
  }
  QueueLayout header = qp->layout;
  header.magic = 0;
  std::memcpy(qp->base, &header, sizeof(header));
  __atomic_store_n(reinterpret_cast<std::uint64_t*>(qp->base), kQueueMagic, __ATOMIC_RELEASE);
  *qpn = qp->qpn;
  qps_[qp->qpn] = std::move(qp);
  return "";
}

std::string Nic::ModifyQp(std::uint32_t qpn, QpState to, std::int64_t peer_nic, std::uint32_t peer_qpn) {
  Qp* qp = FindQp(qpn);
  if (qp == nullptr) return "no QP " + std::to_string(qpn);
  const QpState from = qp->state;
  const bool ok = to == QpState::kErr || to == QpState::kReset || (from == QpState::kReset && to == QpState::kInit) ||
                  (from == QpState::kInit && to == QpState::kRtr) || (from == QpState::kRtr && to == QpState::kRts);
  if (!ok) return "QP state transition not allowed";
  if (to == QpState::kRtr) {
    qp->remote = false;
    qp->peer_nic = peer_nic;
    qp->peer_qpn = peer_qpn;
  }
  if (to == QpState::kReset) {
    // A QP back in RESET starts over: empty queues, CQEs invalid, record 0.
    const QueueLayout l = qp->layout;
    std::memset(qp->base + l.dbrec_offset, 0, l.total_bytes - l.dbrec_offset);
    for (std::uint32_t i = 0; i < (1u << l.log_cq_entries); ++i) {
      qp->cq()[i * sizeof(m::mlx5_cqe64) + 63] = static_cast<std::uint8_t>(m::MLX5_CQE_INVALID << 4);
    }
    qp->sq_consumer = qp->cq_producer = 0;
    qp->in_flight.clear();
    qp->peer_nic = -1;
    qp->remote = false;
    qp->link.reset();
    qp->next_psn = qp->send_psn = qp->una_psn = qp->expected_psn = qp->timeouts = 0;
    qp->placed_ahead.clear();
  }
  if (to == QpState::kErr) {
    for (auto& e : qp->in_flight) {
      if (!Done(e)) e.why = Violation::kFlushed;
    }
  }
  qp->state = to;
  return "";
}

// --- taking WQEs ---------------------------------------------------------------

void Nic::TakeNewWqes(Qp& qp) {
  if (qp.state == QpState::kReset) return;  // a QP in RESET does not look at its queue
  const std::uint32_t sq_size = 1u << qp.layout.log_sq_bbs;
  const std::uint16_t producer =
      static_cast<std::uint16_t>(m::Bswap32(__atomic_load_n(&qp.dbrec()[m::MLX5_SND_DBR], __ATOMIC_ACQUIRE)));
  const auto pending = static_cast<std::uint16_t>(producer - static_cast<std::uint16_t>(qp.sq_consumer));
  if (pending == 0) return;
  if (pending > sq_size) {
    // Backwards, or past WQEs not taken yet: nothing in the queue can be
    // trusted. One error for the position; a QP in ERR just stops looking.
    if (qp.state != QpState::kErr) {
      InFlight e;
      e.wqe_index = static_cast<std::uint16_t>(qp.sq_consumer);
      e.why = Violation::kDoorbell;
      Enqueue(qp, std::move(e));
    }
    return;
  }
  for (std::uint16_t i = 0; i < pending; ++i) {
    const auto index = static_cast<std::uint16_t>(qp.sq_consumer);
    std::uint8_t wqe[kWqeBytes];
    std::memcpy(wqe, qp.sq() + (index & (sq_size - 1)) * kWqeBytes, kWqeBytes);
    ++qp.sq_consumer;
    InFlight e;
    e.wqe_index = index;
    e.opcode = wqe[0 + 3];  // opcode: low byte of the big-endian first word
    if (qp.state == QpState::kErr) {
      e.why = Violation::kFlushed;
    } else if (qp.state != QpState::kRts) {
      e.why = Violation::kQpState;
    } else {
      ValidWrite w{};
      e.why = ValidateWqe(wqe, index, qp.qpn, QpContext(*this, qp), &w);
      if (e.why == Violation::kNone) {
        e.signaled = w.signaled;
        e.fenced = w.fenced;
        e.dst = w.dst;
        e.raddr = w.raddr;
        e.rkey = w.rkey;
        e.bytes.assign(w.src, w.src + w.size);
        if (qp.remote) {
          // Packets of kMtu bytes, one PSN each, acked in PSN order.
          for (std::size_t off = 0; off < w.size; off += kMtu) e.unplaced.push_back(off);
          e.psn0 = qp.next_psn;
          qp.next_psn += static_cast<std::uint32_t>(e.unplaced.size());
        } else {
          e.unplaced = Chunks(w.dst, w.size);
        }
        e.due = Clock::now() + std::chrono::microseconds(faults_.latency_us);
      }
    }
    Enqueue(qp, std::move(e));
  }
}

// Appends a taken WQE; a failed one moves the QP to ERR, which flushes the
// writes behind it (there are none yet: they come after it).
void Nic::Enqueue(Qp& qp, InFlight entry) {
  const bool failed = entry.why != Violation::kNone && entry.why != Violation::kFlushed;
  qp.in_flight.push_back(std::move(entry));
  if (failed) qp.state = QpState::kErr;
}

// Fails in-flight entry `index` of `qp` (retry exceeded) and flushes every
// entry behind it; the QP goes to ERR.
void Nic::Fail(Qp& qp, std::size_t index, Violation why) {
  qp.in_flight[index].why = why;
  for (std::size_t i = index + 1; i < qp.in_flight.size(); ++i) {
    if (!Done(qp.in_flight[i])) qp.in_flight[i].why = Violation::kFlushed;
  }
  qp.state = QpState::kErr;
}

// --- placing bytes ---------------------------------------------------------------

// Places one chunk of one placeable write (any QP), or returns false when no
// chunk is due. In order without the reorder fault; else a random chunk of a
// random placeable write, the fence rule being the only constraint.
bool Nic::PlaceOneChunk(Clock::time_point now) {
  struct Candidate {
    Qp* qp;
    std::size_t index;
  };
  std::vector<Candidate> candidates;
  for (auto& entry : qps_) {
    Qp* qp = entry.second.get();
    if (qp->remote) continue;  // its writes travel over the link (DriveLink)
    bool earlier_pending = false;
    for (std::size_t i = 0; i < qp->in_flight.size(); ++i) {
      const InFlight& e = qp->in_flight[i];
      if (Done(e)) continue;
      // A fenced write starts once every earlier one is placed; the ones
      // after it start after it (the send queue is issued in order), so they
      // wait with it, then may interleave with it.
      if (e.fenced && earlier_pending) break;
      if (e.due <= now) candidates.push_back({qp, i});
      earlier_pending = true;
      if (!faults_.reorder) break;
    }
  }
  if (candidates.empty()) return false;
  const Candidate c = faults_.reorder ? candidates[rng_() % candidates.size()] : candidates.front();
  InFlight& e = c.qp->in_flight[c.index];
  const std::size_t pick = faults_.reorder ? rng_() % e.unplaced.size() : 0;
  const bool lost = faults_.link_down || (faults_.loss_permille > 0 && rng_() % 1000 < faults_.loss_permille);
  if (lost) {
    // Retransmitted after a timeout (the added latency), or given up.
    if (++e.losses > faults_.retry_count) {
      Fail(*c.qp, c.index, Violation::kRetryExceeded);
    } else {
      e.due = now + std::chrono::microseconds(faults_.latency_us);
    }
    return true;
  }
  const std::size_t off = e.unplaced[pick];
  PlacementBarrier();
  std::memcpy(e.dst + off, e.bytes.data() + off, ChunkEnd(e, off) - off);
  e.unplaced.erase(e.unplaced.begin() + static_cast<std::ptrdiff_t>(pick));
  return true;
}

// --- completions -----------------------------------------------------------------

// Writes the CQEs of the finished entries at the head of the QP's list, in
// send-queue order. Returns how many entries it retired.
std::int64_t Nic::Complete(Qp& qp) {
  std::int64_t n = 0;
  while (!qp.in_flight.empty() && Done(qp.in_flight.front())) {
    const InFlight& e = qp.in_flight.front();
    if (e.why != Violation::kNone || e.signaled) WriteCqe(qp, e);
    qp.in_flight.pop_front();
    ++n;
  }
  return n;
}

// CQE number cq_producer, owner bit = the lap's parity; op_own is stored
// last (release), so a consumer that acquire-loads it sees the rest.
void Nic::WriteCqe(Qp& qp, const InFlight& e) {
  const std::uint32_t log = qp.layout.log_cq_entries;
  std::uint8_t* slot = qp.cq() + (qp.cq_producer & ((1u << log) - 1)) * sizeof(m::mlx5_cqe64);
  const auto owner = static_cast<std::uint8_t>((qp.cq_producer >> log) & 1);
  ++qp.cq_producer;
  alignas(8) std::uint8_t cqe[64] = {};
  const std::uint32_t opcode_qpn = m::Bswap32((std::uint32_t{e.opcode} << 24) | qp.qpn);
  const std::uint16_t counter = m::Bswap16(e.wqe_index);
  std::uint8_t cqe_opcode = m::MLX5_CQE_REQ;
  if (e.why != Violation::kNone) {
    cqe_opcode = m::MLX5_CQE_REQ_ERR;
    cqe[offsetof(m::mlx5_err_cqe, vendor_err_synd)] = static_cast<std::uint8_t>(e.why);
    cqe[offsetof(m::mlx5_err_cqe, syndrome)] = SyndromeOf(e.why);
  }
  std::memcpy(cqe + offsetof(m::mlx5_cqe64, sop_drop_qpn), &opcode_qpn, 4);
  std::memcpy(cqe + offsetof(m::mlx5_cqe64, wqe_counter), &counter, 2);
  std::memcpy(slot, cqe, 63);
  __atomic_store_n(slot + 63, static_cast<std::uint8_t>((cqe_opcode << 4) | owner), __ATOMIC_RELEASE);
}

std::int64_t Nic::Progress(std::int64_t max_chunks) {
  ServeLinks();
  for (auto& entry : qps_) TakeNewWqes(*entry.second);
  std::int64_t done = 0;
  const auto now = Clock::now();
  for (auto& entry : qps_) {
    if (entry.second->remote) DriveLink(*entry.second, now);
  }
  for (std::int64_t placed = 0; max_chunks < 0 || placed < max_chunks; ++placed) {
    if (!PlaceOneChunk(now)) break;
    ++done;
  }
  for (auto& entry : qps_) done += Complete(*entry.second);
  return done;
}

// --- over a link -------------------------------------------------------------------
// A requester sends each packet of a write as a WRITE frame with the next
// PSN, at most kWindow unacked; fenced writes wait until every earlier one is
// acked. The responder accepts the PSN it expects: it checks the frame as a
// local write is checked (QP, rkey, access, bounds), places the bytes and
// ACKs, or NAKs it with the reason; an older PSN (a duplicate) is re-acked,
// not placed again; a newer one is dropped (with the reorder fault: placed
// now, acked once the gap is filled). A reply to the oldest unacked PSN is the
// only one that counts (ACKs are cumulative). Without progress for
// kRetransmitTimeout the requester goes back to the oldest unacked PSN
// (go-back-N); retry_count timeouts in a row fail that write with retry
// exceeded. Loss (loss_permille, link_down) drops WRITE frames at the sender.

std::string Nic::Listen(const std::string& host, std::uint16_t* port, std::uint64_t* key) {
  if (listen_fd_ >= 0) return "the NIC is listening already";
  link_key_ = NewLinkKey();
  *key = link_key_;
  return nic::Listen(host, &listen_fd_, port);
}

std::string Nic::ConnectQp(std::uint32_t qpn, std::unique_ptr<Conn> link, std::uint32_t peer_qpn) {
  Qp* qp = FindQp(qpn);
  if (qp == nullptr) return "no QP " + std::to_string(qpn);
  if (qp->state != QpState::kInit) return "a QP is connected in INIT";
  qp->remote = true;
  qp->link = std::move(link);
  qp->peer_nic = -1;
  qp->peer_qpn = peer_qpn;
  qp->state = QpState::kRtr;
  return "";
}

void Nic::ServeLinks() {
  if (listen_fd_ < 0) return;
  const auto now = std::chrono::steady_clock::now();
  while (auto c = Accept(listen_fd_)) {
    // Unauthenticated connections are few (a peer's HELLO comes with its
    // connect): beyond kMaxPendingLinks the oldest goes, so a flood of idle
    // connections cannot keep a peer out for long. Authenticated ones are
    // the peers' links, kMaxLinks at most.
    std::size_t open = 0, pending = 0;
    Conn* oldest_pending = nullptr;
    for (const auto& a : accepted_) {
      if (a->closed) continue;
      ++open;
      if (a->authenticated) continue;
      ++pending;
      if (oldest_pending == nullptr) oldest_pending = a.get();  // accepted_ is in arrival order
    }
    if (pending >= kMaxPendingLinks) {
      oldest_pending->Close();
      --open;
    }
    if (open >= kMaxLinks + kMaxPendingLinks) continue;  // closed as it goes out of scope
    c->accepted_at = now;
    accepted_.push_back(std::move(c));
  }
  FrameHeader h{};
  std::vector<std::uint8_t> payload;
  for (auto& c : accepted_) {
    // Pump reads a few frames at a time: look again while frames come, so a
    // window of them is taken in one round rather than a few per round.
    for (int burst = 0; burst < kBurstsPerRound && !c->closed; ++burst) {
      Pump(*c);
      Parse p;
      int frames = 0;
      while ((p = NextFrame(*c, &h, &payload)) == Parse::kFrame) {
        ++frames;
        if (!c->authenticated) {  // the first frame: our key, or nothing more
          c->authenticated = IsHello(h, link_key_);
          if (!c->authenticated) break;
          continue;
        }
        if (!Respond(*c, h, payload)) break;
      }
      if (p == Parse::kBad || (p == Parse::kFrame && !c->closed)) {  // not our protocol
        c->Close();
        break;
      }
      if (frames == 0) break;
    }
    if (!c->authenticated && now - c->accepted_at > kHelloTimeout) c->Close();
    Pump(*c);
  }
  accepted_.erase(std::remove_if(accepted_.begin(), accepted_.end(), [](const auto& c) { return c->closed; }),
                  accepted_.end());
}

// The responder's handling of one frame; false: close the connection.
bool Nic::Respond(Conn& c, const FrameHeader& h, const std::vector<std::uint8_t>& payload) {
  if (h.kind != static_cast<std::uint16_t>(FrameKind::kWrite)) return false;  // replies come the other way
  Qp* qp = FindQp(h.dst_qpn);
  if (qp == nullptr) return false;
  // Not from this QP's peer, or the QP cannot receive: dropped unanswered,
  // as hardware drops such packets (the requester runs out of retries).
  if (!qp->remote || qp->peer_qpn != h.src_qpn || (qp->state != QpState::kRtr && qp->state != QpState::kRts)) {
    return true;
  }
  FrameHeader reply{kFrameMagic, kFrameVersion, static_cast<std::uint16_t>(FrameKind::kAck), h.dst_qpn, h.src_qpn,
                    h.psn, 0, 0, 0, 0};
  const bool ahead = h.psn != qp->expected_psn && !Before(h.psn, qp->expected_psn);
  // Ahead of a lost packet: dropped (the requester goes back), unless the
  // reorder fault places it now, as mlx5 may place unfenced writes in any
  // order (the requester's fence keeps fenced ones behind the others).
  if (ahead && !(faults_.reorder && h.psn - qp->expected_psn < kWindow)) return true;
  const bool duplicate = Before(h.psn, qp->expected_psn) || qp->placed_ahead.count(h.psn) != 0;
  if (!duplicate) {
    const Violation v = CheckRemoteWrite(FindRkey(h.rkey), h.raddr, h.length);
    if (v != Violation::kNone) {
      if (ahead) return true;  // refused when its turn comes (the requester resends it)
      reply.kind = static_cast<std::uint16_t>(FrameKind::kNak);
      reply.rkey = static_cast<std::uint32_t>(v);
      reply.psn = h.psn;
      QueueFrame(c, reply, nullptr);
      return true;
    }
    PlacementBarrier();
    if (h.length > 0) std::memcpy(reinterpret_cast<void*>(static_cast<std::uintptr_t>(h.raddr)), payload.data(), h.length);
    qp->placed_ahead.insert(h.psn);
    while (qp->placed_ahead.erase(qp->expected_psn) != 0) ++qp->expected_psn;
  }
  // ACKs are cumulative: everything before expected_psn is placed.
  reply.psn = qp->expected_psn - 1;
  QueueFrame(c, reply, nullptr);
  return true;
}

// A reply to the requester QP `qp`.
void Nic::OnReply(Qp& qp, const FrameHeader& h, Clock::time_point now) {
  if (h.src_qpn != qp.peer_qpn || h.dst_qpn != qp.qpn) return;
  // Stale, or for no packet taken. (An ACK may be for a packet past
  // send_psn: sent before a go-back-N rewind, and it got through.)
  if (Before(h.psn, qp.una_psn) || !Before(h.psn, qp.next_psn)) return;
  for (std::size_t i = 0; i < qp.in_flight.size(); ++i) {
    InFlight& e = qp.in_flight[i];
    if (Done(e)) continue;
    if (h.kind == static_cast<std::uint16_t>(FrameKind::kNak)) {
      if (h.psn != qp.una_psn) return;  // only the oldest can be refused
      const auto why = static_cast<Violation>(h.rkey);
      Fail(qp, i, why == Violation::kBadRkey || why == Violation::kRemoteAccess ? why : Violation::kRemoteBounds);
      return;
    }
    while (!e.unplaced.empty() && !Before(h.psn, PsnAt(e, e.unplaced.front()))) e.unplaced.erase(e.unplaced.begin());
    if (!e.unplaced.empty()) break;
  }
  if (h.kind == static_cast<std::uint16_t>(FrameKind::kAck)) {
    qp.una_psn = h.psn + 1;
    if (Before(qp.send_psn, qp.una_psn)) qp.send_psn = qp.una_psn;
    qp.timeouts = 0;
    qp.rto_due = now + kRetransmitTimeout + std::chrono::microseconds(2 * faults_.latency_us);
  }
}

void Nic::DriveLink(Qp& qp, Clock::time_point now) {
  Conn* link = qp.link.get();
  if (link != nullptr) {
    Pump(*link);
    FrameHeader h{};
    std::vector<std::uint8_t> payload;
    Parse p;
    while ((p = NextFrame(*link, &h, &payload)) == Parse::kFrame) {
      if (h.kind == static_cast<std::uint16_t>(FrameKind::kWrite) ||
          h.kind == static_cast<std::uint16_t>(FrameKind::kHello)) {
        p = Parse::kBad;  // a responder sends only ACK/NAKs back
        break;
      }
      OnReply(qp, h, now);
    }
    if (p == Parse::kBad) link->Close();
  }
  const auto rto = kRetransmitTimeout + std::chrono::microseconds(2 * faults_.latency_us);
  if (qp.una_psn != qp.send_psn && now >= qp.rto_due) {
    // Nothing acked for a timeout: go back to the oldest unacked PSN, or give up.
    if (++qp.timeouts > faults_.retry_count) {
      for (std::size_t i = 0; i < qp.in_flight.size(); ++i) {
        if (!Done(qp.in_flight[i])) {
          Fail(qp, i, Violation::kRetryExceeded);
          break;
        }
      }
      qp.una_psn = qp.send_psn = qp.next_psn;
      return;
    }
    qp.send_psn = qp.una_psn;
    qp.rto_due = now + rto;
  }
  bool earlier_unacked = false;
  for (InFlight& e : qp.in_flight) {
    if (Done(e)) continue;
    if ((e.fenced && earlier_unacked) || e.due > now) break;
    earlier_unacked = true;
    for (std::size_t off : e.unplaced) {
      const std::uint32_t psn = PsnAt(e, off);
      if (Before(psn, qp.send_psn)) continue;  // sent, waiting for its ACK
      if (qp.send_psn - qp.una_psn >= kWindow) break;
      if (qp.una_psn == qp.send_psn) qp.rto_due = now + rto;  // the first outstanding packet starts the timer
      ++qp.send_psn;
      const bool lost = faults_.link_down || (faults_.loss_permille > 0 && rng_() % 1000 < faults_.loss_permille);
      if (lost || link == nullptr) continue;
      const std::size_t len = std::min<std::size_t>(kMtu, e.bytes.size() - off);
      const FrameHeader h{kFrameMagic, kFrameVersion, static_cast<std::uint16_t>(FrameKind::kWrite), qp.qpn,
                          qp.peer_qpn, psn, e.rkey, e.raddr + off, static_cast<std::uint32_t>(len), 0};
      QueueFrame(*link, h, e.bytes.data() + off);
    }
    if (qp.send_psn - qp.una_psn >= kWindow) break;
  }
  if (link != nullptr) Pump(*link);
}

// --- the progress thread ---------------------------------------------------------

std::vector<pollfd> Nic::LinkFds() const {
  std::vector<pollfd> fds;
  const auto add = [&fds](const Conn* c) {
    if (c != nullptr && !c->closed && c->fd >= 0) {
      fds.push_back({c->fd, static_cast<short>(POLLIN | (c->out.empty() ? 0 : POLLOUT)), 0});
    }
  };
  if (listen_fd_ >= 0) fds.push_back({listen_fd_, POLLIN, 0});
  for (const auto& c : accepted_) add(c.get());
  for (const auto& entry : qps_) add(entry.second->link.get());
  return fds;
}

void Nic::Start(std::int64_t interval_us) {
  if (running_.exchange(true)) return;
  thread_ = std::thread([this, interval_us] {
    const timespec nap{static_cast<time_t>(interval_us / 1000000), static_cast<long>(interval_us % 1000000) * 1000};
    std::vector<pollfd> fds;
    while (running_.load(std::memory_order_acquire)) {
      bool again;
      {
        std::lock_guard<std::mutex> lock(ModelMutex());
        again = Progress(-1) > 0;
        if (!again) fds = LinkFds();
      }
      // Work done: look again once other threads had a turn at ModelMutex
      // (the control path, other NICs). Else wait for a link to have frames
      // (or room for ours) or for the interval, after which the doorbell
      // records are read again (nothing signals those: as a NIC polling
      // them). A socket closed meanwhile by another thread only ends the
      // wait early.
      if (again) {
        sched_yield();
      } else {
        ppoll(fds.data(), fds.size(), &nap, nullptr);
      }
    }
  });
}

void Nic::Stop() {
  if (!running_.exchange(false)) return;
  thread_.join();
}

// --- the table of NICs (the C ABI's handles) -------------------------------------

std::int64_t AddNic() {
  static std::int64_t next_id = 1;
  const std::int64_t id = next_id++;
  NicTable()[id] = std::make_unique<Nic>(id);
  return id;
}

std::unique_ptr<Nic> RemoveNic(std::int64_t id) {
  auto it = NicTable().find(id);
  if (it == NicTable().end()) return nullptr;
  std::unique_ptr<Nic> nic = std::move(it->second);
  NicTable().erase(it);
  return nic;
}

}  // namespace nic
}  // namespace eaas
