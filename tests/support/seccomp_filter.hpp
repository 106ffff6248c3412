#pragma once
// A seccomp-BPF filter for tests that need one system call to fail the way a container or an old
// kernel makes it fail (io_uring_setup -> EPERM under Docker's default profile, ENOSYS under gVisor;
// pidfd_open -> ENOSYS before Linux 5.3). A filter cannot be removed: install it in a forked child.

#include <boost/test/unit_test.hpp>

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <iterator>

namespace steward::test {

#if defined(__x86_64__)
inline constexpr std::uint32_t native_audit_arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
inline constexpr std::uint32_t native_audit_arch = AUDIT_ARCH_AARCH64;
#else
#error "seccomp_filter.hpp: add the AUDIT_ARCH_* value of this architecture"
#endif

/// Makes system call @p nr fail with @p err in the calling thread and its future children; every
/// other call is allowed. A call from a foreign ABI kills the process, so a filter that does not
/// match what it was written for is noticed instead of silently allowing everything.
/// Async-signal-safe (usable between fork and exec). Returns 0, or the errno of prctl.
inline int install_errno_filter(long nr, int err) noexcept {
    sock_filter program[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, native_audit_arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<std::uint32_t>(nr), 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (static_cast<std::uint32_t>(err) & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog fprog{static_cast<unsigned short>(std::size(program)), program};
    // Without no_new_privs an unprivileged process may not install a filter; as root it is not
    // needed, but setting it keeps the tests identical for every user.
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
    if (::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog) != 0) return errno;
    return 0;
}

/// Boost.Test precondition: a forked child can install a filter (some sandboxes refuse seccomp).
inline boost::test_tools::assertion_result seccomp_available(boost::unit_test::test_unit_id) {
    const pid_t pid = ::fork();
    if (pid == 0) ::_exit(install_errno_filter(__NR_getppid, EPERM) == 0 ? 0 : 1);
    int status = 0;
    boost::test_tools::assertion_result ok =
        pid > 0 && ::waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok) ok.message() << "seccomp filters cannot be installed here, test skipped";
    return ok;
}

}  // namespace steward::test
