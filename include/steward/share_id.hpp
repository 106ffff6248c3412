#pragma once
/// @file
/// steward::share_key, steward::share_id and steward::cpython_ident: how a share is named.
///
/// A share is named by the AF_UNIX address of the sharer that holds it plus a 128-bit key. The
/// text form of a share_id is
///
///     steward1:<key: 32 hex digits>@<address, percent-encoded>
///
/// for example `steward1:0123456789abcdef0123456789abcdef@/run/user/1000/steward-Xy1/s`.
/// - `steward1` names the format (a later format gets a new prefix);
/// - the key is exactly 32 hex digits, most significant first (format() writes lower case, parse()
///   accepts either case);
/// - the address is an absolute filesystem path of 1..107 bytes (sun_path holds 108 with the
///   terminating NUL); no NUL byte. Bytes outside `A-Z a-z 0-9 / . _ - ~ + , = :` are written as
///   `%XX` (two upper-case hex digits); parse() accepts `%xx` in either case for any byte.
/// The text therefore never contains white space, `@` after the key, or a byte that a shell or a
/// line-oriented reader would split on, and parse(format(id)) == id for every valid id.

#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <system_error>

namespace steward {

/// A 128-bit share key, compared as the unsigned integer `high * 2^64 + low`.
struct share_key {
    std::uint64_t high = 0;  ///< most significant 64 bits
    std::uint64_t low = 0;   ///< least significant 64 bits

    /// 128 fresh bits from getrandom. @throws std::system_error if getrandom fails.
    [[nodiscard]] static share_key generate();

    /// 32 lower-case hex digits, most significant first.
    [[nodiscard]] std::string to_hex() const;
    /// Parses exactly 32 hex digits (either case). @throws std::system_error (errc::malformed_message).
    [[nodiscard]] static share_key from_hex(std::string_view hex);
    /// As from_hex(hex), reporting through @p ec (returns a zero key on error).
    [[nodiscard]] static share_key from_hex(std::string_view hex, std::error_code& ec) noexcept;

    /// The key as a decimal number, the way Python prints the int (no sign, no leading zeros).
    [[nodiscard]] std::string to_decimal() const;
    /// Parses 1..39 decimal digits whose value is below 2^128 (leading zeros allowed; no sign,
    /// no white space). @throws std::system_error (errc::malformed_message).
    [[nodiscard]] static share_key from_decimal(std::string_view digits);
    /// As from_decimal(digits), reporting through @p ec (returns a zero key on error).
    [[nodiscard]] static share_key from_decimal(std::string_view digits, std::error_code& ec) noexcept;

    friend constexpr auto operator<=>(const share_key&, const share_key&) = default;
};

/// The ident CPython's `multiprocessing.resource_sharer` uses: `(address, key)`, as found in
/// `DupFd(fd)._id`. `key` is the Python int in decimal.
struct cpython_ident {
    std::string address;  ///< path of the server's AF_UNIX SOCK_STREAM listener
    std::string key;      ///< decimal digits of the (non-negative) key

    friend bool operator==(const cpython_ident&, const cpython_ident&) = default;
};

/// Names one share: the sharer's socket address and the share's key.
class share_id {
public:
    /// An empty id (no address); format() of it is not parseable.
    share_id() = default;
    /// @throws std::system_error: std::errc::filename_too_long if @p address is longer than 107
    /// bytes, std::errc::invalid_argument if it is empty, not absolute or holds a NUL byte.
    share_id(std::string address, share_key key);
    /// As the constructor, reporting through @p ec (returns an empty id on error).
    [[nodiscard]] static share_id make(std::string address, share_key key, std::error_code& ec) noexcept;

    /// The sharer's AF_UNIX socket path.
    [[nodiscard]] const std::string& address() const noexcept { return address_; }
    /// The share's key.
    [[nodiscard]] share_key key() const noexcept { return key_; }
    /// True unless default-constructed.
    [[nodiscard]] bool empty() const noexcept { return address_.empty(); }

    /// The text form `steward1:<32 hex>@<percent-encoded address>` (see the file comment).
    [[nodiscard]] std::string format() const;
    /// Parses the text form. @throws std::system_error (errc::malformed_message) whose what()
    /// names the part that is wrong.
    [[nodiscard]] static share_id parse(std::string_view text);
    /// As parse(text), reporting through @p ec (errc::malformed_message; returns an empty id).
    [[nodiscard]] static share_id parse(std::string_view text, std::error_code& ec) noexcept;

    /// The CPython ident `(address, key)` naming the same share (key in decimal).
    [[nodiscard]] cpython_ident to_cpython() const;
    /// The share named by a CPython ident whose key is below 2^128.
    /// @throws std::system_error (errc::malformed_message for a bad key, or as the constructor).
    [[nodiscard]] static share_id from_cpython(const cpython_ident& ident);
    /// As from_cpython(ident), reporting through @p ec (returns an empty id on error).
    [[nodiscard]] static share_id from_cpython(const cpython_ident& ident, std::error_code& ec) noexcept;

    friend bool operator==(const share_id&, const share_id&) = default;

private:
    std::string address_;
    share_key key_;
};

}  // namespace steward

/// Hash of a share_key (its bits are random, so mixing the halves is enough).
template <>
struct std::hash<steward::share_key> {
    std::size_t operator()(const steward::share_key& k) const noexcept {
        return static_cast<std::size_t>(k.low ^ (k.high * 0x9e3779b97f4a7c15ULL));
    }
};
