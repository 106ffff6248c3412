#include <steward/io/process_generation.hpp>

#include <pthread.h>
#include <unistd.h>

#include <atomic>

namespace steward::io {
namespace {

std::atomic<std::uint64_t> generation{1};

void on_fork_child() noexcept {
    generation.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

std::uint64_t process_generation() noexcept {
    // Installed once, before any caller can have stored a generation: a fork before the first
    // call changes nothing anyone compares against.
    static const bool installed = ::pthread_atfork(nullptr, nullptr, on_fork_child) == 0;
    // Without the handler (pthread_atfork ran out of memory) the pid still tells processes apart,
    // in a range the counter never reaches.
    if (!installed) return (std::uint64_t{1} << 32) + static_cast<std::uint64_t>(::getpid());
    return generation.load(std::memory_order_relaxed);
}

}  // namespace steward::io
