#define BOOST_TEST_MODULE io_probe
#include "support/seccomp_filter.hpp"
#include "support/test_support.hpp"

#include <steward/error.hpp>
#include <steward/io/backend_probe.hpp>
#include <steward/io_uring_check.hpp>
#include <steward/unique_fd.hpp>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

// The probe is exercised in forked children: a seccomp filter cannot be removed once installed,
// and the parent must stay able to use io_uring for the rest of the suite.

namespace {

int install_io_uring_setup_filter(int err) { return steward::test::install_errno_filter(__NR_io_uring_setup, err); }

/// What a child saw when it ran the probe.
struct probe_outcome {
    int filter_error = 0;         ///< errno of installing the filter (0: installed or none)
    int value = 0;                ///< check_io_uring(ec) -> ec.value()
    std::string category;         ///< ec.category().name()
    std::string explanation;      ///< the explanation string of the error_code& overload
    bool threw = false;           ///< check_io_uring() threw std::system_error
    int thrown_value = 0;         ///< its code().value()
    std::string thrown_category;  ///< its code().category().name()
    std::string thrown_what;      ///< its what()
    int cached_value = 0;         ///< steward::io::io_uring_status() in the child
    std::string cached_category;
};

void put_string(std::string& out, const std::string& s) {
    out += std::to_string(s.size());
    out += ':';
    out += s;
}

std::string take_string(const std::string& in, std::size_t& pos) {
    const std::size_t colon = in.find(':', pos);
    BOOST_REQUIRE(colon != std::string::npos);
    const std::size_t len = std::stoul(in.substr(pos, colon - pos));
    BOOST_REQUIRE(colon + 1 + len <= in.size());
    std::string s = in.substr(colon + 1, len);
    pos = colon + 1 + len;
    return s;
}

/// Everything the child does after fork: optionally lower RLIMIT_MEMLOCK and install the filter,
/// then run both probe overloads and the cached probe, and serialise the results.
std::string child_body(std::optional<int> filter_errno, std::optional<rlim_t> memlock) {
    probe_outcome r;
    if (memlock) {
        const rlimit lim{*memlock, *memlock};
        if (::setrlimit(RLIMIT_MEMLOCK, &lim) != 0) r.filter_error = errno;
    }
    if (filter_errno && r.filter_error == 0) r.filter_error = install_io_uring_setup_filter(*filter_errno);
    if (r.filter_error == 0) {
        std::error_code ec = std::make_error_code(std::errc::invalid_argument);  // must be overwritten
        r.explanation = "stale text that the probe must clear";
        steward::check_io_uring(ec, &r.explanation);
        r.value = ec.value();
        r.category = ec.category().name();
        try {
            steward::check_io_uring();
        } catch (const std::system_error& e) {
            r.threw = true;
            r.thrown_value = e.code().value();
            r.thrown_category = e.code().category().name();
            r.thrown_what = e.what();
        }
        const std::error_code cached = steward::io::io_uring_status();
        r.cached_value = cached.value();
        r.cached_category = cached.category().name();
    }
    std::string out;
    for (int v : {r.filter_error, r.value, int(r.threw), r.thrown_value, r.cached_value})
        put_string(out, std::to_string(v));
    for (const std::string* s :
         {&r.category, &r.explanation, &r.thrown_category, &r.thrown_what, &r.cached_category})
        put_string(out, *s);
    return out;
}

/// Forks a child that runs the probe (see child_body) and returns what it reported through a pipe.
probe_outcome probe_in_child(std::optional<int> filter_errno, std::optional<rlim_t> memlock = std::nullopt) {
    int fds[2];
    BOOST_REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    steward::unique_fd read_end{fds[0]}, write_end{fds[1]};
    const pid_t pid = ::fork();
    BOOST_REQUIRE(pid >= 0);
    if (pid == 0) {
        // The child must never return into Boost.Test: _exit on every path.
        int status = 0;
        try {
            read_end.reset();
            const std::string out = child_body(filter_errno, memlock);
            std::size_t done = 0;
            while (done < out.size()) {
                const ssize_t n = ::write(write_end.get(), out.data() + done, out.size() - done);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) {
                    status = 3;
                    break;
                }
                done += static_cast<std::size_t>(n);
            }
        } catch (...) {
            status = 2;
        }
        ::_exit(status);
    }
    write_end.reset();
    std::string in;
    char buf[4096];
    for (;;) {
        const ssize_t n = ::read(read_end.get(), buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        BOOST_REQUIRE(n >= 0);
        if (n == 0) break;
        in.append(buf, static_cast<std::size_t>(n));
    }
    int status = 0;
    BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
    BOOST_REQUIRE_MESSAGE(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                          "probe child failed, wait status " << status);

    probe_outcome r;
    std::size_t pos = 0;
    int* ints[] = {&r.filter_error, &r.value, nullptr, &r.thrown_value, &r.cached_value};
    for (int* target : ints) {
        const int v = std::stoi(take_string(in, pos));
        if (target)
            *target = v;
        else
            r.threw = v != 0;
    }
    for (std::string* s :
         {&r.category, &r.explanation, &r.thrown_category, &r.thrown_what, &r.cached_category})
        *s = take_string(in, pos);
    BOOST_REQUIRE(pos == in.size());
    BOOST_REQUIRE_MESSAGE(r.filter_error == 0,
                          "could not set up the child: " << std::strerror(r.filter_error));
    return r;
}

using steward::test::seccomp_available;

[[maybe_unused]] std::string sysctl_value() {
    std::ifstream in("/proc/sys/kernel/io_uring_disabled");
    std::string value;
    if (!(in >> value)) return "absent";
    return value;
}

bool contains(const std::string& haystack, const std::string& needle) {
    return haystack.find(needle) != std::string::npos;
}

/// The assertions every failure outcome shares: both overloads and the cached probe agree on the
/// code, and the throwing overload carries the same explanation.
[[maybe_unused]] void check_failure(const probe_outcome& r, steward::errc expected) {
    const std::error_code want = expected;
    BOOST_TEST(r.category == std::string(want.category().name()));
    BOOST_TEST(r.value == want.value());
    BOOST_TEST(r.threw);
    BOOST_TEST(r.thrown_category == r.category);
    BOOST_TEST(r.thrown_value == r.value);
    BOOST_TEST(contains(r.thrown_what, r.explanation));
    // The cached probe re-runs in a forked child instead of reporting the parent's result.
    BOOST_TEST(r.cached_category == r.category);
    BOOST_TEST(r.cached_value == r.value);
    BOOST_TEST(contains(r.explanation, "STEWARD_IO_BACKEND=epoll"), r.explanation);
}

}  // namespace

#if STEWARD_IO_URING_BACKEND

BOOST_AUTO_TEST_CASE(probe_succeeds_where_io_uring_works,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    std::error_code ec = steward::errc::io_uring_blocked;
    std::string explanation = "stale";
    steward::check_io_uring(ec, &explanation);
    BOOST_TEST(!ec);
    BOOST_TEST(explanation.empty());
    BOOST_CHECK_NO_THROW(steward::check_io_uring());
    BOOST_TEST(!steward::io::io_uring_status());
    // Also in a child without a filter: proves the child harness itself does not make it fail.
    const probe_outcome r = probe_in_child(std::nullopt);
    BOOST_TEST(r.value == 0);
    BOOST_TEST(r.explanation.empty());
    BOOST_TEST(!r.threw);
    BOOST_TEST(r.cached_value == 0);
}

BOOST_AUTO_TEST_CASE(eperm_from_seccomp_is_reported_as_blocked,
                     *boost::unit_test::precondition(seccomp_available)) {
    // Prime the parent's cache first: the child must probe again, not inherit "works".
    (void)steward::io::io_uring_status();
    const probe_outcome r = probe_in_child(EPERM);
    check_failure(r, steward::errc::io_uring_blocked);
    BOOST_TEST(contains(r.explanation, "EPERM"), r.explanation);
    BOOST_TEST(contains(r.explanation, "seccomp"), r.explanation);
    BOOST_TEST(contains(r.explanation, "kernel.io_uring_disabled"), r.explanation);
    BOOST_TEST(contains(r.explanation, "current value: " + sysctl_value()), r.explanation);
    const std::error_code code{r.value, steward::error_category()};
    BOOST_TEST((code == std::errc::operation_not_permitted));
}

BOOST_AUTO_TEST_CASE(enosys_is_reported_as_unsupported, *boost::unit_test::precondition(seccomp_available)) {
    const probe_outcome r = probe_in_child(ENOSYS);
    check_failure(r, steward::errc::io_uring_unsupported);
    BOOST_TEST(contains(r.explanation, "ENOSYS"), r.explanation);
    BOOST_TEST(contains(r.explanation, "gVisor"), r.explanation);
    BOOST_TEST(contains(r.explanation, "kernel"), r.explanation);
    const std::error_code code{r.value, steward::error_category()};
    BOOST_TEST((code == std::errc::function_not_supported));
}

BOOST_AUTO_TEST_CASE(enomem_is_reported_as_memlock, *boost::unit_test::precondition(seccomp_available)) {
    const probe_outcome r = probe_in_child(ENOMEM);
    check_failure(r, steward::errc::io_uring_memlock);
    BOOST_TEST(contains(r.explanation, "ENOMEM"), r.explanation);
    BOOST_TEST(contains(r.explanation, "RLIMIT_MEMLOCK"), r.explanation);
    BOOST_TEST(contains(r.explanation, "ulimit -l"), r.explanation);
}

BOOST_AUTO_TEST_CASE(memlock_limit_of_zero_is_harmless_or_explained,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    // Since Linux 5.12 rings are charged to the memory cgroup, not RLIMIT_MEMLOCK, so a zero limit
    // normally still works; on an older kernel it must come back as io_uring_memlock, nothing else.
    const probe_outcome r = probe_in_child(std::nullopt, rlim_t{0});
    if (r.value == 0) {
        BOOST_TEST(!r.threw);
        BOOST_TEST(r.explanation.empty());
    } else {
        check_failure(r, steward::errc::io_uring_memlock);
    }
}

BOOST_AUTO_TEST_CASE(other_errors_keep_their_errno_and_still_name_the_fix,
                     *boost::unit_test::precondition(seccomp_available)) {
    const probe_outcome r = probe_in_child(EINVAL);
    BOOST_TEST(r.category == std::string(std::system_category().name()));
    BOOST_TEST(r.value == EINVAL);
    BOOST_TEST(r.threw);
    BOOST_TEST(r.thrown_value == EINVAL);
    BOOST_TEST(r.cached_value == EINVAL);
    BOOST_TEST(contains(r.explanation, "STEWARD_IO_BACKEND=epoll"), r.explanation);
}

BOOST_AUTO_TEST_CASE(threads_racing_for_the_cached_probe_agree,
                     *boost::unit_test::precondition(seccomp_available)) {
    const pid_t pid = ::fork();
    BOOST_REQUIRE(pid >= 0);
    if (pid == 0) {
        int status = 2;
        try {
            if (install_io_uring_setup_filter(EPERM) == 0) {
                const std::error_code want = steward::errc::io_uring_blocked;
                std::atomic<int> agreed{0};
                std::vector<std::thread> threads;
                for (int i = 0; i < 8; ++i)
                    threads.emplace_back([&] {
                        if (steward::io::io_uring_status() == want) ++agreed;
                    });
                for (auto& t : threads) t.join();
                status = agreed == 8 && steward::io::io_uring_status() == want ? 0 : 1;
            }
        } catch (...) {
            status = 3;
        }
        ::_exit(status);
    }
    int status = 0;
    BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
    BOOST_TEST(WIFEXITED(status));
    BOOST_TEST(WEXITSTATUS(status) == 0, "child exit status " << WEXITSTATUS(status) << " (1: disagreement)");
}

#else  // epoll build: the probe has nothing to check and must not fail even where io_uring is blocked

BOOST_AUTO_TEST_CASE(epoll_build_probe_always_succeeds, *boost::unit_test::precondition(seccomp_available)) {
    for (int err : {EPERM, ENOSYS, ENOMEM}) {
        const probe_outcome r = probe_in_child(err);
        BOOST_TEST(r.value == 0);
        BOOST_TEST(r.explanation.empty());
        BOOST_TEST(!r.threw);
        BOOST_TEST(r.cached_value == 0);
    }
    std::error_code ec = steward::errc::io_uring_blocked;
    steward::check_io_uring(ec);
    BOOST_TEST(!ec);
    BOOST_CHECK_NO_THROW(steward::check_io_uring());
}

#endif

BOOST_AUTO_TEST_CASE(probe_leaks_no_descriptor) {
    const int before = steward::test::open_fd_count();
    for (int i = 0; i < 8; ++i) {
        std::error_code ec;
        steward::check_io_uring(ec);
    }
    BOOST_TEST(steward::test::open_fd_count() == before);
}
