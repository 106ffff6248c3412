#pragma once
// A cheap "am I still the same process?" check for per-process caches (an io_uring probe, a
// thread's io_context, buffered random bytes, a tracker's or sharer's owner): a number that
// changes in every child of fork(), read without a getpid() system call.

#include <atomic>
#include <cstdint>

namespace steward::io {

namespace detail {
// The generation once the fork handler is installed; 0 before that (and for good if it could not
// be installed). Read inline: a tracker compares it on every call.
extern std::atomic<std::uint64_t> current_process_generation;
[[nodiscard]] std::uint64_t process_generation_slow() noexcept;
}  // namespace detail

/// The current process generation. It is the same for every thread of one process and changes in
/// the child of every fork() (a pthread_atfork child handler, installed by the first call). A
/// cache stores the value next to what it caches and treats a different value as "a forked child:
/// start again". Never 0, so 0 can mean "nothing stored yet".
///
/// Not seen: a child made by a raw clone() system call or by vfork()/posix_spawn(), which must only
/// exec or _exit anyway.
[[nodiscard]] inline std::uint64_t process_generation() noexcept {
    const std::uint64_t g = detail::current_process_generation.load(std::memory_order_relaxed);
    return g != 0 ? g : detail::process_generation_slow();
}

}  // namespace steward::io
