#define BOOST_TEST_MODULE io_spawn
#include "support/seccomp_filter.hpp"
#include "support/test_support.hpp"

#include <steward/error.hpp>
#include <steward/io/async_spawn.hpp>
#include <steward/io/child_process.hpp>
#include <steward/unique_fd.hpp>

#include <asio/as_tuple.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/deferred.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <csignal>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using steward::unique_fd;
namespace sio = steward::io;

// Every test leaves the process with the descriptors it started with, and no child behind.
struct fd_and_child_balance {
    int before = steward::test::open_fd_count();
    ~fd_and_child_balance() {
        BOOST_TEST(steward::test::open_fd_count() == before);
        siginfo_t info{};
        errno = 0;
        const int rc = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG);
        BOOST_TEST((rc == -1 && errno == ECHILD), "a child process was left behind");
    }
};

std::uint64_t status_mask(pid_t pid, const std::string& field) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    while (std::getline(in, line))
        if (line.rfind(field + ":", 0) == 0) return std::stoull(line.substr(field.size() + 1), nullptr, 16);
    BOOST_FAIL("no " << field << " in /proc/" << pid << "/status");
    return 0;
}

constexpr std::uint64_t bit(int signo) {
    return std::uint64_t{1} << (signo - 1);
}

// The calling thread's blocked signals (as a set: GCC 12 cannot keep a sigset_t in a coroutine frame).
std::set<int> current_mask() {
    sigset_t mask;
    ::sigemptyset(&mask);
    ::pthread_sigmask(SIG_SETMASK, nullptr, &mask);
    std::set<int> out;
    for (int s = 1; s < NSIG; ++s)
        if (::sigismember(&mask, s) == 1) out.insert(s);
    return out;
}

void change_mask(int how, std::initializer_list<int> signals) {
    sigset_t set;
    ::sigemptyset(&set);
    for (int s : signals) ::sigaddset(&set, s);
    BOOST_REQUIRE(::pthread_sigmask(how, &set, nullptr) == 0);
}

std::string link_of(const std::string& path) {
    char buf[4096];
    const ssize_t n = ::readlink(path.c_str(), buf, sizeof buf);
    return n < 0 ? std::string() : std::string(buf, static_cast<std::size_t>(n));
}

std::string child_fd_link(pid_t pid, int fd) {
    return link_of("/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd));
}
std::string own_fd_link(int fd) {
    return link_of("/proc/self/fd/" + std::to_string(fd));
}

std::set<int> child_fds(pid_t pid) {
    std::set<int> fds;
    const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
    if (DIR* d = ::opendir(dir.c_str())) {
        while (auto* e = ::readdir(d))
            if (e->d_name[0] != '.') fds.insert(std::atoi(e->d_name));
        ::closedir(d);
    }
    return fds;
}

// The child's descriptor flags (octal "flags:" line of /proc/PID/fdinfo/N).
long child_fd_flags(pid_t pid, int fd) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/fdinfo/" + std::to_string(fd));
    std::string key;
    while (in >> key)
        if (key == "flags:") {
            std::string value;
            in >> value;
            return std::stol(value, nullptr, 8);
        }
    return -1;
}

struct pipe_pair {
    unique_fd read_end;
    unique_fd write_end;
};

pipe_pair make_pipe() {
    int fds[2];
    BOOST_REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    return {unique_fd{fds[0]}, unique_fd{fds[1]}};
}

std::string read_all(int fd) {
    std::string out;
    char buf[4096];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) out.append(buf, static_cast<std::size_t>(n));
    return out;
}

bool is_alive(pid_t pid) {
    return ::kill(pid, 0) == 0;
}

// GCC 12 miscompiles ("array used as initializer") a braced std::vector<std::string> argument
// inside a co_await expression; build argv outside it.
std::vector<std::string> argv(std::initializer_list<const char*> args) {
    return {args.begin(), args.end()};
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(spawn, fd_and_child_balance)

// The listed signals are blocked in the child only: the child's mask is exactly that set, whatever
// the caller's is, and the caller's mask is the same after the call.
STEWARD_CORO_TEST(child_mask_holds_exactly_the_listed_signals_and_the_callers_is_unchanged) {
    const bool usr2_was_blocked = current_mask().count(SIGUSR2) != 0;
    change_mask(SIG_BLOCK, {SIGUSR2});
    const std::set<int> before = current_mask();

    sio::spawn_options options;
    options.blocked_signals = {SIGINT, SIGTERM};
    const std::vector<std::string> sleeper = argv({"/bin/sleep", "30"});
    sio::child_process child =
        co_await sio::async_spawn(ctx.get_executor(), sleeper, options, asio::use_awaitable);
    const std::set<int> after = current_mask();
    if (!usr2_was_blocked) change_mask(SIG_UNBLOCK, {SIGUSR2});

    BOOST_TEST(before == after);
    BOOST_TEST(after.count(SIGUSR2) == 1u);
    BOOST_TEST(after.count(SIGINT) == 0u);
    BOOST_TEST(after.count(SIGTERM) == 0u);
    BOOST_TEST(status_mask(child.pid(), "SigBlk") == (bit(SIGINT) | bit(SIGTERM)));

    // SIGTERM is blocked there: terminate() is queued, kill() is not blockable.
    child.terminate();
    BOOST_TEST((status_mask(child.pid(), "ShdPnd") & bit(SIGTERM)) != 0);
    BOOST_TEST(is_alive(child.pid()));
    child.kill();
    const sio::exit_status status = co_await child.async_wait(asio::use_awaitable);
    BOOST_TEST(status.killed());
    BOOST_TEST(status.signal() == SIGKILL);
}

STEWARD_CORO_TEST(setsigdef_resets_signals_the_parent_ignores) {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    ::sigemptyset(&ignore.sa_mask);
    struct sigaction old {};
    ::sigaction(SIGHUP, &ignore, &old);

    sio::child_process inherits = sio::spawn(ctx.get_executor(), {"/bin/sleep", "30"});
    sio::spawn_options options;
    options.default_signals = {SIGHUP};
    sio::child_process reset = sio::spawn(ctx.get_executor(), {"/bin/sleep", "30"}, options);
    ::sigaction(SIGHUP, &old, nullptr);

    BOOST_TEST((status_mask(inherits.pid(), "SigIgn") & bit(SIGHUP)) != 0);
    BOOST_TEST((status_mask(reset.pid(), "SigIgn") & bit(SIGHUP)) == 0);
    BOOST_TEST(status_mask(reset.pid(), "SigBlk") == 0u);  // empty list: nothing blocked
    inherits.kill();
    reset.kill();
    BOOST_TEST((co_await inherits.async_wait(asio::use_awaitable)).signal() == SIGKILL);
    BOOST_TEST((co_await reset.async_wait(asio::use_awaitable)).signal() == SIGKILL);
}

// /proc/PID/fd of the child holds stdio and the mapped descriptors, nothing else: not the parent's
// CLOEXEC descriptors, not a descriptor the parent leaked without CLOEXEC; the mapped ones arrive
// without CLOEXEC, also when the number stays the same.
STEWARD_CORO_TEST(child_holds_only_stdio_and_the_mapped_descriptors) {
    auto [read_end, write_end] = make_pipe();
    unique_fd memfd{::memfd_create("steward-spawn-test", MFD_CLOEXEC)};
    BOOST_REQUIRE(memfd);
    unique_fd leaked{::open("/dev/null", O_RDONLY)};  // no CLOEXEC: a careless library's descriptor
    BOOST_REQUIRE(leaked);
    auto [same_read, same_write] = make_pipe();  // mapped to its own number

    sio::spawn_options options;
    options.fds = {{read_end.get(), 3}, {memfd.get(), 7}, {same_write.get(), same_write.get()}};
    const std::vector<std::string> sleeper = argv({"/bin/sleep", "30"});
    sio::child_process child =
        co_await sio::async_spawn(ctx.get_executor(), sleeper, options, asio::deferred);
    const pid_t pid = child.pid();

    std::set<int> expected{3, 7, same_write.get()};
    for (int fd = 0; fd <= 2; ++fd)
        if (::fcntl(fd, F_GETFD) >= 0) expected.insert(fd);
    // The spawn completes when exec has passed the point of no return (its error pipe closed);
    // the kernel may still be closing the child's other CLOEXEC descriptors at that moment.
    std::set<int> seen = child_fds(pid);
    for (int i = 0; i < 200 && seen != expected; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        seen = child_fds(pid);
    }
    std::string listed;
    for (int fd : seen) listed += " " + std::to_string(fd);
    BOOST_TEST((seen == expected), "descriptors of the child:" << listed);
    BOOST_TEST(child_fd_link(pid, 3) == own_fd_link(read_end.get()));
    BOOST_TEST(child_fd_link(pid, 7) == own_fd_link(memfd.get()));
    BOOST_TEST(child_fd_link(pid, same_write.get()) == own_fd_link(same_write.get()));
    for (int fd : {3, 7, same_write.get()}) BOOST_TEST((child_fd_flags(pid, fd) & O_CLOEXEC) == 0);
    // The parent's descriptors are untouched.
    BOOST_TEST((::fcntl(same_write.get(), F_GETFD) & FD_CLOEXEC) != 0);
    BOOST_TEST((::fcntl(read_end.get(), F_GETFD) & FD_CLOEXEC) != 0);

    child.kill();
    auto [ec, status] = co_await child.async_wait(asio::as_tuple(asio::use_awaitable));
    BOOST_TEST(!ec);
    BOOST_TEST(status.signal() == SIGKILL);
}

STEWARD_CORO_TEST(overlapping_mappings_do_not_clobber_each_other) {
    auto [a_read, a_write] = make_pipe();
    auto [b_read, b_write] = make_pipe();
    // Swap two numbers, and chain a third onto one of them.
    sio::spawn_options options;
    options.fds = {{a_read.get(), b_read.get()}, {b_read.get(), a_read.get()}, {a_write.get(), 60}};
    sio::child_process child = sio::spawn(ctx.get_executor(), {"/bin/sleep", "30"}, options);
    BOOST_TEST(child_fd_link(child.pid(), b_read.get()) == own_fd_link(a_read.get()));
    BOOST_TEST(child_fd_link(child.pid(), a_read.get()) == own_fd_link(b_read.get()));
    BOOST_TEST(child_fd_link(child.pid(), 60) == own_fd_link(a_write.get()));
    child.kill();
    BOOST_TEST((co_await child.async_wait(asio::use_awaitable)).killed());
}

// The mapped descriptor is usable; environment additions and the working directory apply.
STEWARD_CORO_TEST(mapped_pipe_environment_and_working_directory_reach_the_child) {
    auto [read_end, write_end] = make_pipe();
    BOOST_REQUIRE(::setenv("STEWARD_SPAWN_INHERITED", "from-parent", 1) == 0);
    BOOST_REQUIRE(::setenv("STEWARD_SPAWN_OVERRIDE", "old", 1) == 0);
    sio::spawn_options options;
    options.fds = {{write_end.get(), 5}};
    options.environment = {"STEWARD_SPAWN_ADDED=hello world", "STEWARD_SPAWN_OVERRIDE=new"};
    options.working_directory = "/tmp";
    const std::vector<std::string> script =
        argv({"/bin/sh", "-c",
              "printf '%s|%s|%s|%s|' \"$STEWARD_SPAWN_ADDED\" \"$STEWARD_SPAWN_INHERITED\" "
              "\"$STEWARD_SPAWN_OVERRIDE\" "
              "\"$(pwd)\" >&5; env | grep -c '^STEWARD_SPAWN_OVERRIDE=' >&5"});
    sio::child_process child =
        co_await sio::async_spawn(ctx.get_executor(), script, options, asio::use_awaitable);
    ::unsetenv("STEWARD_SPAWN_INHERITED");
    ::unsetenv("STEWARD_SPAWN_OVERRIDE");
    const sio::exit_status status = co_await child.async_wait(asio::use_awaitable);
    BOOST_TEST(status.success());
    write_end.reset();
    BOOST_TEST(read_all(read_end.get()) == "hello world|from-parent|new|/tmp|1\n");
}

BOOST_AUTO_TEST_CASE(exit_code_and_death_by_signal_arrive_through_the_pidfd,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    asio::io_context ctx;
    std::error_code spawn_ec = asio::error::would_block;
    sio::child_process exits;
    // Plain callbacks for both operations.
    sio::async_spawn(ctx.get_executor(), {"/bin/sh", "-c", "exit 3"}, {},
                     [&](std::error_code ec, sio::child_process c) {
                         spawn_ec = ec;
                         exits = std::move(c);
                     });
    BOOST_TEST(!exits.valid());  // completion never runs inside the initiating call
    ctx.run();
    BOOST_REQUIRE(!spawn_ec);
    BOOST_REQUIRE(exits.valid());
    BOOST_TEST(exits.pidfd() >= 0);
    BOOST_TEST((::fcntl(exits.pidfd(), F_GETFD) & FD_CLOEXEC) != 0);

    sio::exit_status status;
    std::error_code wait_ec = asio::error::would_block;
    exits.async_wait([&](std::error_code ec, sio::exit_status s) {
        wait_ec = ec;
        status = s;
    });
    ctx.restart();
    ctx.run();
    BOOST_TEST(!wait_ec);
    BOOST_TEST(status.exited());
    BOOST_TEST(!status.killed());
    BOOST_TEST(status.code() == 3);
    BOOST_TEST(status.to_string() == "exited with status 3");
    BOOST_TEST((exits.status() == status));
    // Reaped: a second wait reports the same status; signals are refused.
    std::error_code ec;
    exits.kill(ec);
    BOOST_TEST((ec == std::errc::no_such_process));
    BOOST_TEST((exits.wait() == sio::exit_status::from_exit_code(3)));

    sio::child_process sleeper = sio::spawn(ctx.get_executor(), {"/bin/sleep", "30"});
    sleeper.terminate();
    const sio::exit_status term = sleeper.wait();
    BOOST_TEST(term.killed());
    BOOST_TEST(term.signal() == SIGTERM);
    BOOST_TEST(term.code() == -1);
    BOOST_TEST(term.to_string().find("killed by signal 15") == 0);
}

BOOST_AUTO_TEST_CASE(cancelled_wait_is_operation_aborted_and_the_child_stays_waitable,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    asio::io_context ctx;
    sio::child_process child = sio::spawn(ctx.get_executor(), {"/bin/sleep", "30"});
    asio::cancellation_signal cancel;
    std::error_code result;
    bool done = false;
    child.async_wait(asio::bind_cancellation_slot(cancel.slot(), [&](std::error_code ec, sio::exit_status) {
        result = ec;
        done = true;
    }));
    ctx.poll();
    BOOST_REQUIRE(!done);
    cancel.emit(asio::cancellation_type::terminal);
    ctx.run_for(std::chrono::seconds(30));
    BOOST_REQUIRE(done);
    BOOST_TEST((result == asio::error::operation_aborted));
    BOOST_TEST(is_alive(child.pid()));
    BOOST_TEST(!child.try_wait().has_value());

    child.kill();
    sio::exit_status status;
    child.async_wait([&](std::error_code ec, sio::exit_status s) {
        result = ec;
        status = s;
    });
    ctx.restart();
    ctx.run_for(std::chrono::seconds(30));
    BOOST_TEST(!result);
    BOOST_TEST(status.signal() == SIGKILL);
}

// Two waits on one child both get its status; moving the handle while they are pending is fine.
BOOST_AUTO_TEST_CASE(concurrent_waits_and_a_move_while_waiting,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    asio::io_context ctx;
    sio::child_process original = sio::spawn(ctx.get_executor(), argv({"/bin/sh", "-c", "exit 7"}));
    std::vector<sio::exit_status> results;
    std::vector<std::error_code> errors;
    auto record = [&](std::error_code ec, sio::exit_status s) {
        errors.push_back(ec);
        results.push_back(s);
    };
    original.async_wait(record);
    original.async_wait(record);
    sio::child_process moved = std::move(original);
    BOOST_TEST(!original.valid());  // NOLINT(bugprone-use-after-move): checking the moved-from state
    ctx.run_for(std::chrono::seconds(30));
    BOOST_REQUIRE(results.size() == 2u);
    for (std::size_t i = 0; i < 2; ++i) {
        BOOST_TEST(!errors[i]);
        BOOST_TEST((results[i] == sio::exit_status::from_exit_code(7)));
    }
    BOOST_TEST((moved.status() == sio::exit_status::from_exit_code(7)));
}

STEWARD_CORO_TEST(missing_or_non_executable_program_is_executable_not_found) {
    const auto ex = ctx.get_executor();
    const std::vector<std::string> paths =
        argv({"/nonexistent/steward-no-such-program", "/etc/hostname", "/tmp"});
    for (const std::string& path : paths) {
        auto [ec, child] = co_await sio::async_spawn(
            ex, std::vector<std::string>(1, path), sio::spawn_options(), asio::as_tuple(asio::use_awaitable));
        BOOST_TEST((ec == steward::errc::executable_not_found), path << ": " << ec.message());
        BOOST_TEST(!child.valid());
    }
    // The throwing form names the path.
    try {
        (void)sio::spawn(ex, std::vector<std::string>(1, paths[0]));
        BOOST_ERROR("spawn of a missing program did not throw");
    } catch (const std::system_error& e) {
        BOOST_TEST((e.code() == steward::errc::executable_not_found));
        BOOST_TEST(std::string(e.what()).find("/nonexistent/steward-no-such-program") != std::string::npos);
    }
    // A bad working directory is not reported as a missing program.
    sio::spawn_options options;
    options.working_directory = "/nonexistent/steward-no-such-dir";
    const std::vector<std::string> true_argv = argv({"/bin/true"});
    auto [ec, child] = co_await sio::async_spawn(ex, true_argv, options, asio::as_tuple(asio::use_awaitable));
    BOOST_TEST((ec == std::errc::no_such_file_or_directory), ec.message());
    BOOST_TEST(!child.valid());
}

STEWARD_CORO_TEST(bad_options_are_refused_before_anything_is_spawned) {
    const auto ex = ctx.get_executor();
    auto attempt = [&](std::vector<std::string> argv, sio::spawn_options options) {
        return sio::async_spawn(ex, std::move(argv), std::move(options), asio::as_tuple(asio::use_awaitable));
    };
    const std::vector<std::string> true_argv = argv({"/bin/true"});
    int closed_fd;
    {
        unique_fd fd{::open("/dev/null", O_RDONLY | O_CLOEXEC)};
        closed_fd = fd.get();
    }
    auto [e1, c1] = co_await attempt(std::vector<std::string>(), sio::spawn_options());
    BOOST_TEST((e1 == std::errc::invalid_argument));
    sio::spawn_options dup_target;
    dup_target.fds = {{0, 3}, {1, 3}};
    auto [e2, c2] = co_await attempt(true_argv, dup_target);
    BOOST_TEST((e2 == std::errc::invalid_argument));
    sio::spawn_options bad_source;
    bad_source.fds = {{closed_fd, 3}};
    auto [e3, c3] = co_await attempt(true_argv, bad_source);
    BOOST_TEST((e3 == std::errc::bad_file_descriptor));
    sio::spawn_options bad_signal;
    bad_signal.blocked_signals = {0};
    auto [e4, c4] = co_await attempt(true_argv, bad_signal);
    BOOST_TEST((e4 == std::errc::invalid_argument));
    sio::spawn_options bad_env;
    bad_env.environment = {"NO_EQUALS_SIGN"};
    auto [e5, c5] = co_await attempt(true_argv, bad_env);
    BOOST_TEST((e5 == std::errc::invalid_argument));
    sio::spawn_options negative;
    negative.fds = {{0, -1}};
    auto [e6, c6] = co_await attempt(true_argv, negative);
    BOOST_TEST((e6 == std::errc::invalid_argument));
    BOOST_TEST((!c1.valid() && !c2.valid() && !c3.valid() && !c4.valid() && !c5.valid() && !c6.valid()));

    sio::child_process empty;
    auto [ec, status] = co_await empty.async_wait(asio::as_tuple(asio::use_awaitable));
    BOOST_TEST((ec == std::errc::no_child_process));
    BOOST_TEST(!status.exited());
    BOOST_TEST(!status.killed());
}

BOOST_AUTO_TEST_CASE(destructor_reaps_an_exited_child_and_leaves_a_running_one,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    asio::io_context ctx;
    pid_t done_pid;
    {
        sio::child_process done = sio::spawn(ctx.get_executor(), {"/bin/true"});
        done_pid = done.pid();
        pollfd pfd{done.pidfd(), POLLIN, 0};
        BOOST_REQUIRE(::poll(&pfd, 1, 30000) == 1);  // exited, not reaped
        BOOST_TEST(::waitid(P_PID, static_cast<id_t>(done_pid), nullptr, WEXITED | WNOHANG | WNOWAIT) == 0);
    }
    errno = 0;
    BOOST_TEST(::waitpid(done_pid, nullptr, WNOHANG) == -1);
    BOOST_TEST(errno == ECHILD);

    pid_t running_pid;
    std::error_code pending_result;
    {
        sio::child_process running = sio::spawn(ctx.get_executor(), {"/bin/sleep", "30"});
        running_pid = running.pid();
        running.async_wait([&](std::error_code ec, sio::exit_status) { pending_result = ec; });
        ctx.poll();
    }
    ctx.run_for(std::chrono::seconds(30));
    BOOST_TEST((pending_result == asio::error::operation_aborted));
    BOOST_TEST(is_alive(running_pid));
    BOOST_TEST(::kill(running_pid, SIGKILL) == 0);
    int status = 0;
    BOOST_TEST(::waitpid(running_pid, &status, 0) == running_pid);
    BOOST_TEST(WIFSIGNALED(status));
}

namespace {

// Makes pidfd_open fail with ENOSYS (as on Linux < 5.3) for the calling process and its children.
bool install_pidfd_open_enosys_filter() { return steward::test::install_errno_filter(SYS_pidfd_open, ENOSYS) == 0; }

using steward::test::seccomp_available;

}  // namespace

// Without pidfd_open the spawn fails clearly, and the child it had started is killed and reaped.
// Run in a forked child: a seccomp filter cannot be removed.
BOOST_AUTO_TEST_CASE(kernel_without_pidfd_open_fails_clearly_and_leaves_no_child,
                     *boost::unit_test::precondition(seccomp_available)) {
    const pid_t pid = ::fork();
    BOOST_REQUIRE(pid >= 0);
    if (pid == 0) {
        if (!install_pidfd_open_enosys_filter()) ::_exit(10);
        const int fds_before = steward::test::open_fd_count();
        int result = 0;
        {
            asio::io_context child_ctx;
            std::error_code ec;
            sio::child_process child =
                sio::spawn(child_ctx.get_executor(), argv({"/bin/sleep", "30"}), {}, ec);
            if (ec != std::errc::function_not_supported) result |= 1;
            if (child.valid()) result |= 2;
        }
        siginfo_t info{};
        if (!(::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) == -1 && errno == ECHILD)) result |= 4;
        if (steward::test::open_fd_count() != fds_before) result |= 8;
        ::_exit(result);
    }
    int status = 0;
    BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
    BOOST_REQUIRE(WIFEXITED(status));
    BOOST_TEST(WEXITSTATUS(status) == 0,
               "failure bits " << WEXITSTATUS(status)
                               << " (1 wrong error, 2 handle returned, 4 child left, 8 fd leaked)");
}

BOOST_AUTO_TEST_SUITE_END()
