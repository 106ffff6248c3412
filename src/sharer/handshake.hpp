#pragma once
// CPython's multiprocessing.connection mutual HMAC challenge/response as a sans-IO state machine:
// payloads go in, payloads come out; the caller owns framing, sockets and deadlines
// (handshake_driver.hpp runs it over a socket).
//
// Server role (Listener.accept): deliver a challenge, verify the answer, send #WELCOME#; then
// answer the peer's challenge and wait for its #WELCOME#. Client role (Client()): the same two
// halves in the other order.

#include <steward/authkey.hpp>

#include <array>
#include <cstddef>
#include <optional>
#include <span>
#include <string_view>
#include <system_error>
#include <vector>

namespace steward::detail::auth {

inline constexpr std::string_view challenge_tag = "#CHALLENGE#";
inline constexpr std::string_view welcome = "#WELCOME#";
inline constexpr std::string_view failure = "#FAILURE#";
/// Random bytes after the `{sha256}` prefix of a challenge (CPython 3.12+: MESSAGE_LENGTH = 40).
inline constexpr std::size_t nonce_size = 40;
/// CPython 3.11 challenges carry 20 bare random bytes; anything shorter is refused.
inline constexpr std::size_t legacy_challenge_size = 20;
inline constexpr std::size_t md5_size = 16;

/// The digests CPython's handshake allows (`_ALLOWED_DIGESTS`).
enum class digest { md5, sha256, sha384, sha3_256, sha3_384 };

[[nodiscard]] std::optional<digest> digest_from_name(std::string_view name) noexcept;
[[nodiscard]] std::string_view digest_name(digest d) noexcept;

/// HMAC-@p d(@p key, @p message). Empty result with @p ec set if libcrypto refuses (e.g. MD5 in
/// FIPS mode).
[[nodiscard]] std::vector<std::byte> hmac(digest d, std::span<const std::byte> key,
                                          std::span<const std::byte> message, std::error_code& ec);

/// `#CHALLENGE#{sha256}` + @p nonce: the challenge a 3.12+ server delivers.
[[nodiscard]] std::vector<std::byte> make_challenge(std::span<const std::byte, nonce_size> nonce);

/// The answer to a challenge payload (including `#CHALLENGE#`): raw HMAC-MD5 of the message for
/// a legacy 20-byte message; `{name}` + HMAC-name(message) when the message starts with the
/// `{name}` of an allowed digest (the HMAC covers the prefix too). Anything else sets @p ec to
/// errc::malformed_message.
[[nodiscard]] std::vector<std::byte> answer_challenge(const authkey& key,
                                                      std::span<const std::byte> challenge,
                                                      std::error_code& ec);

/// Checks @p response against @p message (the challenge payload without `#CHALLENGE#`) as
/// CPython's server does: a 16- or 20-byte response is a raw HMAC-MD5 (3.11 clients), otherwise
/// it must be `{name}` + HMAC-name with an allowed digest. Constant-time comparison.
[[nodiscard]] bool verify_response(const authkey& key, std::span<const std::byte> message,
                                   std::span<const std::byte> response) noexcept;

class handshake {
public:
    enum class role { server, client };
    enum class state { running, succeeded, failed };

    /// Nonce for this side's challenge from getrandom. @throws std::system_error if that fails.
    handshake(role r, const authkey& key);
    /// With a given nonce (tests).
    handshake(role r, const authkey& key, std::span<const std::byte, nonce_size> nonce);
    handshake(const handshake&) = delete;
    handshake& operator=(const handshake&) = delete;
    /// Wipes the copy of the authkey.
    ~handshake();

    /// The first payload to send, if this role speaks first (server: its challenge). Call once.
    [[nodiscard]] std::optional<std::vector<std::byte>> start();
    /// Feeds the next payload received; returns the payload to send in reply, if any. When the
    /// handshake fails, a returned payload (#FAILURE#) should still be sent before closing.
    [[nodiscard]] std::optional<std::vector<std::byte>> on_frame(std::span<const std::byte> payload);

    [[nodiscard]] state current() const noexcept { return state_; }
    [[nodiscard]] bool done() const noexcept { return state_ != state::running; }
    /// errc::authentication_failed (wrong key either way, #FAILURE# received) or
    /// errc::malformed_message (not the handshake protocol); empty unless failed.
    [[nodiscard]] std::error_code error() const noexcept { return error_; }

private:
    enum class step { start, await_response, await_peer_challenge, await_welcome, await_challenge };

    std::optional<std::vector<std::byte>> fail(std::error_code ec, bool send_failure);
    std::optional<std::vector<std::byte>> check_response(std::span<const std::byte> payload);
    std::optional<std::vector<std::byte>> answer(std::span<const std::byte> payload);

    role role_;
    authkey key_;
    std::vector<std::byte> challenge_;  // the payload this side delivers
    step step_ = step::start;
    state state_ = state::running;
    std::error_code error_;
};

}  // namespace steward::detail::auth
