#pragma once
// The client's view of the wire codec. codec.hpp lives in namespace steward::tracker, which cannot
// coexist in one translation unit with the public class steward::tracker; this header exposes the
// few encode functions the client needs without that namespace, and tracker_client_codec.cpp (which
// never sees the class) forwards to the codec.

#include <steward/resource_type.hpp>

#include <cstddef>
#include <string_view>
#include <system_error>

namespace steward::detail {

inline constexpr std::size_t tracker_max_message = 512;

/// Canonical form of @p name for @p type (shm/semaphore names get one leading '/'), written to
/// @p out (size >= name.size() + 2). Errors: std::errc::invalid_argument for names the daemon
/// would refuse (empty, NUL, relative file path, noop type...).
[[nodiscard]] std::error_code tracker_canonical_name(resource_type type, std::string_view name, char* out,
                                                     std::string_view& result) noexcept;

/// Encodes REGISTER (@p register_it) or UNREGISTER of an already canonical @p name into @p out
/// (tracker_max_message bytes); @p size receives the length. Errors: steward::errc::message_too_long,
/// std::errc::invalid_argument.
[[nodiscard]] std::error_code tracker_encode(bool register_it, resource_type type, std::string_view name,
                                             char* out, std::size_t& size) noexcept;

}  // namespace steward::detail
