#pragma once
/// @file
/// steward::unique_fd — the one owning file-descriptor type of steward.

#include <utility>

namespace steward {

/// Owns one file descriptor and closes it on destruction. Move-only; a default-constructed or
/// moved-from object holds nothing (`get() == -1`).
///
/// Every descriptor steward creates or receives is owned by a `unique_fd` from the moment the
/// kernel hands it over, so no raw `int` survives an error path.
class unique_fd {
public:
    constexpr unique_fd() noexcept = default;
    /// Takes ownership of @p fd (which may be -1 for "nothing").
    constexpr explicit unique_fd(int fd) noexcept : fd_(fd) {}
    unique_fd(const unique_fd&) = delete;
    unique_fd& operator=(const unique_fd&) = delete;
    constexpr unique_fd(unique_fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
    unique_fd& operator=(unique_fd&& other) noexcept {
        if (this != &other) reset(other.release());
        return *this;
    }
    ~unique_fd() { reset(); }

    /// The descriptor, still owned by this object; -1 when empty.
    [[nodiscard]] constexpr int get() const noexcept { return fd_; }
    /// True when a descriptor is held.
    constexpr explicit operator bool() const noexcept { return fd_ >= 0; }
    /// Gives up ownership without closing; returns the descriptor (or -1).
    [[nodiscard]] constexpr int release() noexcept { return std::exchange(fd_, -1); }
    /// Closes the held descriptor (if any) and takes @p fd instead. close() errors are ignored:
    /// on Linux the descriptor is released even when close() reports EINTR or EIO.
    void reset(int fd = -1) noexcept;

private:
    int fd_ = -1;
};

/// Duplicates @p fd with F_DUPFD_CLOEXEC. Throws std::system_error on failure.
[[nodiscard]] unique_fd dup_cloexec(int fd);

}  // namespace steward
