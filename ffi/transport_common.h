// What every transport backend (shm, cuda_ipc) does the same way: the
// per-endpoint counters (`stats()` in Python), the per-server status that
// combine returns, and the validation of a received message header. Usable
// from host and device code.
#ifndef EAAS_FFI_TRANSPORT_COMMON_H_
#define EAAS_FFI_TRANSPORT_COMMON_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

#include "wire_format.h"

namespace eaas {

// Counters, in the order of kCounterNames.
enum Counter : int {
  kRequestsSent = 0,    // request messages published (dispatch)
  kRepliesSent,         // reply messages published (reply)
  kRequestsAccepted,    // requests accepted by poll
  kRepliesAccepted,     // replies accepted by combine
  kDropChecksum,        // header checksum mismatch
  kDropDeployment,      // wrong deployment id
  kDropKind,            // request where a reply belongs or vice versa / unknown
  kDropSender,          // sender field != the slot's owner
  kDropChannel,         // micro_batch != the slot's channel
  kDropNumTokens,       // num_tokens 0 or over capacity
  kDropLayer,           // layer out of range (or != the awaited layer)
  kDropDtype,           // unsupported hidden dtype
  kDropExpert,          // expert id neither -1 nor hosted here
  kDropReplySize,       // reply with the right ticket but the wrong token count
  kStaleReplies,        // reply with an old ticket (skipped, not an error)
  kTornReads,           // slot rewritten while being copied (retried later)
  kDeferred,            // valid request left for the next poll (did not fit)
  kUnreplied,           // accepted requests a new poll discarded before reply
  kTimeouts,            // servers combine gave up on at its deadline
  kPeerUnavailable,     // send skipped: peer inbox missing / not ready / closed
  kPeerRefused,         // send skipped: peer inbox geometry / identity mismatch
  kUnroutedTargets,     // dispatch calls with a target not in `servers`
  kUnmatchedCombines,   // combine awaited a server with no matching dispatch outstanding
  kNumCounters
};

constexpr const char* kCounterNames =
    "requests_sent,replies_sent,requests_accepted,replies_accepted,"
    "drop_checksum,drop_deployment,drop_kind,drop_sender,drop_channel,"
    "drop_num_tokens,drop_layer,drop_dtype,drop_expert,drop_reply_size,"
    "stale_replies,torn_reads,deferred,unreplied,timeouts,peer_unavailable,"
    "peer_refused,unrouted_targets,unmatched_combines";

// combine's status output, per server (mirrored by eaas_jax/transport/wire.py: wire.STATUS_*, wire.STATUSES).
enum CombineStatus : std::int32_t {
  kStatusOk = 0,
  kStatusTimeout = 1,
  kStatusBadReply = 2,     // no valid reply by the deadline, and an invalid one came
  kStatusNothingSent = 3,
  kStatusUnavailable = 4,  // dispatch could not reach the server (sent < 0)
};

// What a receiver checks on its private copy of a header before it looks at
// the payload (see wire_format.h, "Validation"): returns the counter of the
// first failed check, or kNumCounters when the header is valid. `sender` and
// `channel` are the slot's; requests carry `request_dtype`, replies float32.
EAAS_HOST_DEVICE inline Counter CheckMessageHeader(const MessageHeader& h, std::uint64_t deployment_id,
                                                   std::int64_t capacity, std::int64_t num_layers,
                                                   std::uint32_t request_dtype, std::uint16_t kind,
                                                   std::int64_t sender, std::int64_t channel) {
  if (HeaderChecksum(h) != h.checksum) return kDropChecksum;
  if (h.deployment_id != deployment_id) return kDropDeployment;
  if (h.kind != kind) return kDropKind;
  if (h.sender != static_cast<std::uint64_t>(sender)) return kDropSender;
  if (h.micro_batch != static_cast<std::uint64_t>(channel)) return kDropChannel;
  if (h.num_tokens == 0 || h.num_tokens > static_cast<std::uint64_t>(capacity)) return kDropNumTokens;
  if (h.layer >= static_cast<std::uint64_t>(num_layers)) return kDropLayer;
  const std::uint32_t dtype = kind == kKindRequest ? request_dtype : std::uint32_t{kHiddenF32};
  if (h.hidden_dtype != dtype) return kDropDtype;
  return kNumCounters;
}

// Host only: an endpoint's geometry and the C API's argument checks.

// What every endpoint of a deployment agrees on (both backends).
struct EndpointGeometry {
  std::int64_t max_endpoints = 0, num_channels = 0, capacity = 0, d = 0, k = 0, num_layers = 0,
               num_experts = 0;
  std::uint64_t deployment_id = 0;
  std::uint32_t hidden_dtype = kHiddenF32;  // of requests

  std::size_t NumSlots() const { return static_cast<std::size_t>(max_endpoints * num_channels); }
  SlotLayout Slot() const {
    return SlotLayout::Make(static_cast<std::size_t>(capacity), static_cast<std::size_t>(d),
                            static_cast<std::size_t>(k));
  }
};

// The largest values a backend accepts for an endpoint's geometry.
struct GeometryLimits {
  std::int64_t max_endpoints, num_channels, slots, capacity, d, k, num_layers, num_experts;
};

// Checks the geometry endpoint `endpoint` opens with against `limits`; fills
// `*out` and returns "" when valid, else returns why not.
inline std::string MakeGeometry(const GeometryLimits& limits, std::int64_t endpoint, std::uint64_t deployment_id,
                                std::int64_t max_endpoints, std::int64_t num_channels, std::int64_t capacity,
                                std::int64_t d, std::int64_t k, std::int64_t num_layers, std::int64_t num_experts,
                                std::int64_t hidden_dtype, EndpointGeometry* out) {
  auto in = [](std::int64_t v, std::int64_t hi) { return v >= 1 && v <= hi; };
  // The product is formed only once both factors are in range: caller-given
  // values near INT64_MAX would overflow it (undefined behaviour).
  const bool factors_in = in(max_endpoints, limits.max_endpoints) && in(num_channels, limits.num_channels);
  if (!factors_in || !in(max_endpoints * num_channels, limits.slots) || !in(capacity, limits.capacity) ||
      !in(d, limits.d) || !in(k, limits.k) || !in(num_layers, limits.num_layers) ||
      !in(num_experts, limits.num_experts)) {
    auto field = [](const char* name, std::int64_t v, std::int64_t hi) {
      return std::string(name) + "=" + std::to_string(v) + " (1.." + std::to_string(hi) + ") ";
    };
    return "geometry out of range: " + field("max_endpoints", max_endpoints, limits.max_endpoints) +
           field("num_channels", num_channels, limits.num_channels) +
           (factors_in ? field("max_endpoints*num_channels", max_endpoints * num_channels, limits.slots) : "") +
           field("capacity", capacity, limits.capacity) + field("d", d, limits.d) + field("k", k, limits.k) +
           field("num_layers", num_layers, limits.num_layers) + field("num_experts", num_experts, limits.num_experts);
  }
  if (hidden_dtype < kHiddenF32 || hidden_dtype > kHiddenF8E4M3) {
    return "unknown hidden dtype " + std::to_string(hidden_dtype) + " (1 float32, 2 bfloat16, 3 float8_e4m3fn)";
  }
  if (endpoint < 0 || endpoint >= max_endpoints) {
    return "endpoint " + std::to_string(endpoint) + " is not in [0, max_endpoints=" +
           std::to_string(max_endpoints) + ")";
  }
  *out = EndpointGeometry{max_endpoints, num_channels, capacity, d, k, num_layers, num_experts, deployment_id,
                          static_cast<std::uint32_t>(hidden_dtype)};
  return "";
}

// Removes and returns `map[key]` (an endpoint's state) under `mu`; null
// (value-initialised) when absent.
template <typename Map>
typename Map::mapped_type TakeEndpoint(Map& map, std::mutex& mu, typename Map::key_type key) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = map.find(key);
  if (it == map.end()) return {};
  typename Map::mapped_type value = std::move(it->second);
  map.erase(it);
  return value;
}

// Copies `msg` (truncated, NUL-terminated) into the C API's error buffer.
inline void CopyError(const std::string& msg, char* err, std::int64_t errlen) {
  if (err == nullptr || errlen <= 0) return;
  const std::size_t n = std::min<std::size_t>(msg.size(), static_cast<std::size_t>(errlen - 1));
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

}  // namespace eaas

#endif  // EAAS_FFI_TRANSPORT_COMMON_H_
