#include <steward/io/process_generation.hpp>

#include <pthread.h>
#include <unistd.h>

namespace steward::io::detail {

std::atomic<std::uint64_t> current_process_generation{0};

namespace {

void on_fork_child() noexcept {
    // Runs in the child only, before fork() returns there; no other thread exists yet.
    current_process_generation.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

std::uint64_t process_generation_slow() noexcept {
    // Installed once. Until the first generation is published nobody can have stored one, so a
    // fork in between (the child counts up from 0 to 1) changes nothing anyone compares against.
    static const bool installed = ::pthread_atfork(nullptr, nullptr, on_fork_child) == 0;
    // Without the handler (pthread_atfork ran out of memory) the pid still tells processes apart,
    // in a range the counter never reaches; the slow path is then taken on every call.
    if (!installed) return (std::uint64_t{1} << 32) + static_cast<std::uint64_t>(::getpid());
    std::uint64_t none = 0;
    (void)current_process_generation.compare_exchange_strong(none, 1, std::memory_order_relaxed);
    return current_process_generation.load(std::memory_order_relaxed);
}

}  // namespace steward::io::detail
