// The CPU `shm` backend of the expert transport: POSIX shared-memory inboxes
// and four XLA FFI handlers (CPU, typed FFI, api_version=1):
//
//   eaas_shm_dispatch  (client)  write each token once per target server
//   eaas_shm_combine   (client)  wait for the replies (one deadline), scatter-add
//   eaas_shm_poll      (server)  collect whatever requests have arrived
//   eaas_shm_reply     (server)  answer every request the last poll accepted
//
// The wire format (message header, slot layout, seqlock protocol, validation)
// is described in wire_format.h. This file adds:
//
// == Segments ==
// Endpoint e of deployment D owns the POSIX shm segment "/eaas-D-e" (D: 1-40
// chars of [A-Za-z0-9_-]), created O_CREAT|O_EXCL, mode 0600 (fchmod'ed, so
// the umask does not matter), unlinked by its owner on close. Layout:
//   SegmentHeader (256 bytes) | slot (0, 0) | slot (0, 1) | ... | slot (E-1, C-1)
// with slot (sender, channel) at index sender * num_channels + channel. The
// owner writes the header and publishes `magic` last (release).
//
// A peer opens a segment by name and, before mapping it, fstat's the open
// file: it refuses (naming the segment, its owner uid and mode) anything that
// is not a regular file owned by our effective uid with mode 0600 (its size
// is judged after mapping, with the geometry in its header: only the header
// is read before). So another local user who creates the name
// first can neither read our tokens, nor steer our replies, nor SIGBUS us by
// truncating a segment we mapped: only our own uid can create a segment we
// accept, and that uid could as well ptrace or kill us. (POSIX shm files
// cannot take memfd seals, and a SIGBUS-safe read path would need a signal
// handler inside XLA's threads; the owner check is what closes the hole.)
// After mapping, the peer refuses the segment unless magic, version, every
// geometry field (max_endpoints, num_channels, capacity, d, k, num_layers,
// num_experts), deployment id and owner endpoint equal its own.
//
// Incarnations: the header records the owner's pid and process start time
// (/proc/<pid>/stat), so a reused pid does not pass for the owner. A segment
// whose owner is gone is reclaimed by the next open of that endpoint (one
// whose owner is alive makes the open fail): the new owner marks the old
// segment `closed` (release) before unlinking it, as an owner does on close,
// and every peer drops its cached mapping of a closed segment and opens the
// name again on its next send, so a restarted client or server is reached at
// its new inbox without anyone's help. As a backstop (a segment unlinked by
// someone else, never marked closed), a peer also checks every
// kPeerRecheckInterval that the name still leads to the inode it mapped.
//
// == Process-wide state ==
// A mutex-protected registry maps endpoint index -> Transport (endpoint indices
// are process-wide keys: one process may host several endpoints, e.g. a client
// and a server, but not the same index twice). A Transport holds its inbox
// mapping, lazily opened peer mappings, per-(peer, channel) send sequence,
// last-consumed seq per inbox slot, the tickets the client waits for, the
// messages the last poll accepted, and counters. The FFI handlers take the
// endpoint as an attribute and look the Transport up on every call, so the
// state outlives any XLA executable; handlers hold a shared_ptr, so a
// concurrent close only takes effect when they return.
// Locking: Transport::mu guards everything except the per-slot last-seen
// sequence numbers (atomics, each slot read by one consumer at a time) and the
// counters (atomics). Nobody sleeps while holding a lock: combine and poll read
// the inbox without it. All writes into peer segments happen under mu.
//
// == Waiting ==
// Bounded spin (~5 us of pause instructions), then sleeps with exponential
// backoff 1 us .. 200 us, always clipped to the deadline (steady clock), so an
// idle server or a waiting client does not burn the CI machine's two cores.
//
// == Trust ==
// Message contents are never trusted (see wire_format.h). The shm backend
// does trust that a peer, which runs under the same uid (segments are 0600),
// does not ftruncate a segment that others have mapped: that would SIGBUS the
// mapping process. Guarding against it needs a SIGBUS handler or per-access
// sigsetjmp, neither acceptable inside an XLA handler.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "export.h"
#include "hidden_ffi_type.h"
#include "ibgda_writer.h"
#include "shm_segment.h"
#include "transport_common.h"
#include "wire_format.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


// The handler symbols (defined at the bottom by XLA_FFI_DEFINE_HANDLER_SYMBOL),
// declared first so they get default visibility (the library hides the rest).
extern "C" {
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_shm_dispatch(XLA_FFI_CallFrame* call_frame);
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_shm_combine(XLA_FFI_CallFrame* call_frame);
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_shm_poll(XLA_FFI_CallFrame* call_frame);
EAAS_FFI_EXPORT XLA_FFI_Error* eaas_shm_reply(XLA_FFI_CallFrame* call_frame);
}  // extern "C"

namespace eaas {
namespace shm {
namespace {

// ---------------------------------------------------------------------------
// Segment header
// ---------------------------------------------------------------------------

// "EAASSHM1" read as a little-endian u64.
constexpr std::uint64_t kSegmentMagic = 0x314D485353414145ull;
constexpr std::uint32_t kSegmentVersion = 3;
constexpr std::size_t kSegmentHeaderBytes = 256;

struct SegmentHeader {
  std::uint64_t magic;             //   0: published last (release)
  std::uint32_t version;           //   8: kSegmentVersion
  std::uint32_t wire_version;      //  12: kWireFormatVersion
  std::uint32_t header_bytes;      //  16: kSegmentHeaderBytes
  std::uint32_t owner_endpoint;    //  20
  std::uint32_t max_endpoints;     //  24
  std::uint32_t num_channels;      //  28
  std::uint32_t capacity;          //  32
  std::uint32_t d;                 //  36
  std::uint32_t k;                 //  40
  std::uint32_t num_layers;        //  44
  std::uint32_t num_experts;       //  48
  std::uint32_t closed;            //  52: set (release) by the owner on close
  std::uint64_t deployment_id;     //  56
  std::uint64_t slot_bytes;        //  64
  std::uint64_t total_bytes;       //  72
  std::int64_t owner_pid;          //  80
  std::uint32_t hidden_dtype;      //  88: HiddenDtype of requests
  std::uint32_t reserved0;         //  92
  std::uint64_t owner_start_time;  //  96: /proc/<pid>/stat starttime; 0 unknown
  std::uint8_t reserved[kSegmentHeaderBytes - 104];
};
static_assert(sizeof(SegmentHeader) == kSegmentHeaderBytes, "segment header size");
static_assert(offsetof(SegmentHeader, closed) == 52 && offsetof(SegmentHeader, owner_pid) == 80 &&
                  offsetof(SegmentHeader, owner_start_time) == 96,
              "segment header layout (mirrored in transport/shm.py)");

using Geometry = EndpointGeometry;

// Bytes of an inbox segment: header, then every slot.
std::size_t SegmentBytes(const Geometry& geo) {
  return kSegmentHeaderBytes + geo.NumSlots() * geo.Slot().bytes;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

using Clock = std::chrono::steady_clock;

// How often a sender checks that a peer's segment name still leads to the
// file it mapped (a backstop: owners mark replaced segments closed).
constexpr std::chrono::milliseconds kPeerRecheckInterval{100};

// Bounded spin, then sleeps with exponential backoff, clipped to a deadline.
class Backoff {
 public:
  explicit Backoff(Clock::time_point deadline)
      : deadline_(deadline), spin_until_(Clock::now() + std::chrono::microseconds(5)) {}

  // Waits a little. Returns false once the deadline has passed.
  bool Wait() {
    const auto now = Clock::now();
    if (now >= deadline_) return false;
    if (now < spin_until_) {
      for (int i = 0; i < 16; ++i) CpuRelax();
      return true;
    }
    auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline_ - now);
    auto nap = std::min<std::chrono::nanoseconds>(std::chrono::microseconds(sleep_us_), left);
    timespec ts{static_cast<time_t>(nap.count() / 1000000000),
                static_cast<long>(nap.count() % 1000000000)};
    nanosleep(&ts, nullptr);
    sleep_us_ = std::min(sleep_us_ * 2, kMaxSleepUs);
    return true;
  }

 private:
  Clock::time_point deadline_;
  Clock::time_point spin_until_;
  static constexpr int kMaxSleepUs = 200;
  int sleep_us_ = 1;
};

Clock::time_point DeadlineAfterUs(std::int64_t us) {
  us = std::max<std::int64_t>(0, std::min<std::int64_t>(us, std::int64_t{1} << 40));
  return Clock::now() + std::chrono::microseconds(us);
}

inline std::uint64_t LoadAcquire(const std::uint64_t* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
inline std::uint64_t LoadRelaxed(const std::uint64_t* p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

bool ValidDeploymentName(const std::string& s) {
  if (s.empty() || s.size() > 40) return false;
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string SegmentName(const std::string& deployment, std::int64_t endpoint) {
  return "/eaas-" + deployment + "-" + std::to_string(endpoint);
}

// The file a segment name led to when it was mapped.
struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool operator==(const FileId& o) const { return dev == o.dev && ino == o.ino; }
};

// An mmap'ed segment (own inbox or a peer's).
class Mapping {
 public:
  Mapping(void* base, std::size_t size, Geometry geo, FileId file = {})
      : base_(static_cast<std::uint8_t*>(base)), size_(size), geo_(geo),
        slot_(geo.Slot()), file_(file) {}
  ~Mapping() {
    if (base_ != nullptr) munmap(base_, size_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  SegmentHeader* header() const { return reinterpret_cast<SegmentHeader*>(base_); }
  std::uint8_t* slot(std::int64_t sender, std::int64_t channel) const {
    const std::size_t index =
        static_cast<std::size_t>(sender * geo_.num_channels + channel);
    return base_ + kSegmentHeaderBytes + index * slot_.bytes;
  }
  MessageHeader* slot_header(std::int64_t sender, std::int64_t channel) const {
    return reinterpret_cast<MessageHeader*>(slot(sender, channel));
  }
  bool closed() const { return __atomic_load_n(&header()->closed, __ATOMIC_ACQUIRE) != 0; }
  const FileId& file() const { return file_; }

 private:
  std::uint8_t* base_;
  std::size_t size_;
  Geometry geo_;
  SlotLayout slot_;
  FileId file_;
};

bool ProcessAlive(std::int64_t pid) {
  if (pid <= 0) return false;
  if (kill(static_cast<pid_t>(pid), 0) == 0) return true;
  return errno != ESRCH;  // EPERM: exists (another user)
}

// Field 22 of /proc/<pid>/stat (the process's start time, in clock ticks since
// boot); 0 where it cannot be read. The command name (field 2) may hold
// spaces and parentheses, so parsing starts after its last ')'.
std::uint64_t ProcessStartTime(std::int64_t pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return 0;
  // After ") ": field 3 (state) ... field 22 (starttime).
  for (int field = 2; field < 22; ++field) {
    p = std::strchr(p + 1, ' ');
    if (p == nullptr) return 0;
  }
  return std::strtoull(p + 1, nullptr, 10);
}

// Whether the process that recorded (`pid`, `start_time`) still runs: the pid
// is alive and, where both start times are known, it is the same process
// (not a later one that was given the same pid).
bool OwnerAlive(std::int64_t pid, std::uint64_t start_time) {
  if (!ProcessAlive(pid)) return false;
  const std::uint64_t now = ProcessStartTime(pid);
  return start_time == 0 || now == 0 || now == start_time;
}

enum class PeerStatus { kOk, kUnavailable, kRefused };

// Maps the inbox of `peer` and checks that it matches `geo`: the file first
// (owner, mode: CheckSegmentFile), then its header and size.
PeerStatus OpenPeer(const std::string& deployment, std::int64_t peer,
                    const Geometry& geo, std::shared_ptr<Mapping>* out,
                    std::string* why) {
  const std::string name = SegmentName(deployment, peer);
  const int fd = shm_open(name.c_str(), O_RDWR, 0);  // glibc adds O_NOFOLLOW
  if (fd < 0) {
    *why = "cannot open " + name + ": " + ErrnoText(errno);
    // EACCES: a file we may not open, i.e. another user's: refused, not "not yet".
    return errno == EACCES ? PeerStatus::kRefused : PeerStatus::kUnavailable;
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || (st.st_uid == geteuid() && static_cast<std::size_t>(st.st_size) < kSegmentHeaderBytes)) {
    close(fd);  // its owner creates it, then sizes it: not initialised yet
    *why = name + " is not initialised yet";
    return PeerStatus::kUnavailable;
  }
  const std::string refused = CheckSegmentFile(st, name);
  if (!refused.empty()) {
    close(fd);
    *why = refused;
    return PeerStatus::kRefused;
  }
  const std::size_t size = static_cast<std::size_t>(st.st_size);
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int mmap_errno = errno;
  close(fd);
  if (base == MAP_FAILED) {
    *why = "cannot map " + name + ": " + ErrnoText(mmap_errno);
    return PeerStatus::kUnavailable;
  }
  auto mapping = std::make_shared<Mapping>(base, size, geo, FileId{st.st_dev, st.st_ino});
  const SegmentHeader* h = mapping->header();
  const std::uint64_t magic = LoadAcquire(&h->magic);
  if (magic == 0) {
    *why = name + " is not initialised yet";
    return PeerStatus::kUnavailable;
  }
  if (mapping->closed()) {
    *why = name + " is being closed by its owner";
    return PeerStatus::kUnavailable;
  }
  std::string mismatch;
  auto check = [&mismatch](const char* field, std::uint64_t theirs, std::uint64_t ours) {
    if (theirs != ours && mismatch.empty()) {
      mismatch = std::string(field) + " " + std::to_string(theirs) + " != ours " +
                 std::to_string(ours);
    }
  };
  check("magic", magic, kSegmentMagic);
  check("segment version", h->version, kSegmentVersion);
  check("wire format version", h->wire_version, kWireFormatVersion);
  check("header bytes", h->header_bytes, kSegmentHeaderBytes);
  check("deployment_id", h->deployment_id, geo.deployment_id);
  check("owner endpoint", h->owner_endpoint, static_cast<std::uint64_t>(peer));
  check("max_endpoints", h->max_endpoints, static_cast<std::uint64_t>(geo.max_endpoints));
  check("num_channels", h->num_channels, static_cast<std::uint64_t>(geo.num_channels));
  check("capacity", h->capacity, static_cast<std::uint64_t>(geo.capacity));
  check("d", h->d, static_cast<std::uint64_t>(geo.d));
  check("k", h->k, static_cast<std::uint64_t>(geo.k));
  check("num_layers", h->num_layers, static_cast<std::uint64_t>(geo.num_layers));
  check("num_experts", h->num_experts, static_cast<std::uint64_t>(geo.num_experts));
  check("hidden_dtype", h->hidden_dtype, geo.hidden_dtype);
  check("slot_bytes", h->slot_bytes, geo.Slot().bytes);
  check("total_bytes", h->total_bytes, SegmentBytes(geo));
  check("segment size", size, SegmentBytes(geo));
  if (!mismatch.empty()) {
    *why = "refusing peer inbox " + name + ": geometry/identity mismatch: " + mismatch;
    return PeerStatus::kRefused;
  }
  *out = std::move(mapping);
  return PeerStatus::kOk;
}

// ---------------------------------------------------------------------------
// Transport: the state of one endpoint
// ---------------------------------------------------------------------------

struct Pending {  // a request the client waits for (per peer, channel)
  bool valid = false;
  std::uint64_t ticket = 0;
  std::int32_t num_tokens = 0;
  std::int32_t layer = 0;
};

struct Accepted {  // a request the last poll accepted (for the reply)
  std::int32_t sender, channel, layer, first_row, num_tokens;
  std::uint64_t ticket;
};

class Transport {
 public:
  Transport(std::string deployment, std::int64_t endpoint, Geometry geo,
            std::unique_ptr<Mapping> inbox, std::string name)
      : deployment_(std::move(deployment)), endpoint_(endpoint), geo_(geo),
        slot_(geo.Slot()), name_(std::move(name)), inbox_(std::move(inbox)),
        peers_(static_cast<std::size_t>(geo.max_endpoints)),
        peer_stale_(static_cast<std::size_t>(geo.max_endpoints), false),
        next_recheck_(static_cast<std::size_t>(geo.max_endpoints)),
        send_seq_(geo.NumSlots()),
        last_seen_(new std::atomic<std::uint64_t>[geo.NumSlots()]),
        pending_(geo.NumSlots()) {
    timespec ts{};
    clock_gettime(CLOCK_REALTIME, &ts);
    const std::uint64_t start =
        (static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec)) & ~std::uint64_t{1};
    std::fill(send_seq_.begin(), send_seq_.end(), start + 2);  // last "published"
    for (std::size_t i = 0; i < geo.NumSlots(); ++i) last_seen_[i].store(0);
    for (auto& c : counters_) c.store(0);
  }

  ~Transport() { Unlink(); }

  // Marks the inbox closed for peers and removes its name (idempotent).
  void Unlink() {
    std::lock_guard<std::mutex> lock(unlink_mu_);
    if (unlinked_) return;
    unlinked_ = true;
    __atomic_store_n(&inbox_->header()->closed, 1u, __ATOMIC_RELEASE);
    shm_unlink(name_.c_str());
  }

  const Geometry& geo() const { return geo_; }
  const SlotLayout& slot() const { return slot_; }
  std::int64_t endpoint() const { return endpoint_; }
  std::size_t SlotIndex(std::int64_t sender, std::int64_t channel) const {
    return static_cast<std::size_t>(sender * geo_.num_channels + channel);
  }
  void Count(Counter c, std::int64_t n = 1) {
    counters_[c].fetch_add(n, std::memory_order_relaxed);
  }
  std::int64_t counter(int c) const { return counters_[c].load(std::memory_order_relaxed); }

  std::mutex& mu() { return mu_; }

  // Mapping of `peer`'s inbox (caller holds mu). Opens it on first use, after
  // a combine timeout marked it stale, when its owner closed it (or a new
  // owner reclaimed it), or when its name leads to another file by now.
  PeerStatus Peer(std::int64_t peer, Mapping** out, std::string* why) {
    const auto i = static_cast<std::size_t>(peer);
    auto& m = peers_[i];
    if (m && (peer_stale_[i] || m->closed() || Replaced(peer, *m))) m.reset();
    peer_stale_[i] = false;
    if (!m) {
      const PeerStatus st = OpenPeer(deployment_, peer, geo_, &m, why);
      if (st != PeerStatus::kOk) {
        m.reset();
        return st;
      }
    }
    *out = m.get();
    return PeerStatus::kOk;
  }
  void MarkPeerStale(std::int64_t peer) { peer_stale_[static_cast<std::size_t>(peer)] = true; }

  // Whether `peer`'s segment name now leads to another file than `mapped`
  // (looked at most every kPeerRecheckInterval per peer). A name that is gone
  // keeps the mapping: its owner may still read it.
  bool Replaced(std::int64_t peer, const Mapping& mapped) {
    const auto i = static_cast<std::size_t>(peer);
    const Clock::time_point now = Clock::now();
    if (now < next_recheck_[i]) return false;
    next_recheck_[i] = now + kPeerRecheckInterval;
    // One stat of the file shm_open would open (glibc keeps POSIX shared
    // memory in /dev/shm): this runs under the transport lock, on sends.
    struct stat st {};
    if (stat(("/dev/shm" + SegmentName(deployment_, peer)).c_str(), &st) != 0) return false;
    return !(FileId{st.st_dev, st.st_ino} == mapped.file());
  }

  // Sends one message to slot (this endpoint, channel) of `peer`'s inbox
  // (caller holds mu): `fill(slot_base)` writes the payload; `h` has every
  // field but seq/ticket/checksum set. An shm endpoint stores it into its
  // mapping of the peer's inbox (Publish); an ibgda endpoint assembles it in
  // its NIC writer's staging slot and posts it as RDMA WRITEs. Returns kOk and
  // the published seq, or why the peer cannot be sent to (`why`).
  template <typename Fill>
  PeerStatus Send(std::int64_t peer, std::int64_t channel, MessageHeader h, bool ticket_is_seq, Fill&& fill,
                  std::uint64_t* seq, std::string* why) {
    if (nic_ == nullptr) {
      Mapping* mapping = nullptr;
      const PeerStatus st = Peer(peer, &mapping, why);
      if (st == PeerStatus::kOk) *seq = Publish(mapping, peer, channel, h, ticket_is_seq, fill);
      return st;
    }
    std::uint8_t* staged = nic_->Stage(peer, channel, why);
    if (staged == nullptr) return PeerStatus::kUnavailable;
    *seq = NextSeq(peer, channel);
    fill(staged);
    Seal(&h, *seq, ticket_is_seq);
    std::memcpy(staged, &h, sizeof(h));
    if (!nic_->Post(peer, channel, MessageRanges(h), *seq)) {
      *why = "its send queue is full";
      return PeerStatus::kUnavailable;
    }
    return PeerStatus::kOk;
  }

  // The NIC writer of an ibgda endpoint (nullptr: an shm endpoint).
  ibgda::NicWriter* nic() { return nic_.get(); }
  void AttachNic(std::unique_ptr<ibgda::NicWriter> nic) { nic_ = std::move(nic); }

  Mapping& inbox() { return *inbox_; }
  std::atomic<std::uint64_t>& last_seen(std::size_t slot_index) { return last_seen_[slot_index]; }
  Pending& pending(std::int64_t peer, std::int64_t channel) {
    return pending_[SlotIndex(peer, channel)];
  }

  // Poll bookkeeping (guarded by mu).
  std::vector<Accepted> accepted;
  std::int64_t accepted_rows = 0;
  std::int64_t accepted_capacity = -1;  // C of the poll, -1: nothing to reply
  std::size_t poll_start = 0;

 private:
  std::uint64_t NextSeq(std::int64_t peer, std::int64_t channel) {
    std::uint64_t& last = send_seq_[SlotIndex(peer, channel)];
    last += 2;
    return last;
  }

  static void Seal(MessageHeader* h, std::uint64_t seq, bool ticket_is_seq) {
    h->seq = seq;
    if (ticket_is_seq) h->ticket = seq;
    h->checksum = HeaderChecksum(*h);
  }

  // The bytes of a slot that message `h` occupies, past its sequence word:
  // the rest of the header with the first payload array's used rows, then
  // each other array's used rows (a request's expert ids, gates and, for
  // float8 rows, scales; a reply has none).
  ibgda::SlotRanges MessageRanges(const MessageHeader& h) const {
    const std::size_t n = h.num_tokens;
    const std::size_t seq_bytes = sizeof(h.seq);
    ibgda::SlotRanges ranges;
    ranges.Add(seq_bytes,
               slot_.hidden_offset - seq_bytes + n * static_cast<std::size_t>(geo_.d) * HiddenElementBytes(h.hidden_dtype));
    if (h.kind == kKindRequest) {
      const std::size_t ids = n * static_cast<std::size_t>(geo_.k) * sizeof(std::int32_t);
      ranges.Add(slot_.expert_ids_offset, ids);
      ranges.Add(slot_.gates_offset, ids);
      if (h.hidden_dtype == kHiddenF8E4M3) ranges.Add(slot_.scales_offset, n * sizeof(float));
    }
    return ranges;
  }

  // Publishes one message into slot (this endpoint, channel) of `peer`'s
  // mapped inbox (the shm path of Send). Returns the published seq.
  template <typename Fill>
  std::uint64_t Publish(Mapping* peer, std::int64_t peer_index, std::int64_t channel,
                        MessageHeader h, bool ticket_is_seq, Fill&& fill) {
    const std::uint64_t seq = NextSeq(peer_index, channel);
    std::uint8_t* slot = peer->slot(endpoint_, channel);
    auto* shared_h = reinterpret_cast<MessageHeader*>(slot);
    __atomic_store_n(&shared_h->seq, seq - 1, __ATOMIC_RELAXED);  // odd: writing
    __atomic_thread_fence(__ATOMIC_RELEASE);
    fill(slot);
    Seal(&h, seq, ticket_is_seq);
    std::memcpy(slot + sizeof(std::uint64_t),
                reinterpret_cast<const std::uint8_t*>(&h) + sizeof(std::uint64_t),
                sizeof(MessageHeader) - sizeof(std::uint64_t));
    __atomic_store_n(&shared_h->seq, seq, __ATOMIC_RELEASE);
    return seq;
  }

  std::string deployment_;
  std::int64_t endpoint_;
  Geometry geo_;
  SlotLayout slot_;
  std::string name_;
  std::unique_ptr<Mapping> inbox_;
  // Declared after the inbox, so destroyed before it: its NIC writes there.
  std::unique_ptr<ibgda::NicWriter> nic_;
  std::mutex mu_;
  std::vector<std::shared_ptr<Mapping>> peers_;
  std::vector<bool> peer_stale_;
  std::vector<Clock::time_point> next_recheck_;  // per peer: when Replaced looks again
  std::vector<std::uint64_t> send_seq_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> last_seen_;
  std::vector<Pending> pending_;
  std::atomic<std::int64_t> counters_[kNumCounters];
  std::mutex unlink_mu_;
  bool unlinked_ = false;
};

// ---------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------

std::mutex g_registry_mu;
std::map<std::int64_t, std::shared_ptr<Transport>>& Registry() {
  static auto* registry = new std::map<std::int64_t, std::shared_ptr<Transport>>();
  return *registry;
}

std::shared_ptr<Transport> Lookup(std::int64_t endpoint) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto it = Registry().find(endpoint);
  return it == Registry().end() ? nullptr : it->second;
}

// Who owns an existing segment, as its header says (pid 0: not an eaas
// segment, or not initialised yet).
struct StaleOwner {
  std::int64_t pid = 0;
  std::uint64_t start_time = 0;
};

// Reads the owner of the existing segment `name`; returns "" or why it may not
// be touched (another user's file, an odd mode: CheckSegmentFile).
std::string ReadOwner(const std::string& name, StaleOwner* owner) {
  const int fd = shm_open(name.c_str(), O_RDONLY, 0);
  if (fd < 0) return errno == EACCES ? "cannot open " + name + " (another user's segment?)" : "";
  struct stat st {};
  const std::string refused = fstat(fd, &st) != 0 ? "cannot stat " + name + ": " + ErrnoText(errno)
                                                  : CheckSegmentFile(st, name);
  if (refused.empty() && static_cast<std::size_t>(st.st_size) >= kSegmentHeaderBytes) {
    void* p = mmap(nullptr, kSegmentHeaderBytes, PROT_READ, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED) {
      const auto* h = static_cast<const SegmentHeader*>(p);
      if (LoadAcquire(&h->magic) == kSegmentMagic) {
        owner->pid = h->owner_pid;
        owner->start_time = h->owner_start_time;
      }
      munmap(p, kSegmentHeaderBytes);
    }
  }
  close(fd);
  return refused;
}

// Takes over the segment `name` of a dead owner: marks it closed, as its owner
// would have on close, so that peers still mapping it open the name again on
// their next send and reach the new inbox; then unlinks it.
void ReclaimStale(const std::string& name) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd >= 0) {
    void* p = mmap(nullptr, kSegmentHeaderBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED) {
      __atomic_store_n(&static_cast<SegmentHeader*>(p)->closed, 1u, __ATOMIC_RELEASE);
      munmap(p, kSegmentHeaderBytes);
    }
    close(fd);
  }
  shm_unlink(name.c_str());
}

// Creates the inbox segment of `endpoint`. Returns "" or an error message.
std::string CreateInbox(const std::string& deployment, std::int64_t endpoint,
                        const Geometry& geo, std::unique_ptr<Mapping>* out,
                        std::string* name_out, bool* in_use) {
  const std::string name = SegmentName(deployment, endpoint);
  *name_out = name;
  *in_use = false;
  int fd = -1;
  for (int attempt = 0; attempt < 2; ++attempt) {
    fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd >= 0) break;
    if (errno != EEXIST) {
      return "cannot create shared-memory inbox " + name + ": " + ErrnoText(errno);
    }
    // Someone has it: reclaim it only if it is ours and its owner process is gone.
    *in_use = true;
    StaleOwner owner;
    const std::string refused = ReadOwner(name, &owner);
    if (!refused.empty()) {
      return "endpoint " + std::to_string(endpoint) + " of deployment '" + deployment + "' is unavailable: " +
             refused + "; it was left alone";
    }
    if (owner.pid > 0 && !OwnerAlive(owner.pid, owner.start_time) && attempt == 0) {
      ReclaimStale(name);
      *in_use = false;
      continue;
    }
    if (owner.pid > 0) {
      return "endpoint " + std::to_string(endpoint) + " of deployment '" + deployment +
             "' is already open: shared-memory inbox " + name + " is owned by pid " +
             std::to_string(owner.pid) + (owner.pid == getpid() ? " (this process)" : "");
    }
    return "endpoint " + std::to_string(endpoint) + " of deployment '" + deployment +
           "' is already in use: shared-memory inbox " + name +
           " exists (being created, or not an eaas segment); remove /dev/shm" + name +
           " if no process uses it";
  }
  if (fd < 0) return "cannot create shared-memory inbox " + name;
  const std::size_t total = SegmentBytes(geo);
  void* base = nullptr;
  const std::string failed = SizeAndMapSegment(fd, name, "inbox", total, &base);
  if (!failed.empty()) return failed;
  auto mapping = std::make_unique<Mapping>(base, total, geo);
  SegmentHeader* h = mapping->header();
  h->version = kSegmentVersion;
  h->wire_version = kWireFormatVersion;
  h->header_bytes = kSegmentHeaderBytes;
  h->owner_endpoint = static_cast<std::uint32_t>(endpoint);
  h->max_endpoints = static_cast<std::uint32_t>(geo.max_endpoints);
  h->num_channels = static_cast<std::uint32_t>(geo.num_channels);
  h->capacity = static_cast<std::uint32_t>(geo.capacity);
  h->d = static_cast<std::uint32_t>(geo.d);
  h->k = static_cast<std::uint32_t>(geo.k);
  h->num_layers = static_cast<std::uint32_t>(geo.num_layers);
  h->num_experts = static_cast<std::uint32_t>(geo.num_experts);
  h->hidden_dtype = geo.hidden_dtype;
  h->closed = 0;
  h->deployment_id = geo.deployment_id;
  h->slot_bytes = geo.Slot().bytes;
  h->total_bytes = total;
  h->owner_pid = getpid();
  h->owner_start_time = ProcessStartTime(getpid());
  __atomic_store_n(&h->magic, kSegmentMagic, __ATOMIC_RELEASE);
  *out = std::move(mapping);
  return "";
}

// ---------------------------------------------------------------------------
// Routing (shared by dispatch and combine: they must agree on token order)
// ---------------------------------------------------------------------------

// For each server s (servers[s] an endpoint or -1): the tokens t (ascending)
// with any targets[t, j] == servers[s]. Returns "" or an error message.
std::string Route(const std::int32_t* targets, std::int64_t T, std::int64_t k,
                  const std::int32_t* servers, std::int64_t S, std::int64_t max_endpoints,
                  std::vector<std::vector<std::int32_t>>* tokens, bool* unrouted) {
  std::vector<std::int32_t> server_of(static_cast<std::size_t>(max_endpoints), -1);
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int32_t p = servers[s];
    if (p == -1) continue;
    if (p < 0 || p >= max_endpoints) {
      return "servers[" + std::to_string(s) + "] = " + std::to_string(p) +
             " is not an endpoint index in [0, " + std::to_string(max_endpoints) + ") or -1";
    }
    if (server_of[static_cast<std::size_t>(p)] != -1) {
      return "endpoint " + std::to_string(p) + " appears twice in servers";
    }
    server_of[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(s);
  }
  tokens->assign(static_cast<std::size_t>(S), {});
  std::vector<std::int64_t> last_token(static_cast<std::size_t>(S), -1);
  *unrouted = false;
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t p = targets[t * k + j];
      if (p == -1) continue;
      if (p < 0 || p >= max_endpoints || server_of[static_cast<std::size_t>(p)] < 0) {
        *unrouted = true;
        continue;
      }
      const auto s = static_cast<std::size_t>(server_of[static_cast<std::size_t>(p)]);
      if (last_token[s] != t) {
        last_token[s] = t;
        (*tokens)[s].push_back(static_cast<std::int32_t>(t));
      }
    }
  }
  return "";
}

ffi::Error NotOpen(const char* where, std::int64_t endpoint) {
  return ffi::Error::InvalidArgument(
      std::string(where) + ": shm endpoint " + std::to_string(endpoint) +
      " is not open in this process (open it with eaas_jax.transport.shm.ShmEndpoint)");
}

std::string Dims(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// Validates a copied request/reply header's common fields (CheckMessageHeader
// with this endpoint's geometry).
Counter CheckHeader(const MessageHeader& h, const Geometry& geo, std::uint16_t kind,
                    std::int64_t sender, std::int64_t channel) {
  return CheckMessageHeader(h, geo.deployment_id, geo.capacity, geo.num_layers, geo.hidden_dtype,
                            kind, sender, channel);
}

// ---------------------------------------------------------------------------
// eaas_shm_dispatch
// ---------------------------------------------------------------------------
// The header of a message this endpoint sends (Publish fills seq, ticket for
// requests, and the checksum).
MessageHeader NewHeader(const Transport& tr, std::uint32_t kind, std::int64_t layer,
                        std::int64_t micro_batch, std::size_t num_tokens) {
  MessageHeader h{};
  h.deployment_id = tr.geo().deployment_id;
  h.kind = kind;
  h.hidden_dtype = static_cast<std::uint16_t>(
      kind == kKindRequest ? tr.geo().hidden_dtype : std::uint32_t{kHiddenF32});
  h.sender = static_cast<std::uint32_t>(tr.endpoint());
  h.layer = static_cast<std::uint32_t>(layer);
  h.micro_batch = static_cast<std::uint32_t>(micro_batch);
  h.num_tokens = static_cast<std::uint32_t>(num_tokens);
  return h;
}

ffi::Error DispatchImpl(ffi::AnyBuffer hidden, ffi::Buffer<ffi::F32, 1> scales,
                        ffi::Buffer<ffi::S32, 2> expert_ids,
                        ffi::Buffer<ffi::F32, 2> gates, ffi::Buffer<ffi::S32, 2> targets,
                        ffi::Buffer<ffi::S32, 1> servers, ffi::AnyBuffer /*after*/,
                        ffi::ResultBuffer<ffi::S32, 1> sent, std::int64_t endpoint,
                        std::int64_t layer, std::int64_t micro_batch) {
  static constexpr const char* kWhere = "eaas_shm_dispatch";
  auto tr = Lookup(endpoint);
  if (!tr) return NotOpen(kWhere, endpoint);
  const Geometry& geo = tr->geo();
  const auto hd = hidden.dimensions();
  if (hd.size() != 2 || hd[1] != geo.d || hidden.element_type() != HiddenFfiType(geo.hidden_dtype)) {
    return ffi::Error::InvalidArgument(
        std::string(kWhere) + ": hidden is " + Dims(hd) + " of XLA type " +
        std::to_string(static_cast<int>(hidden.element_type())) + ", expected [T, d=" +
        std::to_string(geo.d) + "] of the deployment's dispatch dtype (XLA type " +
        std::to_string(static_cast<int>(HiddenFfiType(geo.hidden_dtype))) + ")");
  }
  const std::int64_t T = hd[0];
  const std::int64_t S = servers.dimensions()[0];
  if (scales.dimensions()[0] != T) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": scales is " +
                                       Dims(scales.dimensions()) + ", expected [T]");
  }
  for (auto* b : {&expert_ids, &targets}) {
    if (b->dimensions()[0] != T || b->dimensions()[1] != geo.k) {
      return ffi::Error::InvalidArgument(std::string(kWhere) + ": expert_ids/targets are " +
                                         Dims(b->dimensions()) + ", expected [T=" +
                                         std::to_string(T) + ", k=" + std::to_string(geo.k) + "]");
    }
  }
  if (gates.dimensions()[0] != T || gates.dimensions()[1] != geo.k) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": gates is " +
                                       Dims(gates.dimensions()) + ", expected [T, k]");
  }
  if (sent->dimensions()[0] != S) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": sent must be [S]");
  }
  if (T > geo.capacity) {
    return ffi::Error::InvalidArgument(
        std::string(kWhere) + ": " + std::to_string(T) + " tokens exceed the mailbox capacity " +
        std::to_string(geo.capacity) + " (open the endpoints with capacity >= tokens per micro-batch)");
  }
  if (layer < 0 || layer >= geo.num_layers || micro_batch < 0 || micro_batch >= geo.num_channels) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": layer " + std::to_string(layer) +
                                       " / micro_batch " + std::to_string(micro_batch) +
                                       " out of range");
  }
  std::vector<std::vector<std::int32_t>> tokens;
  bool unrouted = false;
  const std::string route_error = Route(targets.typed_data(), T, geo.k, servers.typed_data(), S,
                                        geo.max_endpoints, &tokens, &unrouted);
  if (!route_error.empty()) return ffi::Error::InvalidArgument(std::string(kWhere) + ": " + route_error);
  if (unrouted) tr->Count(kUnroutedTargets);

  const auto* x = static_cast<const std::uint8_t*>(hidden.untyped_data());
  const std::size_t row_bytes = static_cast<std::size_t>(geo.d) * HiddenElementBytes(geo.hidden_dtype);
  const bool scaled = geo.hidden_dtype == kHiddenF8E4M3;
  const float* sc = scales.typed_data();
  const std::int32_t* eids = expert_ids.typed_data();
  const float* g = gates.typed_data();
  const std::int32_t* tg = targets.typed_data();
  const std::int32_t* srv = servers.typed_data();
  std::int32_t* out = sent->typed_data();
  const std::int64_t k = geo.k;
  const SlotLayout layout = tr->slot();

  std::lock_guard<std::mutex> lock(tr->mu());
  for (std::int64_t s = 0; s < S; ++s) {
    out[s] = 0;
    const std::int32_t p = srv[s];
    if (p == -1) continue;
    const auto& toks = tokens[static_cast<std::size_t>(s)];
    // A server sent nothing keeps what it owes on this channel: a probe of a
    // server no step routes to (runtime/admission.py) outlives the steps.
    if (toks.empty()) continue;
    Pending& pending = tr->pending(p, micro_batch);
    pending.valid = false;
    const MessageHeader h = NewHeader(*tr, kKindRequest, layer, micro_batch, toks.size());
    std::uint64_t seq = 0;
    std::string why;
    const PeerStatus st = tr->Send(
        p, micro_batch, h, /*ticket_is_seq=*/true, [&](std::uint8_t* slot) {
          std::uint8_t* dh = slot + layout.hidden_offset;
          auto* de = reinterpret_cast<std::int32_t*>(slot + layout.expert_ids_offset);
          auto* dg = reinterpret_cast<float*>(slot + layout.gates_offset);
          auto* ds = reinterpret_cast<float*>(slot + layout.scales_offset);
          for (std::size_t r = 0; r < toks.size(); ++r) {
            const std::int64_t t = toks[r];
            std::memcpy(dh + r * row_bytes, x + static_cast<std::size_t>(t) * row_bytes, row_bytes);
            if (scaled) ds[r] = sc[t];
            for (std::int64_t j = 0; j < k; ++j) {
              const bool mine = tg[t * k + j] == p;
              de[r * k + j] = mine ? eids[t * k + j] : -1;
              dg[r * k + j] = mine ? g[t * k + j] : 0.0f;
            }
          }
        }, &seq, &why);
    if (st != PeerStatus::kOk) {
      tr->Count(st == PeerStatus::kRefused ? kPeerRefused : kPeerUnavailable);
      out[s] = -1;
      continue;
    }
    pending.valid = true;
    pending.ticket = seq;
    pending.num_tokens = static_cast<std::int32_t>(toks.size());
    pending.layer = static_cast<std::int32_t>(layer);
    out[s] = static_cast<std::int32_t>(toks.size());
    tr->Count(kRequestsSent);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// eaas_shm_combine
// ---------------------------------------------------------------------------

ffi::Error CombineImpl(ffi::Buffer<ffi::S32, 1> sent, ffi::Buffer<ffi::S32, 2> targets,
                       ffi::Buffer<ffi::S32, 1> servers, ffi::Buffer<ffi::S32, 0> timeout_us,
                       ffi::AnyBuffer /*after*/, ffi::ResultBuffer<ffi::F32, 2> out,
                       ffi::ResultBuffer<ffi::S32, 1> status, ffi::ResultBuffer<ffi::S32, 1> waited_us,
                       std::int64_t endpoint, std::int64_t layer, std::int64_t micro_batch) {
  static constexpr const char* kWhere = "eaas_shm_combine";
  const Clock::time_point started = Clock::now();
  // An operand, not an attribute: the client adapts it between steps without recompiling.
  const Clock::time_point deadline = DeadlineAfterUs(timeout_us.typed_data()[0]);
  auto tr = Lookup(endpoint);
  if (!tr) return NotOpen(kWhere, endpoint);
  const Geometry& geo = tr->geo();
  const std::int64_t T = targets.dimensions()[0];
  const std::int64_t S = servers.dimensions()[0];
  if (targets.dimensions()[1] != geo.k || sent.dimensions()[0] != S ||
      out->dimensions()[0] != T || out->dimensions()[1] != geo.d || status->dimensions()[0] != S ||
      waited_us->dimensions()[0] != S) {
    return ffi::Error::InvalidArgument(
        std::string(kWhere) + ": shapes do not match: sent " + Dims(sent.dimensions()) +
        ", targets " + Dims(targets.dimensions()) + ", servers " + Dims(servers.dimensions()) +
        ", out " + Dims(out->dimensions()) + " (expected [T, d=" + std::to_string(geo.d) +
        "]), k=" + std::to_string(geo.k));
  }
  if (layer < 0 || layer >= geo.num_layers || micro_batch < 0 || micro_batch >= geo.num_channels) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": layer / micro_batch out of range");
  }
  std::vector<std::vector<std::int32_t>> tokens;
  bool unrouted = false;
  const std::string route_error = Route(targets.typed_data(), T, geo.k, servers.typed_data(), S,
                                        geo.max_endpoints, &tokens, &unrouted);
  if (!route_error.empty()) return ffi::Error::InvalidArgument(std::string(kWhere) + ": " + route_error);

  const std::int32_t* sn = sent.typed_data();
  const std::int32_t* srv = servers.typed_data();
  std::int32_t* st = status->typed_data();
  std::int32_t* waited = waited_us->typed_data();
  std::fill(waited, waited + S, 0);
  // Microseconds since the call started, for the servers answered (or given up on) now.
  const auto elapsed_us = [&started] {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - started).count();
    return static_cast<std::int32_t>(std::min<std::int64_t>(us, std::numeric_limits<std::int32_t>::max()));
  };
  float* o = out->typed_data();
  const std::int64_t d = geo.d;
  std::fill(o, o + T * d, 0.0f);

  struct Wait {
    std::int64_t s, peer;
    std::uint64_t ticket;
    bool done;
    bool saw_bad;  // an invalid reply was in its slot during this wait
  };
  std::vector<Wait> waits;
  {
    std::lock_guard<std::mutex> lock(tr->mu());
    for (std::int64_t s = 0; s < S; ++s) {
      const std::int32_t p = srv[s];
      if (p == -1 || sn[s] == 0) {
        st[s] = kStatusNothingSent;
        continue;
      }
      if (sn[s] < 0) {
        st[s] = kStatusUnavailable;
        continue;
      }
      Pending& pd = tr->pending(p, micro_batch);
      const auto n = static_cast<std::int64_t>(tokens[static_cast<std::size_t>(s)].size());
      if (!pd.valid || pd.num_tokens != sn[s] || pd.layer != layer || n != sn[s]) {
        return ffi::Error::InvalidArgument(
            std::string(kWhere) + ": no matching dispatch outstanding for server " +
            std::to_string(p) + " (micro_batch " + std::to_string(micro_batch) + ", layer " +
            std::to_string(layer) + ", sent " + std::to_string(sn[s]) +
            "): combine must follow the dispatch of the same layer/micro-batch with the same "
            "targets and servers, once");
      }
      waits.push_back({s, p, pd.ticket, false, false});
      st[s] = kStatusTimeout;
    }
    // Consumed: a second combine without a new dispatch is an error, and a
    // late reply to this request will be skipped as stale.
    for (const auto& w : waits) tr->pending(w.peer, micro_batch).valid = false;
  }

  const SlotLayout layout = tr->slot();
  std::vector<float> rows;
  std::size_t remaining = waits.size();
  Backoff backoff(deadline);
  while (remaining > 0) {
    for (auto& w : waits) {
      if (w.done) continue;
      const std::size_t si = tr->SlotIndex(w.peer, micro_batch);
      std::atomic<std::uint64_t>& seen = tr->last_seen(si);
      const std::uint8_t* slot = tr->inbox().slot(w.peer, micro_batch);
      const auto* shared_h = reinterpret_cast<const MessageHeader*>(slot);
      const std::uint64_t s1 = LoadAcquire(&shared_h->seq);
      if (s1 == 0 || (s1 & 1) || s1 == seen.load(std::memory_order_relaxed)) continue;
      MessageHeader h;
      std::memcpy(&h, slot, sizeof(h));
      Counter bad = h.seq != s1 ? kTornReads : CheckHeader(h, geo, kKindReply, w.peer, micro_batch);
      bool stale = false;
      if (bad == kNumCounters) {
        if (h.ticket != w.ticket) {
          stale = true;
        } else if (h.layer != static_cast<std::uint64_t>(layer)) {
          bad = kDropLayer;
        } else if (h.num_tokens != static_cast<std::uint64_t>(sn[w.s])) {
          bad = kDropReplySize;
        } else {
          rows.resize(static_cast<std::size_t>(h.num_tokens * d));
          std::memcpy(rows.data(), slot + layout.hidden_offset, rows.size() * sizeof(float));
        }
      }
      __atomic_thread_fence(__ATOMIC_ACQUIRE);
      if (bad == kTornReads || LoadRelaxed(&shared_h->seq) != s1) {
        tr->Count(kTornReads);
        continue;  // rewritten while copying: look again
      }
      seen.store(s1, std::memory_order_relaxed);
      if (stale) {
        tr->Count(kStaleReplies);
        continue;
      }
      if (bad != kNumCounters) {
        // Dropped, and the wait goes on: one malformed message (a faulty or
        // hostile writer of the slot) must not cost the server's real reply.
        tr->Count(bad);
        w.saw_bad = true;
        continue;
      }
      w.done = true;
      --remaining;
      waited[w.s] = elapsed_us();
      const auto& toks = tokens[static_cast<std::size_t>(w.s)];
      for (std::size_t r = 0; r < toks.size(); ++r) {
        float* dst = o + static_cast<std::int64_t>(toks[r]) * d;
        const float* src = rows.data() + r * static_cast<std::size_t>(d);
        for (std::int64_t c = 0; c < d; ++c) dst[c] += src[c];
      }
      st[w.s] = kStatusOk;
      tr->Count(kRepliesAccepted);
    }
    if (remaining == 0 || !backoff.Wait()) break;
  }
  if (remaining > 0) {
    std::lock_guard<std::mutex> lock(tr->mu());
    for (const auto& w : waits) {
      if (w.done) continue;
      waited[w.s] = elapsed_us();
      if (w.saw_bad) st[w.s] = kStatusBadReply;
      tr->Count(kTimeouts);
      tr->MarkPeerStale(w.peer);  // re-open its inbox by name on the next send
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// eaas_shm_poll
// ---------------------------------------------------------------------------
ffi::Error PollImpl(ffi::Buffer<ffi::S32, 2> hosted, ffi::AnyBuffer /*after*/,
                    ffi::Result<ffi::AnyBuffer> out_hidden,
                    ffi::ResultBuffer<ffi::F32, 1> out_scales,
                    ffi::ResultBuffer<ffi::S32, 2> out_expert_ids,
                    ffi::ResultBuffer<ffi::F32, 2> out_gates, ffi::ResultBuffer<ffi::S32, 1> out_layer,
                    ffi::ResultBuffer<ffi::S32, 0> out_num_rows, std::int64_t endpoint,
                    std::int64_t max_messages, std::int64_t timeout_us) {
  static constexpr const char* kWhere = "eaas_shm_poll";
  const Clock::time_point deadline = DeadlineAfterUs(timeout_us);
  auto tr = Lookup(endpoint);
  if (!tr) return NotOpen(kWhere, endpoint);
  const Geometry& geo = tr->geo();
  const std::int64_t C = out_hidden->dimensions()[0];
  const std::int64_t d = geo.d, k = geo.k, E = geo.num_experts;
  if (hosted.dimensions()[0] != geo.num_layers || hosted.dimensions()[1] != E) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": hosted is " +
                                       Dims(hosted.dimensions()) + ", expected [num_layers=" +
                                       std::to_string(geo.num_layers) + ", num_experts=" +
                                       std::to_string(E) + "]");
  }
  if (out_hidden->dimensions().size() != 2 ||
      out_hidden->element_type() != HiddenFfiType(geo.hidden_dtype) ||
      out_scales->dimensions()[0] != C ||
      out_hidden->dimensions()[1] != d || out_expert_ids->dimensions()[0] != C ||
      out_expert_ids->dimensions()[1] != k || out_gates->dimensions()[0] != C ||
      out_gates->dimensions()[1] != k || out_layer->dimensions()[0] != C) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": outputs must be hidden [C, d=" +
                                       std::to_string(d) + "] of the dispatch dtype, scales [C], "
                                       "expert_ids/gates [C, k=" + std::to_string(k) +
                                       "], layer [C]");
  }
  if (C < geo.capacity) {
    return ffi::Error::InvalidArgument(
        std::string(kWhere) + ": poll capacity " + std::to_string(C) +
        " rows is below the mailbox capacity " + std::to_string(geo.capacity) +
        " (a full message would never fit)");
  }
  if (max_messages < 1) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": max_messages must be >= 1");
  }
  const std::int32_t* host = hosted.typed_data();
  auto* oh = static_cast<std::uint8_t*>(out_hidden->untyped_data());
  const std::size_t row_bytes = static_cast<std::size_t>(d) * HiddenElementBytes(geo.hidden_dtype);
  const bool scaled = geo.hidden_dtype == kHiddenF8E4M3;
  float* os = out_scales->typed_data();
  std::int32_t* oe = out_expert_ids->typed_data();
  float* og = out_gates->typed_data();
  std::int32_t* ol = out_layer->typed_data();

  std::size_t start;
  {
    std::lock_guard<std::mutex> lock(tr->mu());
    start = tr->poll_start;
  }
  const std::size_t nslots = geo.NumSlots();
  const SlotLayout layout = tr->slot();
  std::vector<Accepted> accepted;
  std::int64_t used = 0;
  std::size_t first_deferred = nslots;
  Backoff backoff(deadline);
  for (;;) {
    first_deferred = nslots;
    for (std::size_t i = 0; i < nslots; ++i) {
      const std::size_t si = (start + i) % nslots;
      const auto sender = static_cast<std::int64_t>(si) / geo.num_channels;
      const auto channel = static_cast<std::int64_t>(si) % geo.num_channels;
      std::atomic<std::uint64_t>& seen = tr->last_seen(si);
      const std::uint8_t* slot = tr->inbox().slot(sender, channel);
      const auto* shared_h = reinterpret_cast<const MessageHeader*>(slot);
      const std::uint64_t s1 = LoadAcquire(&shared_h->seq);
      if (s1 == 0 || (s1 & 1) || s1 == seen.load(std::memory_order_relaxed)) continue;
      MessageHeader h;
      std::memcpy(&h, slot, sizeof(h));
      Counter bad = h.seq != s1 ? kTornReads : CheckHeader(h, geo, kKindRequest, sender, channel);
      const std::int64_t n = h.num_tokens;
      bool defer = false;
      if (bad == kNumCounters) {
        if (static_cast<std::int64_t>(accepted.size()) >= max_messages || used + n > C) {
          defer = true;
        } else {
          // Copy into the outputs at row `used`; committed only if not torn.
          std::memcpy(oh + static_cast<std::size_t>(used) * row_bytes, slot + layout.hidden_offset,
                      static_cast<std::size_t>(n) * row_bytes);
          if (scaled) {
            std::memcpy(os + used, slot + layout.scales_offset,
                        static_cast<std::size_t>(n) * sizeof(float));
          } else {
            std::fill(os + used, os + used + n, 1.0f);
          }
          std::memcpy(oe + used * k, slot + layout.expert_ids_offset,
                      static_cast<std::size_t>(n * k) * sizeof(std::int32_t));
          std::memcpy(og + used * k, slot + layout.gates_offset,
                      static_cast<std::size_t>(n * k) * sizeof(float));
        }
      }
      __atomic_thread_fence(__ATOMIC_ACQUIRE);
      if (bad == kTornReads || LoadRelaxed(&shared_h->seq) != s1) {
        tr->Count(kTornReads);
        continue;
      }
      if (defer) {
        tr->Count(kDeferred);
        if (first_deferred == nslots) first_deferred = si;
        continue;  // stays unseen: picked up by a later poll
      }
      if (bad == kNumCounters) {
        // Validate the expert ids on our private copy.
        const std::int64_t l = h.layer;
        for (std::int64_t r = used; r < used + n && bad == kNumCounters; ++r) {
          for (std::int64_t j = 0; j < k; ++j) {
            const std::int32_t e = oe[r * k + j];
            if (e == -1) {
              og[r * k + j] = 0.0f;
            } else if (e < 0 || e >= E || host[l * E + e] == 0) {
              bad = kDropExpert;
              break;
            }
          }
        }
      }
      seen.store(s1, std::memory_order_relaxed);
      if (bad != kNumCounters) {
        tr->Count(bad);
        continue;
      }
      for (std::int64_t r = used; r < used + n; ++r) ol[r] = static_cast<std::int32_t>(h.layer);
      accepted.push_back({static_cast<std::int32_t>(sender), static_cast<std::int32_t>(channel),
                          static_cast<std::int32_t>(h.layer), static_cast<std::int32_t>(used),
                          static_cast<std::int32_t>(n), h.ticket});
      used += n;
      tr->Count(kRequestsAccepted);
    }
    if (!accepted.empty() || !backoff.Wait()) break;
  }
  // Padding rows.
  std::fill(oh + static_cast<std::size_t>(used) * row_bytes, oh + static_cast<std::size_t>(C) * row_bytes,
            std::uint8_t{0});
  std::fill(os + used, os + C, 1.0f);
  std::fill(oe + used * k, oe + C * k, -1);
  std::fill(og + used * k, og + C * k, 0.0f);
  std::fill(ol + used, ol + C, -1);
  *out_num_rows->typed_data() = static_cast<std::int32_t>(used);

  std::lock_guard<std::mutex> lock(tr->mu());
  if (!tr->accepted.empty()) tr->Count(kUnreplied, static_cast<std::int64_t>(tr->accepted.size()));
  tr->accepted = std::move(accepted);
  tr->accepted_rows = used;
  tr->accepted_capacity = C;
  // Fairness: start the next sweep at the first message left behind, else one
  // slot further than this one.
  tr->poll_start = first_deferred != nslots ? first_deferred : (start + 1) % nslots;
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// eaas_shm_reply
// ---------------------------------------------------------------------------
ffi::Error ReplyImpl(ffi::Buffer<ffi::F32, 2> results, ffi::Buffer<ffi::S32, 0> num_rows,
                     ffi::ResultBuffer<ffi::S32, 0> token, std::int64_t endpoint) {
  static constexpr const char* kWhere = "eaas_shm_reply";
  auto tr = Lookup(endpoint);
  if (!tr) return NotOpen(kWhere, endpoint);
  const Geometry& geo = tr->geo();
  const std::int64_t C = results.dimensions()[0];
  const std::int64_t d = geo.d;
  if (results.dimensions()[1] != d) {
    return ffi::Error::InvalidArgument(std::string(kWhere) + ": out is " +
                                       Dims(results.dimensions()) + ", expected [C, d=" +
                                       std::to_string(d) + "]");
  }
  const std::int32_t rows_in = *num_rows.typed_data();
  const float* res = results.typed_data();
  const SlotLayout layout = tr->slot();
  std::lock_guard<std::mutex> lock(tr->mu());
  if (tr->accepted_capacity < 0) {
    if (rows_in != 0) {
      return ffi::Error::InvalidArgument(std::string(kWhere) +
                                         ": no poll to reply to (reply called twice?)");
    }
    *token->typed_data() = 0;
    return ffi::Error::Success();
  }
  if (C != tr->accepted_capacity || rows_in != tr->accepted_rows) {
    return ffi::Error::InvalidArgument(
        std::string(kWhere) + ": out has " + std::to_string(C) + " rows and num_rows is " +
        std::to_string(rows_in) + ", but the last poll returned " +
        std::to_string(tr->accepted_capacity) + " rows with " +
        std::to_string(tr->accepted_rows) + " in use");
  }
  std::int32_t replies = 0;
  for (const Accepted& a : tr->accepted) {
    MessageHeader h = NewHeader(*tr, kKindReply, a.layer, a.channel,
                                static_cast<std::size_t>(a.num_tokens));
    h.ticket = a.ticket;
    std::uint64_t seq = 0;
    std::string why;
    const PeerStatus st = tr->Send(a.sender, a.channel, h, /*ticket_is_seq=*/false, [&](std::uint8_t* slot) {
      std::memcpy(slot + layout.hidden_offset, res + static_cast<std::int64_t>(a.first_row) * d,
                  static_cast<std::size_t>(a.num_tokens) * static_cast<std::size_t>(d) *
                      sizeof(float));
    }, &seq, &why);
    if (st != PeerStatus::kOk) {
      tr->Count(st == PeerStatus::kRefused ? kPeerRefused : kPeerUnavailable);
      continue;
    }
    ++replies;
    tr->Count(kRepliesSent);
  }
  tr->accepted.clear();
  tr->accepted_rows = 0;
  tr->accepted_capacity = -1;
  *token->typed_data() = replies;
  return ffi::Error::Success();
}

}  // namespace

// The geometry arguments of the open calls, as they come.
struct OpenArgs {
  std::int64_t max_endpoints, num_channels, capacity, d, k, num_layers, num_experts, hidden_dtype;
};

// Opens an endpoint: creates its inbox and, when `nic_host` is given (the
// ibgda backend), a NIC writer listening there, whose card goes to *card and
// NIC handle to *nic. Returns as eaas_shm_open does.
int OpenEndpoint(const char* deployment, std::uint64_t deployment_id, std::int64_t endpoint, const OpenArgs& a,
                 const char* nic_host, ibgda::Card* card, std::int64_t* nic, char* err, std::int64_t errlen) {
  const std::string dep = deployment ? deployment : "";
  if (!ValidDeploymentName(dep)) {
    CopyError("deployment name must be 1-40 characters of [A-Za-z0-9_-], got '" + dep + "'",
              err, errlen);
    return -1;
  }
  Geometry geo;
  const std::string bad = MakeGeometry({4096, 64, 1 << 20, 1 << 20, 1 << 20, 1024, 1 << 16, 1 << 20}, endpoint,
                                       deployment_id, a.max_endpoints, a.num_channels, a.capacity, a.d, a.k,
                                       a.num_layers, a.num_experts, a.hidden_dtype, &geo);
  if (!bad.empty()) {
    CopyError(bad, err, errlen);
    return -1;
  }
  const double bytes = static_cast<double>(SegmentBytes(geo));
  if (bytes > static_cast<double>(std::int64_t{1} << 40)) {
    CopyError("inbox would need " + std::to_string(bytes) + " bytes", err, errlen);
    return -1;
  }
  std::lock_guard<std::mutex> lock(g_registry_mu);
  if (Registry().count(endpoint)) {
    CopyError("endpoint " + std::to_string(endpoint) +
                  " is already open in this process (close it first)",
              err, errlen);
    return -2;
  }
  std::unique_ptr<Mapping> inbox;
  std::string name;
  bool in_use = false;
  const std::string msg = CreateInbox(dep, endpoint, geo, &inbox, &name, &in_use);
  if (!msg.empty()) {
    CopyError(msg, err, errlen);
    return in_use ? -2 : -1;
  }
  auto tr = std::make_shared<Transport>(dep, endpoint, geo, std::move(inbox), name);
  if (nic_host != nullptr) {
    ibgda::NicWriterConfig config;
    config.host = nic_host;
    config.inbox = reinterpret_cast<std::uint8_t*>(tr->inbox().header());
    config.inbox_bytes = SegmentBytes(geo);
    config.slots_offset = kSegmentHeaderBytes;
    config.slot_bytes = geo.Slot().bytes;
    config.max_endpoints = geo.max_endpoints;
    config.num_channels = geo.num_channels;
    config.endpoint = endpoint;
    std::unique_ptr<ibgda::NicWriter> writer;
    const std::string failed = ibgda::NicWriter::Open(config, &writer);
    if (!failed.empty()) {
      CopyError(failed, err, errlen);
      return -1;  // `tr` unlinks its inbox
    }
    *card = writer->card();
    *nic = writer->nic();
    tr->AttachNic(std::move(writer));
  }
  Registry()[endpoint] = std::move(tr);
  return 0;
}

// Runs `fn` on the NIC writer of the open ibgda endpoint `endpoint`, under
// its transport's lock; false when there is no such endpoint.
template <typename Fn>
bool WithNic(std::int64_t endpoint, Fn&& fn) {
  auto tr = Lookup(endpoint);
  if (tr == nullptr || tr->nic() == nullptr) return false;
  std::lock_guard<std::mutex> lock(tr->mu());
  fn(*tr->nic());
  return true;
}

}  // namespace shm
}  // namespace eaas

// ---------------------------------------------------------------------------
// Exported symbols
// ---------------------------------------------------------------------------
// Buffer types without commas: XLA_FFI_DEFINE_HANDLER_SYMBOL is a macro and
// would split `Buffer<F32, 2>` at the comma.
namespace eaas::shm {
using F32R2 = ffi::Buffer<ffi::F32, 2>;
using F32R1 = ffi::Buffer<ffi::F32, 1>;
using S32R2 = ffi::Buffer<ffi::S32, 2>;
using S32R1 = ffi::Buffer<ffi::S32, 1>;
using S32R0 = ffi::Buffer<ffi::S32, 0>;
}  // namespace eaas::shm

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_shm_dispatch, eaas::shm::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()    // hidden [T, d], dispatch dtype
                                  .Arg<eaas::shm::F32R1>()  // scales [T] (float8 rows)
                                  .Arg<eaas::shm::S32R2>()  // expert_ids [T, k]
                                  .Arg<eaas::shm::F32R2>()  // gates [T, k]
                                  .Arg<eaas::shm::S32R2>()  // targets [T, k]
                                  .Arg<eaas::shm::S32R1>()  // servers [S]
                                  .Arg<ffi::AnyBuffer>()            // after (ordering)
                                  .Ret<eaas::shm::S32R1>()  // sent [S]
                                  .Attr<std::int64_t>("endpoint")
                                  .Attr<std::int64_t>("layer")
                                  .Attr<std::int64_t>("micro_batch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_shm_combine, eaas::shm::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Arg<eaas::shm::S32R1>()  // sent [S]
                                  .Arg<eaas::shm::S32R2>()  // targets [T, k]
                                  .Arg<eaas::shm::S32R1>()  // servers [S]
                                  .Arg<eaas::shm::S32R0>()  // timeout_us []
                                  .Arg<ffi::AnyBuffer>()            // after (ordering)
                                  .Ret<eaas::shm::F32R2>()  // out [T, d]
                                  .Ret<eaas::shm::S32R1>()  // status [S]
                                  .Ret<eaas::shm::S32R1>()  // waited_us [S]
                                  .Attr<std::int64_t>("endpoint")
                                  .Attr<std::int64_t>("layer")
                                  .Attr<std::int64_t>("micro_batch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_shm_poll, eaas::shm::PollImpl,
                              ffi::Ffi::Bind()
                                  .Arg<eaas::shm::S32R2>()  // hosted [L, E]
                                  .Arg<ffi::AnyBuffer>()            // after (ordering)
                                  .Ret<ffi::AnyBuffer>()    // hidden [C, d], dispatch dtype
                                  .Ret<eaas::shm::F32R1>()  // scales [C] (1 unless float8)
                                  .Ret<eaas::shm::S32R2>()  // expert_ids [C, k]
                                  .Ret<eaas::shm::F32R2>()  // gates [C, k]
                                  .Ret<eaas::shm::S32R1>()  // layer [C]
                                  .Ret<eaas::shm::S32R0>()   // num_rows []
                                  .Attr<std::int64_t>("endpoint")
                                  .Attr<std::int64_t>("max_messages")
                                  .Attr<std::int64_t>("timeout_us"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(eaas_shm_reply, eaas::shm::ReplyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<eaas::shm::F32R2>()  // out [C, d]
                                  .Arg<eaas::shm::S32R0>()   // num_rows []
                                  .Ret<eaas::shm::S32R0>()   // token []
                                  .Attr<std::int64_t>("endpoint"));

extern "C" {

// Opens endpoint `endpoint` of `deployment`: creates its inbox. Returns 0; -2
// if the endpoint is already open (in this or another live process); -1 for
// any other error. Errors come with a message in err (NUL-terminated, at most
// errlen bytes).
EAAS_FFI_EXPORT int eaas_shm_open(const char* deployment, std::uint64_t deployment_id,
                                  std::int64_t endpoint, std::int64_t max_endpoints,
                                  std::int64_t num_channels, std::int64_t capacity,
                                  std::int64_t d, std::int64_t k, std::int64_t num_layers,
                                  std::int64_t num_experts, std::int64_t hidden_dtype, char* err,
                                  std::int64_t errlen) {
  return eaas::shm::OpenEndpoint(deployment, deployment_id, endpoint,
                                 {max_endpoints, num_channels, capacity, d, k, num_layers, num_experts, hidden_dtype},
                                 nullptr, nullptr, nullptr, err, errlen);
}

// Closes an endpoint: marks its inbox closed and unlinks it (the mapping goes
// away once no handler uses it any more). Returns 0, or -1 if not open.
EAAS_FFI_EXPORT int eaas_shm_close(std::int64_t endpoint) {
  using namespace eaas;
  using namespace eaas::shm;
  const std::shared_ptr<Transport> tr = TakeEndpoint(Registry(), g_registry_mu, endpoint);
  if (tr == nullptr) return -1;
  tr->Unlink();
  return 0;
}

// Comma-separated counter names, in the order eaas_shm_stats writes them.
EAAS_FFI_EXPORT const char* eaas_shm_stat_names() { return eaas::kCounterNames; }

// Writes min(n, number of counters) counters of `endpoint` into out. Returns
// the number of counters, or -1 if the endpoint is not open.
EAAS_FFI_EXPORT int eaas_shm_stats(std::int64_t endpoint, std::int64_t* out, std::int64_t n) {
  using namespace eaas;
  using namespace eaas::shm;
  auto tr = Lookup(endpoint);
  if (!tr) return -1;
  for (std::int64_t i = 0; i < n && i < kNumCounters; ++i) out[i] = tr->counter(static_cast<int>(i));
  return kNumCounters;
}

// Geometry and layout of an open endpoint: out[0..15] = max_endpoints,
// num_channels, capacity, d, k, num_layers, num_experts, deployment_id (bits),
// hidden dtype, segment header bytes, slot bytes, total bytes, hidden /
// expert_ids / gates / scales offsets within a slot. Returns the number of
// values, or -1 if not open.
EAAS_FFI_EXPORT int eaas_shm_info(std::int64_t endpoint, std::int64_t* out, std::int64_t n) {
  using namespace eaas;
  using namespace eaas::shm;
  auto tr = Lookup(endpoint);
  if (!tr) return -1;
  const Geometry& g = tr->geo();
  const eaas::SlotLayout s = g.Slot();
  const std::int64_t v[] = {g.max_endpoints, g.num_channels, g.capacity, g.d, g.k,
                            g.num_layers, g.num_experts, static_cast<std::int64_t>(g.deployment_id),
                            static_cast<std::int64_t>(g.hidden_dtype),
                            static_cast<std::int64_t>(kSegmentHeaderBytes),
                            static_cast<std::int64_t>(s.bytes),
                            static_cast<std::int64_t>(SegmentBytes(g)),
                            static_cast<std::int64_t>(s.hidden_offset),
                            static_cast<std::int64_t>(s.expert_ids_offset),
                            static_cast<std::int64_t>(s.gates_offset),
                            static_cast<std::int64_t>(s.scales_offset)};
  const std::int64_t count = static_cast<std::int64_t>(sizeof(v) / sizeof(v[0]));
  for (std::int64_t i = 0; i < n && i < count; ++i) out[i] = v[i];
  return static_cast<int>(count);
}

// Maps peer `peer`'s inbox now (instead of lazily on the first send) and
// checks its geometry. Returns 0; 1 if it does not exist / is not ready yet;
// 2 if it was refused (message in err); -1 if `endpoint` is not open.
EAAS_FFI_EXPORT int eaas_shm_connect(std::int64_t endpoint, std::int64_t peer, char* err,
                                     std::int64_t errlen) {
  using namespace eaas;
  using namespace eaas::shm;
  auto tr = Lookup(endpoint);
  if (!tr) {
    CopyError("shm endpoint " + std::to_string(endpoint) + " is not open", err, errlen);
    return -1;
  }
  if (peer < 0 || peer >= tr->geo().max_endpoints) {
    CopyError("peer " + std::to_string(peer) + " is not in [0, max_endpoints)", err, errlen);
    return 2;
  }
  std::lock_guard<std::mutex> lock(tr->mu());
  tr->MarkPeerStale(peer);  // always look at the current segment of that name
  Mapping* m = nullptr;
  std::string why;
  const PeerStatus st = tr->Peer(peer, &m, &why);
  if (st == PeerStatus::kOk) return 0;
  CopyError(why, err, errlen);
  return st == PeerStatus::kRefused ? 2 : 1;
}

// --- the ibgda backend's endpoints (eaas_jax/transport/ibgda.py) ------------
// Endpoints whose messages go out through a NIC writer (ibgda_writer.h); the
// handlers above serve them as they serve shm endpoints.

// As eaas_shm_open, plus a NIC listening on the IPv4 address `host`; its card
// into card[0..4]: port, QPN base, inbox rkey, slots address, link key;
// card[5]: the NIC's handle (nic_model_abi.cc: fault injection).
EAAS_FFI_EXPORT int eaas_ibgda_open(const char* deployment, std::uint64_t deployment_id, std::int64_t endpoint,
                                    std::int64_t max_endpoints, std::int64_t num_channels, std::int64_t capacity,
                                    std::int64_t d, std::int64_t k, std::int64_t num_layers,
                                    std::int64_t num_experts, std::int64_t hidden_dtype, const char* host,
                                    std::uint64_t* card, char* err, std::int64_t errlen) {
  if (host == nullptr || card == nullptr) {
    eaas::CopyError("ibgda: no address to listen on", err, errlen);
    return -1;
  }
  eaas::ibgda::Card c;
  std::int64_t nic = 0;
  const int rc = eaas::shm::OpenEndpoint(
      deployment, deployment_id, endpoint,
      {max_endpoints, num_channels, capacity, d, k, num_layers, num_experts, hidden_dtype}, host, &c, &nic, err,
      errlen);
  if (rc == 0) {
    card[0] = c.port;
    card[1] = c.qpn_base;
    card[2] = c.inbox_rkey;
    card[3] = c.slots_addr;
    card[4] = c.link_key;
    card[5] = static_cast<std::uint64_t>(nic);
  }
  return rc;
}

// Connects `endpoint`'s QP for `peer` to the peer whose card is (port,
// qpn_base, rkey, slots_addr, link_key) at `host` (ibgda_writer.h, Connect).
// 0 or -1.
EAAS_FFI_EXPORT int eaas_ibgda_connect(std::int64_t endpoint, std::int64_t peer, const char* host,
                                       std::uint64_t port, std::uint64_t qpn_base, std::uint64_t rkey,
                                       std::uint64_t slots_addr, std::uint64_t link_key, char* err,
                                       std::int64_t errlen) {
  if (host == nullptr || port > 0xffff || qpn_base > 0xffffff || rkey > 0xffffffffu) {
    eaas::CopyError("ibgda: malformed peer card", err, errlen);
    return -1;
  }
  const eaas::ibgda::Card card{static_cast<std::uint32_t>(port), static_cast<std::uint32_t>(qpn_base),
                               static_cast<std::uint32_t>(rkey), slots_addr, link_key};
  // The TCP connection first, outside every lock: it may take up to a second,
  // and the handlers of the other peers go on meanwhile.
  std::unique_ptr<eaas::nic::Conn> link;
  std::string failed = eaas::nic::Connect(host, static_cast<std::uint16_t>(port), link_key, &link);
  if (!failed.empty()) failed = "ibgda: cannot reach endpoint " + std::to_string(peer) + "'s NIC: " + failed;
  const bool open = eaas::shm::WithNic(endpoint, [&](eaas::ibgda::NicWriter& nic) {
    if (failed.empty()) failed = nic.Connect(peer, std::move(link), card);
  });
  if (!open) failed = "ibgda endpoint " + std::to_string(endpoint) + " is not open";
  if (failed.empty()) return 0;
  eaas::CopyError(failed, err, errlen);
  return -1;
}

// The peer's state (ibgda_writer.h, PeerState); `op` 1 first marks a
// connected peer ready, 2 disconnects it. -1: no such endpoint.
EAAS_FFI_EXPORT int eaas_ibgda_peer(std::int64_t endpoint, std::int64_t peer, int op) {
  int state = -1;
  eaas::shm::WithNic(endpoint, [&](eaas::ibgda::NicWriter& nic) {
    if (op == 1) nic.SetReady(peer);
    if (op == 2) nic.Disconnect(peer);
    state = static_cast<int>(nic.State(peer));
  });
  return state;
}

}  // extern "C"
