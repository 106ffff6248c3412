#pragma once
// Shared by the libFuzzer targets: an invariant check that stays on in every build type (assert()
// vanishes under NDEBUG, and RelWithDebInfo defines it), and small byte helpers.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string_view>

// A failed invariant aborts, which libFuzzer reports as a crash and saves the input.
#define FUZZ_CHECK(cond)                                                                              \
    do {                                                                                              \
        if (!(cond)) {                                                                                \
            (void)std::fprintf(stderr, "%s:%d: invariant violated: %s\n", __FILE__, __LINE__, #cond); \
            std::abort();                                                                             \
        }                                                                                             \
    } while (0)

namespace steward::fuzz {

inline std::span<const std::byte> as_bytes(const std::uint8_t* data, std::size_t size) noexcept {
    return {reinterpret_cast<const std::byte*>(data), size};
}

inline std::span<const std::byte> as_bytes(std::string_view s) noexcept {
    return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

inline std::string_view as_text(std::span<const std::byte> b) noexcept {
    return {reinterpret_cast<const char*>(b.data()), b.size()};
}

// Deterministic read sizes derived from the input itself, so a stream is cut at places that
// depend on its content (and a crash reproduces from the saved input alone).
class chunker {
public:
    explicit chunker(std::uint32_t seed) noexcept : state_(seed * 2654435761U + 1) {}
    std::size_t next(std::size_t max) noexcept {
        state_ ^= state_ << 13;
        state_ ^= state_ >> 17;
        state_ ^= state_ << 5;
        return 1 + state_ % max;
    }

private:
    std::uint32_t state_;
};

inline std::uint32_t seed_of(std::span<const std::byte> data) noexcept {
    std::uint32_t h = 2166136261U;
    for (std::size_t i = 0; i < data.size() && i < 16; ++i)
        h = (h ^ std::to_integer<std::uint32_t>(data[i])) * 16777619U;
    return h ^ static_cast<std::uint32_t>(data.size());
}

}  // namespace steward::fuzz
