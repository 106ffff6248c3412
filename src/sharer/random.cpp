#include "sharer/random.hpp"

#include <steward/error.hpp>

#include <sys/random.h>

#include <cerrno>

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

}  // namespace steward::detail
