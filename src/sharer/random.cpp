#include "sharer/random.hpp"

#include <steward/error.hpp>
#include <steward/io/process_generation.hpp>

#include <sys/random.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>

namespace steward::detail {

void fill_random(std::span<std::byte> out, std::error_code& ec) noexcept {
    ec.clear();
    std::size_t filled = 0;
    while (filled < out.size()) {
        const ssize_t n = ::getrandom(out.data() + filled, out.size() - filled, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            ec = errno_code(errno);
            return;
        }
        filled += static_cast<std::size_t>(n);
    }
}

void fill_random(std::span<std::byte> out) {
    std::error_code ec;
    fill_random(out, ec);
    throw_if(ec, "getrandom");
}

namespace {

struct random_buffer {
    static constexpr std::size_t capacity = 256;
    // Filled from getrandom before any byte is handed out.
    std::array<std::byte, capacity> bytes;  // NOLINT(cppcoreguidelines-pro-type-member-init)
    std::size_t left = 0;                   // the unused bytes are the last `left` of `bytes`
    std::uint64_t process = 0;

    random_buffer() = default;
    random_buffer(const random_buffer&) = delete;
    random_buffer& operator=(const random_buffer&) = delete;
    ~random_buffer() { ::explicit_bzero(bytes.data(), bytes.size()); }
};

}  // namespace

void fill_random_buffered(std::span<std::byte> out, std::error_code& ec) noexcept {
    ec.clear();
    if (out.size() > random_buffer::capacity / 4) return fill_random(out, ec);
    thread_local random_buffer buf;
    if (const std::uint64_t process = io::process_generation(); buf.process != process) {
        ::explicit_bzero(buf.bytes.data(), buf.bytes.size());
        buf.left = 0;
        buf.process = process;
    }
    if (buf.left < out.size()) {
        fill_random(buf.bytes, ec);
        if (ec) {
            buf.left = 0;
            return;
        }
        buf.left = buf.bytes.size();
    }
    std::byte* const from = buf.bytes.data() + (buf.bytes.size() - buf.left);
    std::memcpy(out.data(), from, out.size());
    ::explicit_bzero(from, out.size());
    buf.left -= out.size();
}

void fill_random_buffered(std::span<std::byte> out) {
    std::error_code ec;
    fill_random_buffered(out, ec);
    throw_if(ec, "getrandom");
}

}  // namespace steward::detail
