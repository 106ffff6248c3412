#pragma once
// The tracker's wire codec: pure functions over bytes (no sockets, no allocation on the decode
// path), so the daemon, the client and a fuzzer share one implementation.
//
// Two formats share one pipe (see docs/tracker.md):
//   colon  REGISTER:/psm_x:shared_memory\n      command up to the FIRST ':', type after the LAST ':'
//   JSON   {"cmd":"REGISTER","rtype":"shared_memory","base64_name":"L3BzbV94"}\n
// A line whose first non-blank byte is '{' is JSON. A whole message, newline included, is at most
// 512 bytes: POSIX only promises atomic pipe writes up to PIPE_BUF >= 512.

#include <steward/resource_type.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>

namespace steward::detail::tracking {

/// Largest message on the wire, newline included.
inline constexpr std::size_t max_message_size = 512;

enum class command : std::uint8_t { register_resource, unregister_resource, probe };

/// The wire spelling: "REGISTER", "UNREGISTER", "PROBE".
[[nodiscard]] std::string_view to_string(command cmd) noexcept;

/// Why a line was refused. Each value has a one-line description (describe()).
enum class decode_error : std::uint8_t {
    none = 0,
    too_long,           // more than 512 bytes including the newline
    partial_line,       // bytes after the last newline at end of input
    empty_line,         // nothing but blanks
    not_ascii,          // a colon-format line with bytes >= 0x80 (CPython decodes these lines as ASCII)
    missing_separator,  // a colon-format line without two ':' (CMD:NAME:TYPE)
    unknown_command,    // not REGISTER, UNREGISTER or PROBE
    unknown_type,       // not shared_memory, semaphore, file, directory or noop
    bad_json,           // not one JSON object, or trailing bytes after it
    missing_field,      // JSON without "cmd" or "rtype", or without "base64_name" outside PROBE
    field_not_string,   // "cmd", "rtype" or "base64_name" is not a JSON string
    bad_base64,         // "base64_name" is not base64 (URL-safe or standard alphabet)
    noop_registered,    // REGISTER/UNREGISTER with type noop (noop is for PROBE only)
    empty_name,         // REGISTER/UNREGISTER of an empty name
    nul_in_name,        // a NUL byte in the name: no system call can take it
    relative_path,      // file/directory names must be absolute paths
    unsafe_path,        // "/" itself, or a "." or ".." component in a file/directory path
};

/// A short description of @p error, e.g. "unknown resource type".
[[nodiscard]] std::string_view describe(decode_error error) noexcept;

/// One decoded message. `name` is canonical: shared_memory and semaphore names always start with
/// one '/' (`abc` and `/abc` are the same object), file and directory paths have repeated and
/// trailing '/' removed. For PROBE the name is not interpreted and may be anything.
struct decoded_message {
    command cmd = command::probe;
    resource_type type = resource_type::noop;
    std::string_view name;  // points into the line or into the decode_scratch
};

/// Room for the bytes decode_line() cannot leave in place (decoded JSON strings, base64 output,
/// a canonicalised name). Reuse one per reader: the decoded name lives until the next decode.
struct decode_scratch {
    std::array<char, max_message_size> strings;   // unescaped JSON strings
    std::array<char, max_message_size + 1> name;  // canonical or base64-decoded name
};

/// Decodes one line. @p line may end with its '\n' (counted in the 512-byte limit). Surrounding
/// ASCII blanks are ignored, as Python's bytes.strip() does.
[[nodiscard]] decode_error decode_line(std::string_view line, decoded_message& out,
                                       decode_scratch& scratch) noexcept;

/// Canonical form of @p name for @p type written to @p out (size >= name.size() + 1), or a
/// reason to refuse it. Used by decode_line(); exposed for the client and the tests.
[[nodiscard]] decode_error canonical_name(resource_type type, std::string_view name, char* out,
                                          std::string_view& result) noexcept;

// ---- encoding ----------------------------------------------------------------------------------

/// True when @p name must travel as JSON: anything but printable ASCII (0x20..0x7e), or a ':'
/// (CPython 3.8-3.11 readers split colon lines at every ':').
[[nodiscard]] bool needs_json(std::string_view name) noexcept;

/// One encoded message with its newline; never more than 512 bytes.
struct encoded_message {
    std::array<char, max_message_size> bytes;
    std::size_t size = 0;
    [[nodiscard]] std::string_view view() const noexcept { return {bytes.data(), size}; }
};

/// Encodes a message: colon format when the name allows it (needs_json() is false), JSON
/// otherwise. PROBE always encodes as `PROBE:0:noop\n` (what every CPython reader accepts).
/// Errors, with @p out left empty: steward::errc::message_too_long (over 512 bytes),
/// std::errc::invalid_argument (empty name, NUL byte, or REGISTER/UNREGISTER with type noop).
[[nodiscard]] std::error_code encode_message(command cmd, resource_type type, std::string_view name,
                                             encoded_message& out) noexcept;

/// The client's form of canonical_name(): std::errc::invalid_argument for every name the daemon
/// would refuse (and for the noop type, which is never registered).
[[nodiscard]] std::error_code client_canonical_name(resource_type type, std::string_view name, char* out,
                                                    std::string_view& result) noexcept;

/// Encodes REGISTER (@p register_it) or UNREGISTER of an already canonical @p name into @p out
/// (max_message_size bytes); @p size receives the length (0 on error).
[[nodiscard]] std::error_code encode_into(bool register_it, resource_type type, std::string_view name,
                                          char* out, std::size_t& size) noexcept;

/// True when @p name is printable ASCII (0x20..0x7e) without ':', i.e. needs_json() is false and
/// the name is not empty. Eight bytes per step, no table: inline for the client's per-call path.
[[nodiscard]] inline bool plain_ascii_name(std::string_view name) noexcept {
    constexpr std::uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
    // High bit of each byte that is < 0x20, == ':' or >= 0x7f. A borrow or carry can only mark a
    // byte above one that is marked already, so "any byte marked" is exact.
    const auto marked = [](std::uint64_t w) noexcept {
        const std::uint64_t control = (w - ones * 0x20) & ~w;
        const std::uint64_t x = w ^ (ones * ':');
        const std::uint64_t colon = (x - ones) & ~x;
        const std::uint64_t upper = (w + ones) | w;  // 0x7f + 1 and every byte >= 0x80
        return (control | colon | upper) & high;
    };
    const auto load = [](const char* p) noexcept {
        std::uint64_t w;
        std::memcpy(&w, p, 8);
        return w;
    };
    const char* const p = name.data();
    const std::size_t n = name.size();
    if (n < 8) {
        std::uint64_t w = ones * 'A';  // the missing bytes read as a plain letter
        for (std::size_t i = 0; i < n; ++i)
            reinterpret_cast<unsigned char*>(&w)[i] = static_cast<unsigned char>(p[i]);
        return n != 0 && marked(w) == 0;
    }
    std::uint64_t acc = marked(load(p + n - 8));  // the last 8 bytes, overlapping the loop's
    for (std::size_t i = 0; i + 8 <= n; i += 8) acc |= marked(load(p + i));
    return acc == 0;
}

/// The common case of client_canonical_name() + encode_into(), inline for the client's per-call
/// path: a shared_memory or semaphore name that plain_ascii_name() accepts, in colon format, '/'
/// prepended when missing. Returns the line's size, or 0 for every other name or type (those take
/// the two general functions: same bytes, or the error).
[[nodiscard]] inline std::size_t plain_message_size(bool register_it, resource_type type,
                                                    std::string_view name) noexcept {
    if (type != resource_type::shared_memory && type != resource_type::semaphore) return 0;
    if (!plain_ascii_name(name)) return 0;
    const std::size_t size = (register_it ? 9 : 11) + (name.front() != '/') + name.size() +
                             (type == resource_type::shared_memory ? 15 : 11);
    return size <= max_message_size ? size : 0;
}

/// Writes the line plain_message_size() measured (it must have returned non-zero) to @p out and
/// returns the canonical name, which lies inside @p out.
inline std::string_view write_plain_message(bool register_it, resource_type type, std::string_view name,
                                            char* out) noexcept {
    // Constant sizes on every branch: each copy of a fixed part is a store or two.
    char* p = out;
    if (register_it) {
        std::memcpy(p, "REGISTER:", 9);
        p += 9;
    } else {
        std::memcpy(p, "UNREGISTER:", 11);
        p += 11;
    }
    char* const canonical = p;
    if (name.front() != '/') *p++ = '/';
    std::memcpy(p, name.data(), name.size());
    p += name.size();
    const std::string_view result(canonical, static_cast<std::size_t>(p - canonical));
    if (type == resource_type::shared_memory)
        std::memcpy(p, ":shared_memory\n", 15);
    else
        std::memcpy(p, ":semaphore\n", 11);
    return result;
}

/// As encode_message(), appending to @p out (unchanged on error). For writers that coalesce
/// several messages into one write.
[[nodiscard]] std::error_code append_message(command cmd, resource_type type, std::string_view name,
                                             std::string& out);

// ---- base64 (exposed for tests and the client) -------------------------------------------------

/// URL-safe base64 with '=' padding (Python's base64.urlsafe_b64encode). Returns bytes written to
/// @p out, which must hold ((n + 2) / 3) * 4 bytes.
std::size_t base64url_encode(std::string_view in, char* out) noexcept;

/// Decodes base64 in either alphabet ('-' '_' or '+' '/'), padded or not. Returns false on any
/// other byte, misplaced padding or an impossible length. @p out must hold in.size() * 3 / 4 bytes.
[[nodiscard]] bool base64_decode(std::string_view in, char* out, std::size_t& out_size) noexcept;

// ---- stream splitting --------------------------------------------------------------------------

/// Splits a byte stream into lines across read boundaries. Lines reach the caller in place when
/// they lie inside one chunk; only a line spanning two chunks is copied (at most 512 bytes).
/// A line longer than 512 bytes is discarded up to its newline and reported once (too_long);
/// bytes left at the end of input are reported by finish() (partial_line).
class line_splitter {
public:
    /// Calls on_line(std::string_view line_with_newline) for each complete line and
    /// on_error(decode_error) for each oversized one.
    template <typename OnLine, typename OnError>
    void feed(std::string_view chunk, OnLine&& on_line, OnError&& on_error) {
        const char* p = chunk.data();
        const char* const end = p + chunk.size();
        while (p != end) {
            const auto* nl =
                static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(end - p)));
            const std::size_t piece =
                nl ? static_cast<std::size_t>(nl - p) + 1 : static_cast<std::size_t>(end - p);
            if (discarding_) {
                if (nl) {
                    discarding_ = false;
                    on_error(decode_error::too_long);
                }
            } else if (carry_size_ == 0 && nl) {
                if (piece <= max_message_size)
                    on_line(std::string_view(p, piece));
                else
                    on_error(decode_error::too_long);
            } else if (carry_size_ + piece > max_message_size) {
                carry_size_ = 0;
                if (nl)
                    on_error(decode_error::too_long);
                else
                    discarding_ = true;
            } else {
                std::memcpy(carry_.data() + carry_size_, p, piece);
                carry_size_ += piece;
                if (nl) {
                    const std::size_t n = carry_size_;
                    carry_size_ = 0;
                    on_line(std::string_view(carry_.data(), n));
                }
            }
            p += piece;
        }
    }

    /// End of input: reports an unterminated last line (partial_line) or an oversized one still
    /// being discarded (too_long), then resets.
    template <typename OnError>
    void finish(OnError&& on_error) {
        if (discarding_)
            on_error(decode_error::too_long);
        else if (carry_size_ != 0)
            on_error(decode_error::partial_line);
        discarding_ = false;
        carry_size_ = 0;
    }

    /// Bytes of an unfinished line held back so far.
    [[nodiscard]] std::size_t pending() const noexcept { return carry_size_; }

private:
    std::array<char, max_message_size> carry_;
    std::size_t carry_size_ = 0;
    bool discarding_ = false;
};

}  // namespace steward::detail::tracking
