#include <steward/io/backend_probe.hpp>
#include <steward/io_uring_check.hpp>

#include <steward/error.hpp>
#include <steward/io/process_generation.hpp>

#include <liburing.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <fstream>
#include <string>

namespace steward {
namespace {
#if STEWARD_IO_URING_BACKEND  // an epoll build never probes, so it has nothing to explain

constexpr const char* epoll_fix =
    " To run without io_uring, rebuild steward with -DSTEWARD_IO_BACKEND=epoll.";

std::string sysctl_io_uring_disabled() {
    std::ifstream in("/proc/sys/kernel/io_uring_disabled");
    std::string value;
    if (!(in >> value)) return "absent (kernel older than 6.6)";
    return value;
}

std::string explain(errc e, int raw) {
    switch (e) {
        case errc::io_uring_blocked:
            return "io_uring_setup failed with EPERM: io_uring is blocked. Either a seccomp policy "
                   "forbids it (Docker's default profile does: run with --security-opt seccomp=<profile "
                   "allowing io_uring_setup/io_uring_enter/io_uring_register>) or the sysctl "
                   "kernel.io_uring_disabled forbids it (current value: " +
                   sysctl_io_uring_disabled() +
                   "; 0 allows everyone, 1 only the group in kernel.io_uring_group; set it with "
                   "`sysctl kernel.io_uring_disabled=0`)." +
                   epoll_fix;
        case errc::io_uring_unsupported:
            return "io_uring_setup failed with ENOSYS: this kernel has no io_uring (needs Linux >= 5.6, "
                   "CONFIG_IO_URING=y) or a sandbox such as gVisor does not implement it. Use a kernel or "
                   "runtime with io_uring." +
                   std::string(epoll_fix);
        case errc::io_uring_memlock:
            return "io_uring_setup failed with ENOMEM: RLIMIT_MEMLOCK is too low for the ring "
                   "(kernels before 5.12 charge rings to it; newer ones charge the memory cgroup, so "
                   "check its limit too). "
                   "Raise it (`ulimit -l unlimited`, or LimitMEMLOCK= in a systemd unit, or --ulimit "
                   "memlock=-1 for containers)." +
                   std::string(epoll_fix);
        default:
            return "io_uring_setup failed: " + errno_code(raw).message() + "." + epoll_fix;
    }
}

#endif
}  // namespace

void check_io_uring(std::error_code& ec, std::string* explanation) noexcept {
    ec.clear();
    if (explanation) explanation->clear();
#if STEWARD_IO_URING_BACKEND
    io_uring ring{};
    const int rc = ::io_uring_queue_init(2, &ring, 0);
    if (rc == 0) {
        ::io_uring_queue_exit(&ring);
        return;
    }
    switch (-rc) {
        case EPERM:
            ec = errc::io_uring_blocked;
            break;
        case ENOSYS:
            ec = errc::io_uring_unsupported;
            break;
        case ENOMEM:
            ec = errc::io_uring_memlock;
            break;
        default:
            ec = errno_code(rc);
            break;
    }
    if (explanation) {
        try {
            *explanation =
                explain(ec.category() == error_category() ? static_cast<errc>(ec.value()) : errc{}, rc);
        } catch (...) {
            explanation->clear();  // out of memory: the code alone still says what happened
        }
    }
#endif
}

void check_io_uring() {
    std::error_code ec;
    std::string explanation;
    check_io_uring(ec, &explanation);
    if (ec) throw std::system_error(ec, explanation);
}

namespace io {

std::error_code io_uring_status() noexcept {
    // Keyed by process generation so a forked child (possibly under a new seccomp filter) probes
    // again. No mutex: a fork() while another thread held it would leave the child's copy locked
    // forever. Threads that race here each probe and store the same answer; the code is packed into
    // one word (value * 2 + "is steward's category") so a reader never pairs one thread's value
    // with another's category.
    static std::atomic<std::uint64_t> probed_in{0};
    static std::atomic<int> packed{0};
    const std::uint64_t self = process_generation();
    if (probed_in.load(std::memory_order_acquire) != self) {
        std::error_code ec;
        check_io_uring(ec);
        packed.store(ec.value() * 2 + (ec.category() == error_category() ? 1 : 0), std::memory_order_relaxed);
        probed_in.store(self, std::memory_order_release);
        return ec;
    }
    const int word = packed.load(std::memory_order_relaxed);
    if (word == 0) return {};
    if (word % 2 == 1) return {word / 2, error_category()};
    return errno_code(word / 2);
}

}  // namespace io
}  // namespace steward
