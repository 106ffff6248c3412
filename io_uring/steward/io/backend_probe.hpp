#pragma once
// The cached form of steward::check_io_uring() that operations call before their first use of the
// executor: the probe itself runs once per process (and again in a forked child, whose seccomp
// filter may differ).

#include <system_error>

namespace steward::io {

/// Returns the result of check_io_uring(), computed once per process.
[[nodiscard]] std::error_code io_uring_status() noexcept;

}  // namespace steward::io
