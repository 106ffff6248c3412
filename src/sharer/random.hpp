#pragma once
// Random bytes for keys and challenge nonces, straight from getrandom (blocking until the kernel's
// pool is initialised, never a userspace PRNG: these bytes are secrets).

#include <cstddef>
#include <span>
#include <system_error>

namespace steward::detail {

/// Fills @p out from getrandom, retrying on EINTR and short reads.
void fill_random(std::span<std::byte> out, std::error_code& ec) noexcept;
/// @throws std::system_error on failure.
void fill_random(std::span<std::byte> out);

}  // namespace steward::detail
