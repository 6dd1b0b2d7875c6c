// The sending half of the CPU `ibgda` backend: an endpoint whose messages
// reach its peers' inboxes as RDMA WRITEs that it posts to a NIC (the model
// NIC of nic_model.h), instead of stores into a mapping of their segments.
// The receiving half is the shm backend's, unchanged: the inbox is an shm
// inbox (shm_transport.cc) registered with the NIC for remote writes, and
// poll/combine read it with the seqlock of wire_format.h.
//
// == Resources (one NicWriter per endpoint) ==
//  * a NIC of its own, listening on the endpoint's IPv4 address (a TCP port
//    of the model NIC's link; nic_link.h);
//  * its inbox's slots, registered with remote-write access: peers write
//    into them (not into the segment header);
//  * a staging area, one slot per (peer, channel), registered for local
//    access: a message is assembled there and the NIC gathers from it;
//  * one RC QP per peer endpoint, created at open, so the QP for peer p has
//    QPN qpn_base + p (the NIC numbers them in creation order; Open checks
//    it, and the card publishes qpn_base).
//    A QP is both ways of the pair: it sends this endpoint's messages to p and
//    accepts p's writes into the inbox.
// Card (below) is what a peer needs to know of all that. Exchanging cards,
// and deciding when a peer is ready, is the control path's business
// (eaas_jax/transport/ibgda.py); this file only acts on it.
//
// == A message ==  (Post)
// Assembled in the staging slot exactly as it lies in the peer's inbox slot,
// then posted as WQEs on the peer's QP (ffi/mlx5_wqe.h encoders):
//   1. WRITE inline: the sequence word seq - 1 (odd: being written);
//   2. WRITE, fenced: the header after the sequence word and the used rows of
//      the first payload array; then one WRITE per other used range;
//   3. WRITE inline, fenced, signalled: the sequence word seq (even).
// The fences order 1 < 2 < 3 in the peer's memory as mlx5 orders them, which
// is what the receiver's seqlock needs: a reader of the slot sees an odd or
// changed sequence word whenever the bytes it copied may be torn. Only the
// last WQE asks for a CQE: completions are in order, so it frees the
// message's send-queue slots, and its staging slot (the NIC may read that
// until the WQEs are complete).
//
// == Failure ==
// An error CQE (the link cut: retry exceeded; a peer that refused a write)
// means the QP is in ERR: the peer stays unreachable (sends report it
// unavailable) until the control path connects the QP again, which it does
// when the peer's card changes (the peer restarted). A QP is never simply
// re-armed: its peer's responder would still expect the old PSNs and take a
// new requester's first packets for duplicates.
//
// == Threads ==
// Everything but Open/~NicWriter runs under the owning transport's lock; the
// NIC's progress thread reads the send queues and doorbell records, and
// writes the CQs and the inbox, on its own (as hardware would).
#ifndef EAAS_FFI_IBGDA_WRITER_H_
#define EAAS_FFI_IBGDA_WRITER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nic_link.h"

namespace eaas {
namespace ibgda {

// What a peer needs to write into an endpoint's inbox.
struct Card {
  std::uint32_t port = 0;       // its NIC's TCP port
  std::uint32_t qpn_base = 0;   // its QP for endpoint p is qpn_base + p
  std::uint32_t inbox_rkey = 0;
  std::uint64_t slots_addr = 0;  // its inbox's slot (0, 0), in its address space
  std::uint64_t link_key = 0;    // what a connection to its NIC must begin with
};

// Bytes [offset, offset + size) of a slot.
struct SlotRange {
  std::size_t offset;
  std::size_t size;
};

// The ranges one message occupies: the header with the first array, then at
// most three more arrays. Fixed size: built for every message sent, so no
// allocation.
struct SlotRanges {
  std::array<SlotRange, 4> ranges{};
  std::size_t count = 0;
  void Add(std::size_t offset, std::size_t size) { ranges[count++] = {offset, size}; }
  const SlotRange* begin() const { return ranges.data(); }
  const SlotRange* end() const { return ranges.data() + count; }
};

// A peer's QP as the posting side sees it.
enum class PeerState : int {
  kIdle = 0,       // not connected (RESET)
  kConnected = 1,  // RTS, waiting for the control path to say the peer is ready
  kReady = 2,      // messages go out
  kFailed = 3,     // an error CQE came: unreachable until connected again
};

struct NicWriterConfig {
  std::string host;               // IPv4 address the NIC listens on
  std::uint8_t* inbox = nullptr;  // the endpoint's inbox segment
  std::size_t inbox_bytes = 0;
  std::size_t slots_offset = 0;   // where slot (0, 0) starts in it
  std::size_t slot_bytes = 0;
  std::int64_t max_endpoints = 0;
  std::int64_t num_channels = 0;
  std::int64_t endpoint = 0;      // this endpoint's index: its row in peers' inboxes
  // A GPU kernel posts and reclaims (ffi/ibgda_post.cuh), not Post/Stage:
  // State() then leaves the CQs alone (their consumer is the kernel) and
  // learns of failures from MarkFailed.
  bool device_posts = false;
};

// Where one peer's QP lives, for a poster outside this class (a GPU kernel,
// which reaches these addresses through a CUDA host registration).
struct QueueView {
  std::uint32_t qpn = 0, log_sq = 0, log_cq = 0;
  std::uint32_t rkey = 0;        // the peer's inbox
  std::uint64_t slots_addr = 0;  // the peer's inbox slot (0, 0), in its address space
  volatile std::uint32_t* dbrec = nullptr;
  std::uint8_t* sq = nullptr;
  const std::uint8_t* cq = nullptr;
  std::uint8_t* segment = nullptr;  // the mapping holding dbrec, sq and cq
  std::size_t segment_bytes = 0;
};

class NicWriter {
 public:
  // Creates the NIC and everything above; "" or why not.
  static std::string Open(const NicWriterConfig& config, std::unique_ptr<NicWriter>* out);
  ~NicWriter();  // destroys the NIC (its thread, QPs, link), then the staging area
  NicWriter(const NicWriter&) = delete;
  NicWriter& operator=(const NicWriter&) = delete;

  const Card& card() const { return card_; }
  std::int64_t nic() const { return nic_; }

  // -- control path --
  // (Re)connects this endpoint's QP for `peer` (whose card is `theirs`;
  // `link`: a TCP connection to its NIC's port) to that peer's QP for this
  // endpoint: RESET (a QP used before starts
  // over), INIT, RTR, RTS. The peer is kConnected, not ready.
  std::string Connect(std::int64_t peer, std::unique_ptr<nic::Conn> link, const Card& theirs);
  // Back to RESET (the peer left): kIdle.
  void Disconnect(std::int64_t peer);
  // kConnected -> kReady (the peer has connected its side too).
  bool SetReady(std::int64_t peer);
  // Its state, after taking the completions the NIC wrote (an error one
  // makes it kFailed; with device_posts, MarkFailed does).
  PeerState State(std::int64_t peer);
  // The device poster saw an error completion: kFailed, as State would say.
  void MarkFailed(std::int64_t peer);
  QueueView Queue(std::int64_t peer) const;
  std::uint8_t* staging() const { return staging_; }
  std::size_t staging_bytes() const { return staging_bytes_; }
  std::uint32_t staging_lkey() const { return staging_lkey_; }

  // -- data path --
  // The staging slot of (peer, channel) to assemble a message in; nullptr
  // when the peer is not ready, or the message staged there before is not
  // complete within a short wait (then *why says which).
  std::uint8_t* Stage(std::int64_t peer, std::int64_t channel, std::string* why);
  // Posts the message staged for (peer, channel), whose bytes are `ranges`
  // (sorted, disjoint, past the sequence word), published with `seq`.
  // false: no room in the send queue (the peer is in trouble).
  bool Post(std::int64_t peer, std::int64_t channel, const SlotRanges& ranges, std::uint64_t seq);

 private:
  struct PeerQp;
  NicWriter() = default;
  void Reclaim(PeerQp& q);
  std::uint8_t* StagingSlot(std::int64_t peer, std::int64_t channel) const;

  std::int64_t nic_ = 0;
  Card card_{};
  NicWriterConfig config_{};
  std::uint8_t* staging_ = nullptr;
  std::size_t staging_bytes_ = 0;
  std::uint32_t staging_lkey_ = 0;
  std::vector<std::unique_ptr<PeerQp>> peers_;
};

}  // namespace ibgda
}  // namespace eaas

#endif  // EAAS_FFI_IBGDA_WRITER_H_
