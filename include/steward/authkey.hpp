#pragma once
/// @file
/// The family authkey: the shared secret of CPython's multiprocessing HMAC handshake.

#include <array>
#include <cstddef>
#include <string>
#include <string_view>
#include <system_error>

namespace steward {

/// 32 secret bytes shared by a family of processes (CPython: `current_process().authkey`).
struct authkey {
    std::array<std::byte, 32> bytes{};

    /// This process's family key: from the environment variable `STEWARD_AUTHKEY` (64 hex digits)
    /// when set, else 32 bytes from getrandom generated once per process. Children that inherit
    /// the environment, or that steward starts with set_environment(), share it.
    /// @throws std::system_error (steward::errc::malformed_message) if `STEWARD_AUTHKEY` is set but
    /// is not 64 hex digits.
    [[nodiscard]] static const authkey& family();

    /// Parses 64 hex digits (either case). @throws std::system_error (errc::malformed_message).
    [[nodiscard]] static authkey from_hex(std::string_view hex);
    /// As from_hex(hex), reporting through @p ec (the returned key is all zero on error).
    [[nodiscard]] static authkey from_hex(std::string_view hex, std::error_code& ec) noexcept;
    /// 32 fresh bytes from getrandom.
    [[nodiscard]] static authkey generate();

    /// 64 lower-case hex digits, the form `STEWARD_AUTHKEY` takes.
    [[nodiscard]] std::string to_hex() const;

    /// Exports this key as `STEWARD_AUTHKEY` into this process's environment, so children started
    /// later (fork, exec, posix_spawn) share it. Returns false if setenv failed.
    bool set_environment() const noexcept;

    friend bool operator==(const authkey&, const authkey&) = default;
};

}  // namespace steward
