// The TCP link between two software NICs (nic_model.h, "Two NICs joined by
// TCP"): framing and non-blocking socket I/O only. What a frame means (PSNs,
// ACK/NAK, the responder's checks) is nic_model.cc's business.
#ifndef EAAS_FFI_NIC_LINK_H_
#define EAAS_FFI_NIC_LINK_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace eaas {
namespace nic {

inline constexpr std::uint32_t kFrameMagic = 0x4b4e4c45u;  // "ELNK"
inline constexpr std::uint16_t kFrameVersion = 1;
// Payload bytes of one WRITE frame at most: the link's MTU. A WRITE is sent
// as ceil(size / kMtu) frames, one PSN each.
inline constexpr std::uint32_t kMtu = 4096;

enum class FrameKind : std::uint16_t { kWrite = 1, kAck = 2, kNak = 3, kHello = 4 };

// Fixed header, host byte order (both ends run on one host: the link is a
// test fabric, not a wire protocol). ACK/NAK carry no payload; a NAK's
// reason (a Violation) is in `rkey`.
//
// Authentication: a listening NIC has a random 64-bit link key (Listen
// draws it). A connection's first frame must be a HELLO carrying that key in
// `raddr` (Connect sends it): the listener answers nothing and closes a
// connection whose first frame is anything else, or a wrong key, or that
// says nothing for kHelloTimeout. So only who was given the key can place
// bytes in our regions: our uid, through a 0600 directory entry, or whoever
// may read the registry's cards (run etcd with auth and TLS); another user who
// finds the port cannot, whatever QPNs, PSNs or rkeys it guesses. The key
// crosses the network in clear text, like the rest of the link: a test
// fabric, and a transport for networks one trusts.
struct FrameHeader {
  std::uint32_t magic;
  std::uint16_t version;
  std::uint16_t kind;
  std::uint32_t src_qpn;
  std::uint32_t dst_qpn;
  std::uint32_t psn;
  std::uint32_t rkey;  // kWrite: the target's rkey; kNak: the reason
  std::uint64_t raddr;
  std::uint32_t length;  // payload bytes that follow
  std::uint32_t reserved;
};
static_assert(sizeof(FrameHeader) == 40, "frame header");

// How long an accepted connection may take to authenticate; how many
// authenticated links a NIC keeps (one per peer QP: at least max_endpoints,
// 4096) and how many unauthenticated ones (beyond that the oldest is closed).
inline constexpr auto kHelloTimeout = std::chrono::seconds(2);
inline constexpr std::size_t kMaxLinks = 4096;
inline constexpr std::size_t kMaxPendingLinks = 64;

// One TCP connection: bytes received but not parsed yet, bytes to send.
struct Conn {
  int fd = -1;
  bool closed = false;
  bool authenticated = false;  // an accepted one: its HELLO had our key
  std::chrono::steady_clock::time_point accepted_at{};
  std::vector<std::uint8_t> in, out;
  ~Conn();
  void Close();
};

// A non-blocking listening socket on the IPv4 address `host`, ephemeral port.
std::string Listen(const std::string& host, int* fd, std::uint16_t* port);
// A connection waiting on `listen_fd`, or nullptr.
std::unique_ptr<Conn> Accept(int listen_fd);
// Connects (blocking, at most ~1 s) to host:port and queues the HELLO with
// the listener's link key `key`; the connection is then non-blocking.
std::string Connect(const std::string& host, std::uint16_t port, std::uint64_t key, std::unique_ptr<Conn>* out);
// A fresh random link key (never 0).
std::uint64_t NewLinkKey();
// Whether `h`, an accepted connection's first frame, is the HELLO with `key`.
bool IsHello(const FrameHeader& h, std::uint64_t key);
// Sends what the socket takes and receives what is there (bounded), never
// blocking; the peer closing or an error marks the connection closed.
void Pump(Conn& c);
void QueueFrame(Conn& c, const FrameHeader& h, const std::uint8_t* payload);

enum class Parse { kNeedMore, kFrame, kBad };
// Takes the next complete frame out of c.in. kBad: the stream is not ours
// (bad magic/version/kind, length over kMtu, or a payload on ACK/NAK) and
// cannot be resynchronised: the caller closes the connection.
Parse NextFrame(Conn& c, FrameHeader* h, std::vector<std::uint8_t>* payload);

}  // namespace nic
}  // namespace eaas

#endif  // EAAS_FFI_NIC_LINK_H_
