#define BOOST_TEST_MODULE io_executor_backend
#include "support/test_support.hpp"

#include <steward/unique_fd.hpp>

#include <asio/buffer.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

extern char** environ;

#if defined(__GNUC__) && !defined(__clang__)
// g++ 12 pairs the coroutine frame's sized operator delete in Asio's awaitable_frame_base with
// the global operator new once it inlines across the frame allocation, and warns falsely.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

// Proves which kernel interface asio::io_context really uses: the test binary re-runs itself under
// `strace -f -c` with only the hidden workload test case selected, and the parent reads strace's
// per-system-call counts. The workload is a disabled test case, so a normal run never executes it
// outside strace.

namespace {

constexpr const char* workload_case = "workload_only";
constexpr const char* done_env = "STEWARD_BACKEND_WORKLOAD_DONE";

/// Socket, timer and pipe operations through the executor, each of which has to wait at least once.
asio::awaitable<void> workload(asio::io_context& ctx) {
    using namespace std::chrono_literals;
    asio::steady_timer timer(ctx, 2ms);
    co_await timer.async_wait(asio::use_awaitable);

    // TCP over loopback: accept and connect complete through the executor, the read has to wait
    // for data the peer writes after a timer.
    asio::ip::tcp::acceptor acceptor(ctx, {asio::ip::address_v4::loopback(), 0});
    asio::ip::tcp::socket client(ctx);
    asio::ip::tcp::socket server(ctx);
    auto accepting = acceptor.async_accept(server, asio::use_awaitable);
    co_await client.async_connect(acceptor.local_endpoint(), asio::use_awaitable);
    co_await std::move(accepting);
    std::array<char, 5> tcp_in{};
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            asio::steady_timer later(ctx, 1ms);
            co_await later.async_wait(asio::use_awaitable);
            co_await asio::async_write(client, asio::buffer("hello", 5), asio::use_awaitable);
        },
        asio::detached);
    co_await asio::async_read(server, asio::buffer(tcp_in), asio::use_awaitable);
    BOOST_TEST(std::string(tcp_in.data(), tcp_in.size()) == "hello");

    // AF_UNIX stream pair: readiness wait (POLL_ADD on io_uring) then the transfer.
    asio::local::stream_protocol::socket a(ctx), b(ctx);
    asio::local::connect_pair(a, b);
    co_await asio::async_write(a, asio::buffer("unix", 4), asio::use_awaitable);
    co_await b.async_wait(asio::socket_base::wait_read, asio::use_awaitable);
    std::array<char, 4> unix_in{};
    co_await asio::async_read(b, asio::buffer(unix_in), asio::use_awaitable);
    BOOST_TEST(std::string(unix_in.data(), unix_in.size()) == "unix");

    // Pipe through posix::stream_descriptor: the read is started before anything is written.
    int p[2];
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    steward::unique_fd pr{p[0]}, pw{p[1]};
    asio::posix::stream_descriptor reader(ctx, pr.release()), writer(ctx, pw.release());
    std::array<char, 4> pipe_in{};
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            asio::steady_timer later(ctx, 1ms);
            co_await later.async_wait(asio::use_awaitable);
            co_await asio::async_write(writer, asio::buffer("pipe", 4), asio::use_awaitable);
        },
        asio::detached);
    co_await asio::async_read(reader, asio::buffer(pipe_in), asio::use_awaitable);
    BOOST_TEST(std::string(pipe_in.data(), pipe_in.size()) == "pipe");
}

/// Runs argv (argv[0] looked up in PATH) with stdout/stderr sent to @p output_file and this
/// process's environment, where the `NAME=value` entries of @p extra_env replace any of the same
/// name; returns the wait status, or -1 when it could not be started.
int run(const std::vector<std::string>& args, const std::vector<std::string>& extra_env,
        const std::string& output_file) {
    std::vector<char*> argv;
    argv.reserve(args.size() + 1);
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<std::string> env_storage(extra_env);
    for (char** e = environ; *e; ++e) {
        const std::string entry(*e);
        const auto same_name = [&](const std::string& x) {
            return entry.compare(0, x.find('=') + 1, x, 0, x.find('=') + 1) == 0;
        };
        if (std::none_of(extra_env.begin(), extra_env.end(), same_name)) env_storage.push_back(entry);
    }
    std::vector<char*> envp;
    envp.reserve(env_storage.size() + 1);
    for (auto& e : env_storage) envp.push_back(e.data());
    envp.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, output_file.c_str(),
                                       O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ::posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    pid_t pid = -1;
    const int rc = ::posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
    ::posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) return -1;
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return -1;
    return status;
}

std::string read_file(const std::string& path) {
    std::ifstream in(path);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

/// A scratch directory removed with its contents at scope exit.
struct scratch_dir {
    std::string path;
    scratch_dir() {
        std::string tmpl = "/tmp/steward-backend-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
        path = tmpl;
    }
    ~scratch_dir() {
        for (const char* f : {"/strace.txt", "/output.txt", "/done.txt"}) ::unlink((path + f).c_str());
        ::rmdir(path.c_str());
    }
};

/// Precondition: strace exists and may trace (ptrace can be forbidden in containers).
boost::test_tools::assertion_result strace_usable(boost::unit_test::test_unit_id) {
    scratch_dir dir;
    const int status = run({"strace", "-f", "-o", "/dev/null", "--", "true"}, {}, dir.path + "/output.txt");
    boost::test_tools::assertion_result ok = status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok)
        ok.message() << "strace missing or not allowed to trace here, test skipped: "
                     << read_file(dir.path + "/output.txt");
    return ok;
}

/// Parses `strace -c` output: system call name -> number of calls. Lines look like
/// `% time  seconds  usecs/call  calls  [errors]  syscall`; the errors column may be blank.
std::map<std::string, long> parse_strace_summary(const std::string& text) {
    std::map<std::string, long> calls;
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
        std::istringstream words(line);
        std::vector<std::string> w;
        for (std::string word; words >> word;) w.push_back(word);
        if (w.size() < 5 || w.back() == "total" || w.back() == "syscall") continue;
        try {
            std::size_t used = 0;
            const long n = std::stol(w[3], &used);
            if (used == w[3].size()) calls[w.back()] += n;
        } catch (const std::exception&) {
            // a header, a separator or a "strace: ..." note
        }
    }
    return calls;
}

long count(const std::map<std::string, long>& calls, const std::string& name) {
    const auto it = calls.find(name);
    return it == calls.end() ? 0 : it->second;
}

std::string self_path() {
    std::array<char, 4096> buf{};
    const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
    BOOST_REQUIRE(n > 0);
    return {buf.data(), static_cast<std::size_t>(n)};
}

}  // namespace

// Only ever run explicitly (by the case below, under strace): `disabled` keeps it out of normal runs.
BOOST_AUTO_TEST_CASE(workload_only, *boost::unit_test::disabled()) {
    steward::test::run_coroutine([](asio::io_context& ctx) { return workload(ctx); });
    if (const char* done = std::getenv(done_env)) std::ofstream(done) << "done\n";
}

BOOST_AUTO_TEST_CASE(io_context_uses_the_configured_kernel_interface,
                     *boost::unit_test::precondition(steward::test::io_uring_available) *
                         boost::unit_test::precondition(strace_usable)) {
    scratch_dir dir;
    const std::string trace = dir.path + "/strace.txt";
    const std::string done = dir.path + "/done.txt";
    // LeakSanitizer stops the world with ptrace, which fails under strace; keep any other options.
    const char* asan = std::getenv("ASAN_OPTIONS");
    const std::string asan_options =
        std::string("ASAN_OPTIONS=") + (asan ? std::string(asan) + ":" : "") + "detect_leaks=0";
    const int status = run({"strace", "-f", "-c", "-o", trace, "--", self_path(),
                            std::string("--run_test=") + workload_case, "--log_level=error"},
                           {std::string(done_env) + "=" + done, asan_options}, dir.path + "/output.txt");
    const std::string output = read_file(dir.path + "/output.txt");
    BOOST_REQUIRE_MESSAGE(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                          "workload under strace failed (status " << status << "):\n"
                                                                  << output);
    BOOST_REQUIRE_MESSAGE(read_file(done) == "done\n", "the workload did not run to its end:\n" << output);

    const std::string summary = read_file(trace);
    const auto calls = parse_strace_summary(summary);
    BOOST_TEST_MESSAGE("strace -c summary:\n" << summary);
    // The parse must have found the workload's ordinary calls; otherwise zero epoll would prove nothing.
    BOOST_REQUIRE_MESSAGE(count(calls, "execve") >= 1 && count(calls, "close") >= 1,
                          "could not parse strace's summary:\n"
                              << summary);

    const long uring_enter = count(calls, "io_uring_enter");
    const long uring_setup = count(calls, "io_uring_setup");
    const long epoll_waits =
        count(calls, "epoll_wait") + count(calls, "epoll_pwait") + count(calls, "epoll_pwait2");
    const long epoll_creates = count(calls, "epoll_create") + count(calls, "epoll_create1");
    const long epoll_ctls = count(calls, "epoll_ctl");
#if STEWARD_IO_URING_BACKEND
    BOOST_TEST(uring_setup >= 1, summary);
    BOOST_TEST(uring_enter > 0, summary);
    BOOST_TEST(epoll_waits == 0, summary);
    BOOST_TEST(epoll_creates == 0, summary);
    BOOST_TEST(epoll_ctls == 0, summary);
#else
    BOOST_TEST(epoll_creates >= 1, summary);
    BOOST_TEST(epoll_ctls > 0, summary);
    BOOST_TEST(epoll_waits > 0, summary);
    BOOST_TEST(uring_setup == 0, summary);
    BOOST_TEST(uring_enter == 0, summary);
#endif
}

// The same workload outside strace, so its own assertions run in every ordinary test run too.
STEWARD_CORO_TEST(workload_completes_without_strace) {
    co_await workload(ctx);
}
