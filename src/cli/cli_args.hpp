#pragma once
// Small helpers shared by the `steward share`, `steward fetch` and demo subcommands: numbers from
// the command line, the authkey choice, and what a received descriptor is.

#include <steward/authkey.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

namespace steward::cli {

/// sysexits.h's EX_USAGE: bad command line.
inline constexpr int exit_usage = 64;

/// A non-negative decimal int (no sign, no trailing characters); nullopt otherwise.
inline std::optional<int> parse_fd_number(std::string_view text) {
    int value = -1;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc{} || end != text.data() + text.size() || value < 0) return std::nullopt;
    return value;
}

/// A positive, finite number of seconds ("30", "0.5"); at most ~31 years so the duration cannot
/// overflow. nullopt otherwise.
inline std::optional<double> parse_seconds(const std::string& text) {
    if (text.empty() || text.front() == '-' || text.front() == '+' || text.front() == ' ')
        return std::nullopt;
    char* end = nullptr;
    errno = 0;
    const double value = std::strtod(text.c_str(), &end);
    if (errno != 0 || end != text.c_str() + text.size() || !(value > 0.0) || value > 1e9) return std::nullopt;
    return value;
}

/// The key a share/fetch uses: `--authkey HEX` when given, else the family key (STEWARD_AUTHKEY, or
/// a fresh random key when that is not set; `*from_environment` tells which).
/// @throws std::system_error (errc::malformed_message) for a bad HEX or STEWARD_AUTHKEY.
inline authkey choose_authkey(const std::optional<std::string>& hex, bool* from_environment = nullptr) {
    if (from_environment) *from_environment = hex.has_value() || std::getenv("STEWARD_AUTHKEY") != nullptr;
    if (hex) return authkey::from_hex(*hex);
    return authkey::family();
}

/// What a descriptor refers to, in the words `steward fetch` prints.
struct fd_description {
    std::string type;    ///< file, dir, socket, pipe, memfd or other
    std::string target;  ///< the /proc/self/fd link ("/etc/hosts", "socket:[123]", "/memfd:x (deleted)")
};

/// The /proc/self/fd/N link of @p fd, or "?" when it cannot be read.
inline std::string fd_link_target(int fd) {
    const std::string link = "/proc/self/fd/" + std::to_string(fd);
    std::string buffer(256, '\0');
    for (;;) {
        const ssize_t n = ::readlink(link.c_str(), buffer.data(), buffer.size());
        if (n < 0) return "?";
        if (static_cast<std::size_t>(n) < buffer.size()) {
            buffer.resize(static_cast<std::size_t>(n));
            return buffer;
        }
        buffer.resize(buffer.size() * 2);  // possibly truncated: try again with more room
    }
}

/// Classifies @p fd with fstat plus its /proc link: a memfd is a regular file whose link starts
/// with "/memfd:" (the kernel names it that way; fstat alone cannot tell it from a file).
inline fd_description describe_fd(int fd) {
    fd_description d;
    d.target = fd_link_target(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        d.type = "other";
    } else if (S_ISREG(st.st_mode)) {
        const std::string_view t = d.target;
        d.type = (t.starts_with("/memfd:") || t.starts_with("memfd:")) ? "memfd" : "file";
    } else if (S_ISDIR(st.st_mode)) {
        d.type = "dir";
    } else if (S_ISSOCK(st.st_mode)) {
        d.type = "socket";
    } else if (S_ISFIFO(st.st_mode)) {
        d.type = "pipe";
    } else {
        d.type = "other";
    }
    return d;
}

}  // namespace steward::cli
