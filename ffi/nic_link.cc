// Framing and non-blocking socket I/O of the NIC link (nic_link.h).
#include "nic_link.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

#include "shm_segment.h"

namespace eaas {
namespace nic {
namespace {

void NonBlocking(int fd) {
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // ACKs are small and latency-bound
}

// Received bytes kept unparsed at most: a frame and then some. A peer that
// sends faster than the NIC parses waits in the kernel's buffer, not ours.
constexpr std::size_t kMaxBuffered = 4 * (sizeof(FrameHeader) + kMtu);

}  // namespace

Conn::~Conn() { Close(); }

void Conn::Close() {
  if (fd >= 0) close(fd);
  fd = -1;
  closed = true;
  out.clear();
}

std::string Listen(const std::string& host, int* fd, std::uint16_t* port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  if (inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1) return "not an IPv4 address: " + host;
  const int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return "socket: " + ErrnoText(errno);
  socklen_t len = sizeof(a);
  if (bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(s, 16) != 0 ||
      getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const std::string why = "listen on " + host + ": " + ErrnoText(errno);
    close(s);
    return why;
  }
  *fd = s;
  *port = ntohs(a.sin_port);
  return "";
}

std::unique_ptr<Conn> Accept(int listen_fd) {
  const int s = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
  if (s < 0) return nullptr;
  NonBlocking(s);
  auto c = std::make_unique<Conn>();
  c->fd = s;
  return c;
}

std::string Connect(const std::string& host, std::uint16_t port, std::uint64_t key, std::unique_ptr<Conn>* out) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1) return "not an IPv4 address: " + host;
  const int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return "socket: " + ErrnoText(errno);
  int rc = connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  if (rc != 0 && errno == EINPROGRESS) {
    pollfd p{s, POLLOUT, 0};
    int err = ETIMEDOUT;
    socklen_t len = sizeof(err);
    if (poll(&p, 1, 1000) == 1) getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
    errno = err;
    rc = err == 0 ? 0 : -1;
  }
  if (rc != 0) {
    const std::string why = "connect to " + host + ":" + std::to_string(port) + ": " + ErrnoText(errno);
    close(s);
    return why;
  }
  NonBlocking(s);
  *out = std::make_unique<Conn>();
  (*out)->fd = s;
  const FrameHeader hello{kFrameMagic, kFrameVersion, static_cast<std::uint16_t>(FrameKind::kHello), 0, 0, 0, 0,
                          key, 0, 0};
  QueueFrame(**out, hello, nullptr);
  return "";
}

std::uint64_t NewLinkKey() {
  std::random_device random;  // the kernel's randomness
  std::uint64_t key = 0;
  while (key == 0) key = (std::uint64_t{random()} << 32) | random();
  return key;
}

bool IsHello(const FrameHeader& h, std::uint64_t key) {
  // Compared without an early exit: the time taken tells nothing of the key.
  return h.kind == static_cast<std::uint16_t>(FrameKind::kHello) && ((h.raddr ^ key) | h.length) == 0;
}

void Pump(Conn& c) {
  if (c.closed) return;
  std::size_t sent = 0;
  while (sent < c.out.size()) {
    const ssize_t n = send(c.fd, c.out.data() + sent, c.out.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      sent += static_cast<std::size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      break;
    } else {
      c.Close();
      return;
    }
  }
  c.out.erase(c.out.begin(), c.out.begin() + static_cast<std::ptrdiff_t>(sent));
  while (c.in.size() < kMaxBuffered) {
    std::uint8_t buf[16384];
    const ssize_t n = recv(c.fd, buf, std::min(sizeof(buf), kMaxBuffered - c.in.size()), MSG_DONTWAIT);
    if (n > 0) {
      c.in.insert(c.in.end(), buf, buf + n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return;
    } else {
      // The peer closed (n == 0) or the connection broke. Frames already
      // received are still parsed; nothing more will come or go.
      c.Close();
      return;
    }
  }
}

void QueueFrame(Conn& c, const FrameHeader& h, const std::uint8_t* payload) {
  if (c.closed) return;
  const auto* p = reinterpret_cast<const std::uint8_t*>(&h);
  c.out.insert(c.out.end(), p, p + sizeof(h));
  if (h.length > 0) c.out.insert(c.out.end(), payload, payload + h.length);
}

Parse NextFrame(Conn& c, FrameHeader* h, std::vector<std::uint8_t>* payload) {
  if (c.in.size() < sizeof(FrameHeader)) return Parse::kNeedMore;
  std::memcpy(h, c.in.data(), sizeof(FrameHeader));
  const bool write = h->kind == static_cast<std::uint16_t>(FrameKind::kWrite);
  const bool reply = h->kind == static_cast<std::uint16_t>(FrameKind::kAck) ||
                     h->kind == static_cast<std::uint16_t>(FrameKind::kNak) ||
                     h->kind == static_cast<std::uint16_t>(FrameKind::kHello);  // no payload either
  // Checked before waiting for the payload: a hostile length never makes us
  // buffer (or wait for) more than one MTU.
  if (h->magic != kFrameMagic || h->version != kFrameVersion || !(write || reply) || h->length > kMtu ||
      (reply && h->length != 0)) {
    return Parse::kBad;
  }
  const std::size_t total = sizeof(FrameHeader) + h->length;
  if (c.in.size() < total) return Parse::kNeedMore;
  payload->assign(c.in.begin() + sizeof(FrameHeader), c.in.begin() + static_cast<std::ptrdiff_t>(total));
  c.in.erase(c.in.begin(), c.in.begin() + static_cast<std::ptrdiff_t>(total));
  return Parse::kFrame;
}

}  // namespace nic
}  // namespace eaas
