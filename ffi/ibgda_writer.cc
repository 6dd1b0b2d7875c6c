// NicWriter: see ibgda_writer.h.
#include "ibgda_writer.h"

#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <utility>

#include "mlx5_wqe.h"
#include "nic_model.h"

namespace eaas {
namespace ibgda {
namespace {

namespace m = eaas::mlx5;

// How often the NIC's thread looks at its queues and links.
constexpr std::int64_t kProgressIntervalUs = 50;
// How long a send waits for the message staged before it on the same (peer,
// channel) to complete. Its reply has usually come already (the NIC's ACK
// trails it by a progress interval or two); far longer means a sick link.
constexpr auto kStageWait = std::chrono::milliseconds(20);
// WQEs of one message at most: the odd sequence word, header + first array,
// three more arrays, the sequence word.
constexpr std::uint32_t kMaxWqesPerMessage = 6;
// An mlx5 WRITE carries at most 2^31 bytes (the data segment's byte count).
constexpr std::size_t kMaxMessageBytes = std::size_t{1} << 31;

std::uint32_t Log2Ceil(std::uint64_t n) {
  std::uint32_t log = 0;
  while ((std::uint64_t{1} << log) < n) ++log;
  return log;
}

}  // namespace

struct NicWriter::PeerQp {
  std::uint32_t qpn = 0;
  volatile std::uint32_t* dbrec = nullptr;
  std::uint8_t* sq = nullptr;
  const std::uint8_t* cq = nullptr;
  std::uint32_t log_sq = 0, log_cq = 0;
  std::uint32_t posted = 0;     // BBs posted (running count; mod 2^16 is the WQE index)
  std::uint32_t completed = 0;  // BBs whose WQEs completed
  std::uint32_t cqes = 0;       // CQEs consumed
  PeerState state = PeerState::kIdle;
  std::uint32_t rkey = 0;
  std::uint64_t slots_addr = 0;
  // Per channel: `posted` after the last message staged there (its staging
  // slot is free again once `completed` reaches it).
  std::vector<std::uint32_t> staged_until;
  std::uint64_t doorbell = 0;  // stands in for the UAR's BlueFlame register (the model reads the record)
  std::uint8_t* segment = nullptr;  // the NIC's mapping of the QP's queues
  std::size_t segment_bytes = 0;
};

std::string NicWriter::Open(const NicWriterConfig& config, std::unique_ptr<NicWriter>* out) {
  if (config.inbox == nullptr || config.slot_bytes == 0 || config.max_endpoints <= 0 || config.num_channels <= 0 ||
      config.endpoint < 0 || config.endpoint >= config.max_endpoints || config.slots_offset >= config.inbox_bytes) {
    return "ibgda: incomplete NIC writer configuration";
  }
  if (config.slot_bytes > kMaxMessageBytes) {
    return "ibgda: a mailbox slot of " + std::to_string(config.slot_bytes) + " bytes is over the " +
           std::to_string(kMaxMessageBytes) + " bytes one RDMA WRITE may carry (lower the capacity)";
  }
  std::unique_ptr<NicWriter> w(new NicWriter());
  w->config_ = config;
  w->staging_bytes_ = config.slot_bytes * static_cast<std::size_t>(config.max_endpoints * config.num_channels);
  void* staging = mmap(nullptr, w->staging_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (staging == MAP_FAILED) return "ibgda: cannot allocate the staging area";
  w->staging_ = static_cast<std::uint8_t*>(staging);
  const std::uint32_t log_sq = std::max<std::uint32_t>(
      6, Log2Ceil(2 * kMaxWqesPerMessage * static_cast<std::uint64_t>(config.num_channels)));
  if (log_sq > 15) return "ibgda: too many channels for one send queue";

  std::lock_guard<std::mutex> lock(nic::ModelMutex());
  w->nic_ = nic::AddNic();
  nic::Nic* n = nic::FindNic(w->nic_);
  std::uint16_t port = 0;
  std::string failed = n->Listen(config.host, &port, &w->card_.link_key);
  std::uint32_t unused_key = 0;  // nothing is sent from the inbox, nor written into the staging area
  if (failed.empty()) {
    // The slots only: the segment header (owner, `closed`) is not the peers' to write.
    failed = n->RegisterRegion(config.inbox + config.slots_offset, config.inbox_bytes - config.slots_offset,
                               nic::kAccessLocalWrite | nic::kAccessRemoteWrite, &unused_key, &w->card_.inbox_rkey);
  }
  if (failed.empty()) {
    failed = n->RegisterRegion(w->staging_, w->staging_bytes_, nic::kAccessLocalWrite, &w->staging_lkey_, &unused_key);
  }
  for (std::int64_t p = 0; failed.empty() && p < config.max_endpoints; ++p) {
    auto q = std::make_unique<PeerQp>();
    failed = n->CreateQp(log_sq, log_sq, &q->qpn);
    if (!failed.empty()) break;
    if (p == 0) w->card_.qpn_base = q->qpn;
    if (q->qpn != w->card_.qpn_base + static_cast<std::uint32_t>(p)) {
      failed = "ibgda: the NIC numbered its QPs out of order";
      break;
    }
    const nic::Qp* qp = n->FindQp(q->qpn);
    // This process posts through the NIC's own mapping: nobody maps the
    // queues by name, so the name goes now and a killed process leaves none.
    shm_unlink(qp->segment_name.c_str());
    q->segment = qp->base;
    q->segment_bytes = qp->layout.total_bytes;
    q->dbrec = qp->dbrec();
    q->sq = qp->sq();
    q->cq = qp->cq();
    q->log_sq = q->log_cq = log_sq;
    q->staged_until.assign(static_cast<std::size_t>(config.num_channels), 0);
    w->peers_.push_back(std::move(q));
  }
  if (!failed.empty()) {
    std::unique_ptr<nic::Nic> gone = nic::RemoveNic(w->nic_);
    w->nic_ = 0;
    return "ibgda: " + failed;  // `gone` is freed after the lock (its thread never started)
  }
  w->card_.port = port;
  w->card_.slots_addr = reinterpret_cast<std::uintptr_t>(config.inbox) + config.slots_offset;
  n->Start(kProgressIntervalUs);
  *out = std::move(w);
  return "";
}

NicWriter::~NicWriter() {
  if (nic_ != 0) {
    std::unique_ptr<nic::Nic> gone;
    {
      std::lock_guard<std::mutex> lock(nic::ModelMutex());
      gone = nic::RemoveNic(nic_);
    }
    gone.reset();  // stops its thread (which takes ModelMutex), frees its QPs
  }
  if (staging_ != nullptr) munmap(staging_, staging_bytes_);
}

std::string NicWriter::Connect(std::int64_t peer, std::unique_ptr<nic::Conn> link, const Card& theirs) {
  if (peer < 0 || peer >= config_.max_endpoints || peer == config_.endpoint) return "ibgda: no such peer";
  PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  std::string failed;
  std::lock_guard<std::mutex> lock(nic::ModelMutex());
  nic::Nic* n = nic::FindNic(nic_);
  const std::uint32_t peer_qpn = theirs.qpn_base + static_cast<std::uint32_t>(config_.endpoint);
  failed = n->ModifyQp(q.qpn, nic::QpState::kReset, -1, 0);
  if (failed.empty()) failed = n->ModifyQp(q.qpn, nic::QpState::kInit, -1, 0);
  if (failed.empty()) failed = n->ConnectQp(q.qpn, std::move(link), peer_qpn);
  if (failed.empty()) failed = n->ModifyQp(q.qpn, nic::QpState::kRts, -1, 0);
  q.posted = q.completed = q.cqes = 0;
  std::fill(q.staged_until.begin(), q.staged_until.end(), 0);
  if (!failed.empty()) {
    n->ModifyQp(q.qpn, nic::QpState::kReset, -1, 0);
    q.state = PeerState::kIdle;
    return "ibgda: connecting to endpoint " + std::to_string(peer) + ": " + failed;
  }
  q.rkey = theirs.inbox_rkey;
  q.slots_addr = theirs.slots_addr;
  q.state = PeerState::kConnected;
  return "";
}

void NicWriter::Disconnect(std::int64_t peer) {
  if (peer < 0 || peer >= config_.max_endpoints) return;
  PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  std::lock_guard<std::mutex> lock(nic::ModelMutex());
  nic::FindNic(nic_)->ModifyQp(q.qpn, nic::QpState::kReset, -1, 0);
  q.posted = q.completed = q.cqes = 0;
  std::fill(q.staged_until.begin(), q.staged_until.end(), 0);
  q.state = PeerState::kIdle;
}

bool NicWriter::SetReady(std::int64_t peer) {
  if (peer < 0 || peer >= config_.max_endpoints) return false;
  PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  if (q.state != PeerState::kConnected) return false;
  q.state = PeerState::kReady;
  return true;
}

PeerState NicWriter::State(std::int64_t peer) {
  if (peer < 0 || peer >= config_.max_endpoints) return PeerState::kIdle;
  PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  if (!config_.device_posts && (q.state == PeerState::kReady || q.state == PeerState::kConnected)) Reclaim(q);
  return q.state;
}

void NicWriter::MarkFailed(std::int64_t peer) {
  if (peer < 0 || peer >= config_.max_endpoints) return;
  PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  if (q.state == PeerState::kReady || q.state == PeerState::kConnected) q.state = PeerState::kFailed;
}

QueueView NicWriter::Queue(std::int64_t peer) const {
  const PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  QueueView view;
  view.qpn = q.qpn;
  view.log_sq = q.log_sq;
  view.log_cq = q.log_cq;
  view.rkey = q.rkey;
  view.slots_addr = q.slots_addr;
  view.dbrec = q.dbrec;
  view.sq = q.sq;
  view.cq = q.cq;
  view.segment = q.segment;
  view.segment_bytes = q.segment_bytes;
  return view;
}

// Consumes the CQEs the NIC wrote: a success frees the send queue up to the
// WQE it names; an error means the QP is in ERR (nic_model.h, Validation).
void NicWriter::Reclaim(PeerQp& q) {
  const std::uint32_t cq_mask = (1u << q.log_cq) - 1;
  for (;;) {
    const auto* cqe = reinterpret_cast<const m::mlx5_cqe64*>(q.cq + (q.cqes & cq_mask) * sizeof(m::mlx5_cqe64));
    const std::uint8_t op_own = __atomic_load_n(&cqe->op_own, __ATOMIC_ACQUIRE);
    if (!m::CqeIsOwnedBySoftware(op_own, q.cqes, q.log_cq)) return;
    const m::Cqe c = m::DecodeCqe(cqe);
    ++q.cqes;
    if (m::CqeIsError(c.opcode)) {
      q.state = PeerState::kFailed;
      continue;
    }
    // The BB after the completed WQE, as a running count in (completed, posted].
    const auto next = static_cast<std::uint16_t>(c.wqe_counter + 1);
    q.completed = q.posted - static_cast<std::uint16_t>(static_cast<std::uint16_t>(q.posted) - next);
  }
}

std::uint8_t* NicWriter::StagingSlot(std::int64_t peer, std::int64_t channel) const {
  return staging_ + static_cast<std::size_t>(peer * config_.num_channels + channel) * config_.slot_bytes;
}

std::uint8_t* NicWriter::Stage(std::int64_t peer, std::int64_t channel, std::string* why) {
  PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  const auto deadline = std::chrono::steady_clock::now() + kStageWait;
  for (;;) {
    Reclaim(q);
    if (q.state != PeerState::kReady) {
      *why = q.state == PeerState::kFailed ? "its QP failed (error completion)" : "not connected";
      return nullptr;
    }
    const std::uint32_t until = q.staged_until[static_cast<std::size_t>(channel)];
    if (static_cast<std::int32_t>(q.completed - until) >= 0) return StagingSlot(peer, channel);
    if (std::chrono::steady_clock::now() >= deadline) {
      *why = "its previous message on this channel is still not complete";
      return nullptr;
    }
    const timespec nap{0, 5000};
    nanosleep(&nap, nullptr);
  }
}

bool NicWriter::Post(std::int64_t peer, std::int64_t channel, const SlotRanges& ranges, std::uint64_t seq) {
  PeerQp& q = *peers_[static_cast<std::size_t>(peer)];
  const std::uint32_t sq_size = 1u << q.log_sq;
  const auto wqes = static_cast<std::uint32_t>(ranges.count) + 2;
  // Defensive: Stage lets one message per channel be in flight, and the send
  // queue holds two per channel (Open), so this never refuses in practice.
  if (wqes > kMaxWqesPerMessage || q.posted - q.completed + wqes > sq_size) return false;
  // The peer's slot (this endpoint, channel): this endpoint's row of its inbox.
  const std::uint64_t remote =
      q.slots_addr + config_.slot_bytes * static_cast<std::uint64_t>(config_.endpoint * config_.num_channels + channel);
  const std::uint8_t* local = StagingSlot(peer, channel);
  std::uint8_t* ctrl = nullptr;
  const auto next_wqe = [&] {
    ctrl = q.sq + (q.posted & (sq_size - 1)) * m::MLX5_SEND_WQE_BB;
    return static_cast<std::uint16_t>(q.posted++);
  };
  const std::uint64_t odd = seq - 1;
  std::uint16_t index = next_wqe();
  m::WriteInlineRdmaWrite(ctrl, index, q.qpn, 0, remote, q.rkey, &odd, sizeof(odd));
  bool first = true;
  for (const SlotRange& r : ranges) {
    index = next_wqe();
    m::WriteRdmaWrite(ctrl, m::MLX5_OPCODE_RDMA_WRITE, index, q.qpn, first ? m::MLX5_WQE_CTRL_FENCE : 0,
                      remote + r.offset, q.rkey, reinterpret_cast<std::uintptr_t>(local + r.offset), staging_lkey_,
                      static_cast<std::uint32_t>(r.size), 0);
    first = false;
  }
  index = next_wqe();
  m::WriteSequenceWord(ctrl, index, q.qpn, remote, q.rkey, seq, /*signaled=*/true);
  m::RingDoorbell(q.dbrec, &q.doorbell, reinterpret_cast<const m::mlx5_wqe_ctrl_seg*>(ctrl),
                  static_cast<std::uint16_t>(q.posted));
  q.staged_until[static_cast<std::size_t>(channel)] = q.posted;
  return true;
}

}  // namespace ibgda
}  // namespace eaas
