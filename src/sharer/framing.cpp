#include "sharer/framing.hpp"

namespace steward::detail::framing {
namespace {

std::uint64_t load_be(const std::byte* p, std::size_t n) noexcept {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
    return v;
}

}  // namespace

frame_probe probe_frame(std::span<const std::byte> received, std::uint64_t max_payload) noexcept {
    frame_probe p;
    if (received.size() < 4) {
        p.missing = 4 - received.size();
        return p;
    }
    const auto raw = static_cast<std::uint32_t>(load_be(received.data(), 4));
    if (raw == 0xffffffffU) {  // -1: the 8-byte length follows
        if (received.size() < 12) {
            p.missing = 12 - received.size();
            return p;
        }
        p.header_size = 12;
        p.payload_size = load_be(received.data() + 4, 8);
    } else if (raw & 0x80000000U) {
        p.status = frame_status::malformed;
        return p;
    } else {
        p.header_size = 4;
        p.payload_size = raw;
    }
    if (p.payload_size > max_payload) {
        p.status = frame_status::too_large;
        return p;
    }
    const std::uint64_t have = received.size() - p.header_size;
    if (have < p.payload_size) {
        p.missing = p.payload_size - have;
        return p;
    }
    p.status = frame_status::frame;
    return p;
}

std::size_t encode_header(std::uint64_t payload_size, std::span<std::byte, max_header_size> out) noexcept {
    auto store = [&](std::size_t at, std::uint64_t v, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) out[at + i] = static_cast<std::byte>(v >> (8 * (n - 1 - i)));
    };
    if (payload_size > 0x7fffffffU) {
        store(0, 0xffffffffU, 4);
        store(4, payload_size, 8);
        return 12;
    }
    store(0, payload_size, 4);
    return 4;
}

void append_frame(std::vector<std::byte>& out, std::span<const std::byte> payload) {
    std::array<std::byte, max_header_size> header;
    const std::size_t n = encode_header(payload.size(), header);
    out.insert(out.end(), header.begin(), header.begin() + static_cast<std::ptrdiff_t>(n));
    out.insert(out.end(), payload.begin(), payload.end());
}

std::vector<std::byte> make_frame(std::span<const std::byte> payload) {
    std::vector<std::byte> out;
    out.reserve(payload.size() + 4);
    append_frame(out, payload);
    return out;
}

}  // namespace steward::detail::framing
