#include <steward/authkey.hpp>

#include <steward/error.hpp>

#include <sys/random.h>

#include <cerrno>
#include <cstdlib>
#include <mutex>

namespace steward {
namespace {

int hex_value(char c) noexcept {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

}  // namespace

authkey authkey::from_hex(std::string_view hex, std::error_code& ec) noexcept {
    authkey key;
    ec.clear();
    if (hex.size() != 2 * key.bytes.size()) {
        ec = errc::malformed_message;
        return key;
    }
    for (std::size_t i = 0; i < key.bytes.size(); ++i) {
        const int hi = hex_value(hex[2 * i]);
        const int lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            ec = errc::malformed_message;
            return authkey{};
        }
        key.bytes[i] = static_cast<std::byte>(hi * 16 + lo);
    }
    return key;
}

authkey authkey::from_hex(std::string_view hex) {
    std::error_code ec;
    authkey key = from_hex(hex, ec);
    if (ec) throw std::system_error(ec, "authkey: expected 64 hex digits");
    return key;
}

authkey authkey::generate() {
    authkey key;
    std::size_t filled = 0;
    while (filled < key.bytes.size()) {
        const ssize_t n = ::getrandom(key.bytes.data() + filled, key.bytes.size() - filled, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw std::system_error(errno_code(errno), "getrandom");
        }
        filled += static_cast<std::size_t>(n);
    }
    return key;
}

const authkey& authkey::family() {
    static std::once_flag once;
    static authkey key;
    std::call_once(once, [] {
        if (const char* env = std::getenv("STEWARD_AUTHKEY"); env && *env) {
            std::error_code ec;
            key = from_hex(env, ec);
            if (ec) throw std::system_error(ec, "STEWARD_AUTHKEY must be 64 hex digits");
        } else {
            key = generate();
        }
    });
    return key;
}

std::string authkey::to_hex() const {
    static constexpr char digits[] = "0123456789abcdef";
    std::string out;
    out.reserve(2 * bytes.size());
    for (std::byte b : bytes) {
        out.push_back(digits[std::to_integer<int>(b) >> 4]);
        out.push_back(digits[std::to_integer<int>(b) & 15]);
    }
    return out;
}

bool authkey::set_environment() const noexcept {
    try {
        return ::setenv("STEWARD_AUTHKEY", to_hex().c_str(), 1) == 0;
    } catch (...) {
        return false;
    }
}

}  // namespace steward
