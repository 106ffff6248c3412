#pragma once
// The pickle subset resource_sharer puts on the wire: `(key, pid)` from a client, `None` from
// CPython's stop(). Decoding accepts exactly what CPython 3.8-3.14 emit for these two values with
// protocols 2-5 (PROTO, FRAME, BININT1/BININT2/BININT/LONG1, TUPLE2, MEMOIZE or BINPUT, NONE,
// STOP) and refuses everything else: no pickle here ever names a class or calls anything.

#include <steward/share_id.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <system_error>
#include <vector>

namespace steward::detail::pickle {

/// The first byte of every pickle of protocol >= 2 (PROTO); native frames never start with it.
inline constexpr std::byte proto_opcode{0x80};

/// A resource_sharer request: the share key (a non-negative int below 2^128) and the pid the
/// client claims (an int that fits in 64 bits).
struct fetch_request {
    share_key key;
    std::int64_t pid = 0;

    friend bool operator==(const fetch_request&, const fetch_request&) = default;
};

enum class value_kind { none, request };

struct decoded {
    value_kind kind = value_kind::none;
    fetch_request request;  ///< valid when kind == request
};

/// Decodes one whole pickle (the payload of one frame). On failure returns a default value and
/// sets @p ec to errc::malformed_message; @p why (if given) receives a static description.
[[nodiscard]] decoded decode(std::span<const std::byte> pickle, std::error_code& ec,
                             const char** why = nullptr) noexcept;

/// `pickle.dumps((key, pid), protocol)` byte for byte as CPython's C pickler writes it
/// (protocol 2..5; 4 is what 3.8-3.13 send, 5 what 3.14 sends).
[[nodiscard]] std::vector<std::byte> encode_request(share_key key, std::int64_t pid, int protocol = 4);

/// `pickle.dumps(None, protocol)`.
[[nodiscard]] std::vector<std::byte> encode_none(int protocol = 4);

}  // namespace steward::detail::pickle
