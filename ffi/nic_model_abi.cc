// C ABI of the software NIC (nic_model.h), called through ctypes by
// eaas_jax/transport/nic_model.py. Handles are NIC ids; calls that can fail
// return 0 or -1 and write why into `err` (`err_len` bytes, NUL-terminated).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "export.h"
#include "nic_model.h"
#include "shm_segment.h"
#include "transport_common.h"

namespace n = eaas::nic;

namespace {

int Fail(const std::string& why, char* err, std::int64_t err_len) {
  eaas::CopyError(why, err, err_len);
  return -1;
}

int Result(const std::string& why, char* err, std::int64_t err_len) {
  return why.empty() ? 0 : Fail(why, err, err_len);
}

// Where a QP's queues are in a mapping at `base`: base, dbrec, sq, cq, total
// bytes, qpn, log_sq_bbs, log_cq_entries.
constexpr int kQueueInfoFields = 8;
void QueueInfo(const n::QueueLayout& l, const std::uint8_t* base, std::uint64_t* out) {
  const auto b = reinterpret_cast<std::uintptr_t>(base);
  const std::uint64_t info[kQueueInfoFields] = {b, b + l.dbrec_offset, b + l.sq_offset, b + l.cq_offset,
                                                l.total_bytes, l.qpn, l.log_sq_bbs, l.log_cq_entries};
  std::memcpy(out, info, sizeof(info));
}

}  // namespace

extern "C" {

EAAS_FFI_EXPORT std::int64_t eaas_nic_create() {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  return n::AddNic();
}

// Stops the NIC's thread and frees its QPs (unlinking their segments).
// Regions stay the caller's memory.
EAAS_FFI_EXPORT int eaas_nic_destroy(std::int64_t nic) {
  std::unique_ptr<n::Nic> gone;
  {
    std::lock_guard<std::mutex> lock(n::ModelMutex());
    gone = n::RemoveNic(nic);
  }
  return gone == nullptr ? -1 : 0;  // destroyed here, after the lock (Stop joins)
}

EAAS_FFI_EXPORT int eaas_nic_set_faults(std::int64_t nic, std::int64_t latency_us, int reorder,
                                        std::uint32_t loss_permille, int link_down, std::uint32_t retry_count,
                                        std::uint64_t seed) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  if (p == nullptr || latency_us < 0 || loss_permille > 1000) return -1;
  p->SetFaults({latency_us, reorder != 0, loss_permille, link_down != 0, retry_count, seed});
  return 0;
}

EAAS_FFI_EXPORT int eaas_nic_reg_mr(std::int64_t nic, std::uint64_t addr, std::uint64_t length,
                                    std::uint32_t access, std::uint32_t* lkey, std::uint32_t* rkey, char* err,
                                    std::int64_t err_len) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  if (p == nullptr) return Fail("no such NIC", err, err_len);
  return Result(p->RegisterRegion(reinterpret_cast<void*>(static_cast<std::uintptr_t>(addr)), length, access,
                                  lkey, rkey),
                err, err_len);
}

EAAS_FFI_EXPORT int eaas_nic_create_qp(std::int64_t nic, std::uint32_t log_sq_bbs, std::uint32_t log_cq_entries,
                                       std::uint32_t* qpn, char* err, std::int64_t err_len) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  if (p == nullptr) return Fail("no such NIC", err, err_len);
  return Result(p->CreateQp(log_sq_bbs, log_cq_entries, qpn), err, err_len);
}

// `state`: an ibv_qp_state value; (peer_nic, peer_qpn) for RTR.
EAAS_FFI_EXPORT int eaas_nic_modify_qp(std::int64_t nic, std::uint32_t qpn, std::uint32_t state,
                                       std::int64_t peer_nic, std::uint32_t peer_qpn, char* err,
                                       std::int64_t err_len) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  if (p == nullptr) return Fail("no such NIC", err, err_len);
  const auto to = static_cast<n::QpState>(state);
  if (to != n::QpState::kReset && to != n::QpState::kInit && to != n::QpState::kRtr && to != n::QpState::kRts &&
      to != n::QpState::kErr) {
    return Fail("unknown QP state " + std::to_string(state), err, err_len);
  }
  return Result(p->ModifyQp(qpn, to, peer_nic, peer_qpn), err, err_len);
}

// The QP's state (ibv_qp_state), or -1.
EAAS_FFI_EXPORT int eaas_nic_qp_state(std::int64_t nic, std::uint32_t qpn) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  n::Qp* qp = p == nullptr ? nullptr : p->FindQp(qpn);
  return qp == nullptr ? -1 : static_cast<int>(qp->state);
}

// The NIC's own mapping of the QP's queues (8 fields into `out`, see
// QueueInfo) and the segment's name (for eaas_nic_map_queues elsewhere).
EAAS_FFI_EXPORT int eaas_nic_qp_queues(std::int64_t nic, std::uint32_t qpn, std::uint64_t* out, char* name,
                                       std::int64_t name_len) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  n::Qp* qp = p == nullptr ? nullptr : p->FindQp(qpn);
  if (qp == nullptr || name_len <= static_cast<std::int64_t>(qp->segment_name.size())) return -1;
  QueueInfo(qp->layout, qp->base, out);
  std::memcpy(name, qp->segment_name.c_str(), qp->segment_name.size() + 1);
  return 0;
}

// Maps a QP's queue segment by name, as the process posting WQEs does: the
// file must be ours and 0600 (CheckSegmentFile), its header complete and
// consistent with its size. Fills `out` like eaas_nic_qp_queues.
EAAS_FFI_EXPORT int eaas_nic_map_queues(const char* name, std::uint64_t* out, char* err, std::int64_t err_len) {
  const int fd = shm_open(name, O_RDWR, 0);
  if (fd < 0) return Fail(std::string("cannot open ") + name + ": " + eaas::ErrnoText(errno), err, err_len);
  struct stat st {};
  std::string why = fstat(fd, &st) != 0 ? "cannot stat " + std::string(name) : eaas::CheckSegmentFile(st, name);
  const auto size = static_cast<std::size_t>(st.st_size);
  if (why.empty() && size < sizeof(n::QueueLayout)) why = std::string(name) + " is too small for a queue segment";
  void* base = why.empty() ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  close(fd);
  if (!why.empty()) return Fail(why, err, err_len);
  if (base == MAP_FAILED) return Fail(std::string("cannot map ") + name, err, err_len);
  // The magic first (acquire: the creator publishes it last), then the rest.
  const bool published = __atomic_load_n(static_cast<std::uint64_t*>(base), __ATOMIC_ACQUIRE) == n::kQueueMagic;
  n::QueueLayout l{};
  std::memcpy(&l, base, sizeof(l));
  bool ok = published && l.log_sq_bbs <= 15 && l.log_cq_entries <= 22 && l.total_bytes == size;
  if (ok) {
    const n::QueueLayout expected = n::MakeQueueLayout(l.qpn, l.log_sq_bbs, l.log_cq_entries);
    ok = std::memcmp(&l, &expected, sizeof(l)) == 0;
  }
  if (!ok) {
    munmap(base, size);
    return Fail(std::string(name) + " is not a complete NIC queue segment", err, err_len);
  }
  QueueInfo(l, static_cast<std::uint8_t*>(base), out);
  return 0;
}

EAAS_FFI_EXPORT int eaas_nic_unmap_queues(std::uint64_t base, std::uint64_t total_bytes) {
  return munmap(reinterpret_cast<void*>(static_cast<std::uintptr_t>(base)), total_bytes);
}

// Listens on the IPv4 address `host` for peer NICs' links; the ephemeral
// port into *port, the link key connections must begin with into *key.
EAAS_FFI_EXPORT int eaas_nic_listen(std::int64_t nic, const char* host, std::uint32_t* port, std::uint64_t* key,
                                    char* err, std::int64_t err_len) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  if (p == nullptr) return Fail("no such NIC", err, err_len);
  if (host == nullptr) return Fail("no address to listen on", err, err_len);
  std::uint16_t port16 = 0;
  const std::string failed = p->Listen(host, &port16, key);
  *port = port16;
  return Result(failed, err, err_len);
}

// INIT -> RTR with QP `peer_qpn` of the NIC listening on host:port with link
// key `key`, over a TCP link (port 0: receive from it only). Then RTS with
// eaas_nic_modify_qp.
EAAS_FFI_EXPORT int eaas_nic_connect_qp(std::int64_t nic, std::uint32_t qpn, const char* host, std::uint32_t port,
                                        std::uint32_t peer_qpn, std::uint64_t key, char* err, std::int64_t err_len) {
  if (host == nullptr || port > 65535) return Fail("bad peer address", err, err_len);
  std::unique_ptr<n::Conn> link;
  if (port != 0) {  // before the lock: connecting may take up to a second
    const std::string failed = n::Connect(host, static_cast<std::uint16_t>(port), key, &link);
    if (!failed.empty()) return Fail(failed, err, err_len);
  }
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  if (p == nullptr) return Fail("no such NIC", err, err_len);
  return Result(p->ConnectQp(qpn, std::move(link), peer_qpn), err, err_len);
}

// Takes new WQEs, places at most `max_chunks` chunks (< 0: all that are due),
// writes due CQEs; returns the chunks placed plus the WQEs retired, or -1.
EAAS_FFI_EXPORT std::int64_t eaas_nic_progress(std::int64_t nic, std::int64_t max_chunks) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  return p == nullptr ? -1 : p->Progress(max_chunks);
}

EAAS_FFI_EXPORT int eaas_nic_start(std::int64_t nic, std::int64_t interval_us) {
  std::lock_guard<std::mutex> lock(n::ModelMutex());
  n::Nic* p = n::FindNic(nic);
  if (p == nullptr || interval_us < 0) return -1;
  p->Start(interval_us);
  return 0;
}

}  // extern "C"
