#pragma once
// Random bytes for keys and challenge nonces, from getrandom (blocking until the kernel's pool is
// initialised, never a userspace PRNG: these bytes are secrets).

#include <cstddef>
#include <span>
#include <system_error>

namespace steward::detail {

/// Fills @p out from getrandom, retrying on EINTR and short reads.
void fill_random(std::span<std::byte> out, std::error_code& ec) noexcept;
/// @throws std::system_error on failure.
void fill_random(std::span<std::byte> out);

/// Like fill_random, for the hot paths (a nonce per connection, a key per share): the kernel's bytes
/// are drawn 256 at a time into a per-thread buffer and handed out from it, so most calls make no
/// system call. Every byte is handed out once and wiped from the buffer as it goes; a forked child
/// never uses what its parent drew (the two would otherwise pick the same nonces and keys).
void fill_random_buffered(std::span<std::byte> out, std::error_code& ec) noexcept;
/// @throws std::system_error on failure.
void fill_random_buffered(std::span<std::byte> out);

}  // namespace steward::detail
