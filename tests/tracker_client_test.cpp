#define BOOST_TEST_MODULE tracker_client_test
#include "support/fd_test_support.hpp"
#include "support/seccomp_filter.hpp"
#include "support/test_support.hpp"
#include "support/tracker_client_support.hpp"

#include <steward/error.hpp>
#include <steward/io/async_spawn.hpp>
#include <steward/tracker.hpp>

#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/deferred.hpp>
#include <asio/detached.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <poll.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <csignal>

#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <regex>
#include <set>
#include <thread>
#include <tuple>

// The client of steward-tracker: group commit (order and integrity of lines), errors, the daemon's
// start (one spawn, its fds and signals), relaunch after kill -9, stop with a child holding the pipe.

using steward::resource_type;
using steward::tracker;
using steward::tracker_options;
namespace fs = std::filesystem;
namespace st = steward::test;
using namespace std::chrono_literals;

namespace {

// Counts descriptors before and after a test. The io_context's ring is created with its first I/O
// object, so one is made (and dropped) before counting.
struct fd_count_guard {
    int before;
    explicit fd_count_guard(asio::io_context& ctx) {
        { asio::posix::stream_descriptor warm(ctx); }
        before = st::open_fd_count();
    }
    ~fd_count_guard() {
        const int after = st::open_fd_count();
        BOOST_CHECK_EQUAL(after, before);
        if (after != before)
            for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
                std::error_code ec;
                BOOST_TEST_MESSAGE(e.path().filename().string()
                                   << " -> " << fs::read_symlink(e.path(), ec).string());
            }
    }
};

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::size_t start = 0;
    while (start < text.size()) {
        const auto nl = text.find('\n', start);
        if (nl == std::string::npos) {
            out.push_back(text.substr(start) + "<no newline>");
            break;
        }
        out.push_back(text.substr(start, nl - start));
        start = nl + 1;
    }
    return out;
}

// Creates a shm segment the test registers by hand (the daemon removes it, or the test does).
std::string make_shm(std::string_view stem) {
    const std::string name = "/" + st::unique_stem(stem);
    const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    BOOST_REQUIRE_MESSAGE(fd >= 0, "shm_open " << name << ": " << std::strerror(errno));
    ::close(fd);
    return name;
}

}  // namespace

STEWARD_CORO_TEST(thousand_coroutines_every_line_intact_complete_and_in_order) {
    fd_count_guard fds(ctx);
    st::temp_dir dir("rec");
    const auto record = dir.path / "record.txt";
    tracker t(ctx.get_executor(), tracker_options{st::make_recorder(dir.path, record)});

    constexpr int coroutines = 1000;
    constexpr int per = 6;
    int finished = 0;
    std::error_code first_error;
    // Names of varying length (some need JSON: a ':' or a non-ASCII byte) so batch edges fall
    // everywhere.
    auto name_of = [&](int c, int k) {
        std::string n =
            "/tmp/stw_cl_" + std::to_string(::getpid()) + "_" + std::to_string(c) + "_" + std::to_string(k);
        n.append(static_cast<std::size_t>((c * 7 + k * 13) % 90), 'x');
        if (c % 10 == 3) n += ":colon";
        if (c % 10 == 7) n += "\xc3\xa9";
        return n;
    };
    for (int c = 0; c < coroutines; ++c) {
        asio::co_spawn(
            ctx,
            [&, c]() -> asio::awaitable<void> {
                for (int k = 0; k < per; ++k) {
                    auto [ec] = co_await t.async_register(name_of(c, k), resource_type::file,
                                                          asio::as_tuple(asio::use_awaitable));
                    if (ec && !first_error) first_error = ec;
                }
                auto [ec] = co_await t.async_unregister(name_of(c, 0), resource_type::file,
                                                        asio::as_tuple(asio::use_awaitable));
                if (ec && !first_error) first_error = ec;
                ++finished;
            },
            asio::detached);
    }
    while (finished < coroutines) {
        asio::steady_timer timer(ctx, 5ms);
        co_await timer.async_wait(asio::use_awaitable);
    }
    BOOST_REQUIRE_MESSAGE(!first_error, first_error.message());
    auto [ec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    BOOST_REQUIRE(!ec);
    BOOST_REQUIRE(status.has_value());
    BOOST_CHECK_EQUAL(*status, 0);  // cat saw EOF

    // Every message exactly once, whole, in the format the name calls for; each coroutine's in its
    // order.
    const auto lines = lines_of(st::read_file(record));
    BOOST_REQUIRE_EQUAL(lines.size(), static_cast<std::size_t>(coroutines * (per + 1)));
    std::map<std::string, std::size_t> position;
    const std::regex colon(R"re(^(REGISTER|UNREGISTER):(/tmp/stw_cl_[0-9_]+x*):file$)re");
    const std::regex json(
        R"re(^\{"cmd":"(REGISTER|UNREGISTER)","rtype":"file","base64_name":"[A-Za-z0-9_=-]+"\}$)re");
    for (std::size_t i = 0; i < lines.size(); ++i) {
        const bool ok = std::regex_match(lines[i], colon) || std::regex_match(lines[i], json);
        BOOST_REQUIRE_MESSAGE(ok, "torn or unexpected line " << i << ": " << lines[i]);
        BOOST_REQUIRE_MESSAGE(position.emplace(lines[i], i).second, "duplicate line " << lines[i]);
    }
    int checked = 0;
    for (int c = 0; c < coroutines; ++c) {
        std::size_t prev = 0;
        for (int k = 0; k <= per; ++k) {
            const std::string name = name_of(c, k == per ? 0 : k);
            const bool reg = k != per;
            std::optional<std::size_t> at;
            // Colon lines are found by text; JSON lines by prefix and the decoded name is not
            // needed: every JSON line is unique, so order is checked through the colon ones.
            const std::string l = std::string(reg ? "REGISTER:" : "UNREGISTER:") + name + ":file";
            if (auto it = position.find(l); it != position.end()) at = it->second;
            if (c % 10 == 3 || c % 10 == 7) {
                BOOST_CHECK(!at);  // these must travel as JSON
                continue;
            }
            BOOST_REQUIRE_MESSAGE(at, "missing " << l);
            if (k > 0) BOOST_REQUIRE_MESSAGE(*at > prev, "out of order for coroutine " << c);
            prev = *at;
            ++checked;
        }
    }
    BOOST_CHECK_EQUAL(checked, 800 * (per + 1));
}

STEWARD_CORO_TEST(real_daemon_removes_registered_keeps_unregistered_blocking_calls) {
    fd_count_guard fds(ctx);
    st::temp_dir dir("blk");
    st::stderr_capture err(dir.path / "daemon.err");
    tracker t(ctx.get_executor());
    const std::string a = make_shm("blk_a"), b = make_shm("blk_b"), c = make_shm("blk_c");
    t.register_resource(a, resource_type::shared_memory);
    t.register_resource(b.substr(1), resource_type::shared_memory);  // "abc" == "/abc"
    co_await t.async_register(c, resource_type::shared_memory, asio::use_awaitable);
    std::error_code ec;
    t.unregister_resource(b, resource_type::shared_memory, ec);
    BOOST_CHECK(!ec);
    BOOST_CHECK_GT(t.daemon_pid(), 0);
    BOOST_CHECK_GE(t.fd(), 0);
    auto [sec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    err.restore();
    BOOST_CHECK(!sec);
    BOOST_REQUIRE(status.has_value());
    BOOST_CHECK_EQUAL(*status, 1);  // leaks found and all cleaned
    BOOST_CHECK(!st::shm_exists(a));
    BOOST_CHECK(st::shm_exists(b));
    BOOST_CHECK(!st::shm_exists(c));
    ::shm_unlink(b.c_str());
    const auto text = err.text();
    BOOST_CHECK_MESSAGE(text.find("There appear to be 2 leaked shared_memory objects") != std::string::npos,
                        text);
    BOOST_CHECK_EQUAL(t.fd(), -1);
}

STEWARD_CORO_TEST(message_too_long_and_invalid_names_write_nothing) {
    fd_count_guard fds(ctx);
    st::temp_dir dir("long");
    const auto record = dir.path / "record.txt";
    tracker t(ctx.get_executor(), tracker_options{st::make_recorder(dir.path, record)});
    const std::string fits =
        "/" + std::string(512 - std::string("REGISTER::shared_memory\n").size() - 1, 'a');
    const std::string too_long = fits + "a";
    auto [e1] = co_await t.async_register(too_long, resource_type::shared_memory,
                                          asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(e1 == steward::errc::message_too_long);
    auto [e2] = co_await t.async_register(std::string(5000, 'b'), resource_type::file,
                                          asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(e2 == steward::errc::message_too_long);
    std::error_code e3;
    t.register_resource(too_long, resource_type::shared_memory, e3);
    BOOST_CHECK(e3 == steward::errc::message_too_long);
    BOOST_CHECK_THROW(t.unregister_resource(too_long, resource_type::shared_memory), std::system_error);
    // JSON grows the name by a third: a name that fits as colon does not fit with a ':' in it.
    auto [e4] = co_await t.async_register("/" + std::string(400, 'c') + ":", resource_type::shared_memory,
                                          asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(e4 == steward::errc::message_too_long);
    auto [e5] =
        co_await t.async_register("", resource_type::shared_memory, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(e5 == std::errc::invalid_argument);
    auto [e6] =
        co_await t.async_register("relative/file", resource_type::file, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(e6 == std::errc::invalid_argument);
    auto [e7] = co_await t.async_register("/x", resource_type::noop, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(e7 == std::errc::invalid_argument);
    BOOST_CHECK_EQUAL(t.daemon_pid(), -1);  // nothing was accepted, so nothing was started
    co_await t.async_register(fits, resource_type::shared_memory, asio::use_awaitable);  // exactly 512 bytes
    auto [ec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(!ec);
    const auto text = st::read_file(record);
    BOOST_CHECK_EQUAL(text.size(), 512u);
    BOOST_CHECK_EQUAL(text, "REGISTER:" + fits + ":shared_memory\n");
}

STEWARD_CORO_TEST(executable_not_found_names_the_paths_tried) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor(), tracker_options{"/nonexistent/stw/steward-tracker"});
    auto [ec] = co_await t.async_ensure_running(asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(ec == steward::errc::executable_not_found);
    BOOST_CHECK_MESSAGE(t.last_error_detail().find("/nonexistent/stw/steward-tracker") != std::string::npos,
                        t.last_error_detail());
    auto [ec2] = co_await t.async_register("/stw_nf", resource_type::shared_memory,
                                           asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(ec2 == steward::errc::executable_not_found);
    BOOST_CHECK(!t.is_registered("stw_nf", resource_type::shared_memory));  // a failed registration is forgotten
    try {
        t.register_resource("/stw_nf", resource_type::shared_memory);
        BOOST_ERROR("no exception");
    } catch (const std::system_error& e) {
        BOOST_CHECK(e.code() == steward::errc::executable_not_found);
        BOOST_CHECK_MESSAGE(
            std::string(e.what()).find("/nonexistent/stw/steward-tracker") != std::string::npos, e.what());
    }
    // A directory is not a program either.
    tracker d(ctx.get_executor(), tracker_options{"/tmp"});
    std::error_code dec;
    d.ensure_running(dec);
    BOOST_CHECK(dec == steward::errc::executable_not_found);
    BOOST_CHECK_EQUAL(t.fd(), -1);
    // The environment variable is tried before the compiled-in paths and named when it fails.
    ::setenv("STEWARD_TRACKER_EXE", "/nonexistent/stw/env-tracker", 1);
    tracker e(ctx.get_executor());
    std::error_code eec;
    e.ensure_running(eec);  // falls through to the build tree, which exists
    BOOST_CHECK(!eec);
    ::setenv("STEWARD_TRACKER_EXE", STEWARD_TRACKER_EXE_FOR_TESTS, 1);
    co_await e.async_stop(10s, asio::use_awaitable);
}

BOOST_AUTO_TEST_CASE(concurrent_ensure_running_from_threads_and_coroutines_starts_one_daemon,
                     *boost::unit_test::precondition(st::io_uring_available)) {
    asio::io_context ctx;
    fd_count_guard fds(ctx);
    const auto before = st::child_pids().size();
    st::temp_dir dir("thr");
    auto guard = asio::make_work_guard(ctx);
    tracker t(ctx.get_executor());
    std::vector<std::thread> runners;
    for (int i = 0; i < 3; ++i) runners.emplace_back([&] { ctx.run(); });
    std::atomic<int> async_done{0};
    std::atomic<int> errors{0};
    for (int i = 0; i < 50; ++i)
        t.async_ensure_running([&](std::error_code ec) {
            if (ec) ++errors;
            ++async_done;
        });
    std::vector<std::thread> callers;
    for (int i = 0; i < 4; ++i)
        callers.emplace_back([&, i] {
            t.ensure_running();
            const auto file = dir.path / ("f" + std::to_string(i));
            std::ofstream(file) << i;
            t.register_resource(file.string(), resource_type::file);
        });
    for (auto& c : callers) c.join();
    while (async_done < 50) std::this_thread::sleep_for(1ms);
    BOOST_CHECK_EQUAL(errors.load(), 0);
    BOOST_CHECK_EQUAL(st::child_pids().size(), before + 1);
    const int pid = t.daemon_pid();
    BOOST_CHECK_GT(pid, 0);
    std::promise<std::pair<std::error_code, std::optional<int>>> stopped;
    t.async_stop(10s, [&](std::error_code ec, std::optional<int> s) { stopped.set_value({ec, s}); });
    auto [ec, status] = stopped.get_future().get();
    BOOST_CHECK(!ec);
    BOOST_REQUIRE(status.has_value());
    BOOST_CHECK_EQUAL(*status, 1);  // the four files, cleaned
    for (int i = 0; i < 4; ++i) BOOST_CHECK(!fs::exists(dir.path / ("f" + std::to_string(i))));
    guard.reset();
    ctx.stop();
    for (auto& r : runners) r.join();
}

STEWARD_CORO_TEST(daemon_has_only_stdio_pipe_and_ring_fds_and_ignores_int_term) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    co_await t.async_ensure_running(asio::use_awaitable);
    const int pid = t.daemon_pid();
    BOOST_REQUIRE_GT(pid, 0);
    // SIGINT (2) and SIGTERM (15) arrive blocked from the spawn; the daemon sets SIG_IGN, then
    // unblocks. Either is proof the spawn mask reached it; SigIgn is the stable end state.
    const unsigned long want = (1UL << (SIGINT - 1)) | (1UL << (SIGTERM - 1));
    unsigned long ign = 0;
    for (int i = 0; i < 2000; ++i) {
        const auto blk = std::stoul(st::proc_status_field(pid, "SigBlk"), nullptr, 16);
        ign = std::stoul(st::proc_status_field(pid, "SigIgn"), nullptr, 16);
        if ((ign & want) == want) break;
        BOOST_REQUIRE_MESSAGE((blk & want) == want, "SIGINT/SIGTERM neither blocked nor ignored");
        std::this_thread::sleep_for(1ms);
    }
    BOOST_CHECK_EQUAL(ign & want, want);
    // Our own mask is untouched.
    sigset_t mine;
    ::pthread_sigmask(SIG_SETMASK, nullptr, &mine);
    BOOST_CHECK(!::sigismember(&mine, SIGINT));
    BOOST_CHECK(!::sigismember(&mine, SIGTERM));

    struct stat ours {};
    ::fstat(t.fd(), &ours);
    // One snapshot of the daemon's fds, and every fd that is neither our pipe at 3 nor an anon
    // inode (io_uring, eventfd). A UBSan build's vptr check opens and closes a pipe pair for a
    // moment (its memory-accessibility probe), so an unexpected fd only counts when it is still
    // there in every snapshot for a second; a leaked fd never goes away.
    const auto snapshot = [&] {
        auto targets = st::process_fd_targets(pid);
        std::vector<std::string> unexpected;
        for (const auto& [n, target] : targets) {
            const bool ok = n < 3 || (n == 3 ? target == "pipe:[" + std::to_string(ours.st_ino) + "]"
                                             : target.rfind("anon_inode:", 0) == 0);
            if (!ok) unexpected.push_back(std::to_string(n) + " -> " + target);
        }
        return std::pair{std::move(targets), std::move(unexpected)};
    };
    auto [daemon_fds, unexpected] = snapshot();
    for (int i = 0; i < 50 && !unexpected.empty(); ++i) {
        std::this_thread::sleep_for(20ms);
        std::tie(daemon_fds, unexpected) = snapshot();
    }
    for (const auto& u : unexpected) BOOST_ERROR("unexpected daemon fd " << u);
    BOOST_CHECK(daemon_fds.count(3));
    co_await t.async_stop(10s, asio::use_awaitable);
}

STEWARD_CORO_TEST(daemon_killed_is_relaunched_with_every_registration_and_warns_once) {
    fd_count_guard fds(ctx);
    st::temp_dir dir("kill");
    st::stderr_capture err(dir.path / "daemon.err");
    tracker t(ctx.get_executor());
    std::vector<std::string> names;
    for (int i = 0; i < 3; ++i) {
        names.push_back(make_shm("kill"));
        co_await t.async_register(names.back(), resource_type::shared_memory, asio::use_awaitable);
    }
    const std::string gone = make_shm("kill_unreg");
    co_await t.async_register(gone, resource_type::shared_memory, asio::use_awaitable);
    co_await t.async_unregister(gone, resource_type::shared_memory, asio::use_awaitable);

    const int first = t.daemon_pid();
    BOOST_REQUIRE_GT(first, 0);
    ::kill(first, SIGKILL);
    BOOST_REQUIRE(st::wait_gone(first));
    // The registration that finds the daemon dead is delivered to the new one too.
    names.push_back(make_shm("kill_after"));
    co_await t.async_register(names.back(), resource_type::shared_memory, asio::use_awaitable);
    const int second = t.daemon_pid();
    BOOST_CHECK_GT(second, 0);
    BOOST_CHECK_NE(second, first);

    // A second death: relaunched again, but no second warning.
    ::kill(second, SIGKILL);
    BOOST_REQUIRE(st::wait_gone(second));
    names.push_back(make_shm("kill_third"));
    co_await t.async_register(names.back(), resource_type::shared_memory, asio::use_awaitable);
    const int third = t.daemon_pid();
    BOOST_CHECK_NE(third, second);

    auto [ec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    err.restore();
    BOOST_CHECK(!ec);
    BOOST_REQUIRE(status.has_value());
    BOOST_CHECK_EQUAL(*status, 1);
    for (const auto& n : names) {
        BOOST_CHECK_MESSAGE(!st::shm_exists(n), n << " leaked");
        ::shm_unlink(n.c_str());
    }
    BOOST_CHECK(st::shm_exists(gone));  // unregistered before the kill: not re-registered
    ::shm_unlink(gone.c_str());
    const auto text = err.text();
    std::size_t warnings = 0;
    for (std::size_t p = 0; (p = text.find("the tracker daemon is gone", p)) != std::string::npos; ++p)
        ++warnings;
    BOOST_CHECK_MESSAGE(warnings == 1, text);
    BOOST_CHECK_MESSAGE(text.find("There appear to be 5 leaked shared_memory objects") != std::string::npos,
                        text);
}

STEWARD_CORO_TEST(forked_child_registers_through_the_parent_daemon_and_never_owns_it) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string parent_name = make_shm("fork_p");
    const std::string child_name = make_shm("fork_c");
    co_await t.async_register(parent_name, resource_type::shared_memory, asio::use_awaitable);
    const int daemon = t.daemon_pid();
    const pid_t child = ::fork();
    if (child == 0) {
        int code = 0;
        try {
            if (t.daemon_pid() != -1) code = 10;  // the parent's daemon is not this process's
            std::error_code ec;
            t.register_resource(child_name, resource_type::shared_memory, ec);
            if (ec) code = 11;
            if (::kill(daemon, 0) != 0) code = 12;
        } catch (...) {
            code = 13;
        }
        ::_exit(code);
    }
    int wstatus = 0;
    ::waitpid(child, &wstatus, 0);
    BOOST_CHECK(WIFEXITED(wstatus));
    BOOST_CHECK_EQUAL(WEXITSTATUS(wstatus), 0);
    BOOST_CHECK_EQUAL(t.daemon_pid(), daemon);
    BOOST_CHECK_EQUAL(::kill(daemon, 0), 0);
    auto [ec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(!ec);
    BOOST_REQUIRE(status.has_value());
    BOOST_CHECK_EQUAL(*status, 1);
    BOOST_CHECK(!st::shm_exists(parent_name));
    BOOST_CHECK(!st::shm_exists(child_name));  // registered by the child, cleaned by the daemon
    ::shm_unlink(parent_name.c_str());
    ::shm_unlink(child_name.c_str());
}

STEWARD_CORO_TEST(async_stop_returns_in_time_while_a_child_holds_the_pipe) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string name = make_shm("stop");
    co_await t.async_register(name, resource_type::shared_memory, asio::use_awaitable);
    int go[2];
    BOOST_REQUIRE_EQUAL(::pipe2(go, O_CLOEXEC), 0);
    const pid_t child = ::fork();
    if (child == 0) {
        ::close(go[1]);
        char c;
        (void)::read(go[0], &c, 1);  // holds the write end until told to go
        ::_exit(0);
    }
    ::close(go[0]);
    const auto start = std::chrono::steady_clock::now();
    auto [ec, status] = co_await t.async_stop(200ms, asio::as_tuple(asio::use_awaitable));
    const auto took = std::chrono::steady_clock::now() - start;
    BOOST_CHECK(ec == steward::errc::timed_out);
    BOOST_CHECK(!status.has_value());
    BOOST_CHECK_LT(took, 30s);          // bounded, not a hang (the limit itself is no timing target)
    BOOST_CHECK(st::shm_exists(name));  // the child's write end keeps the daemon alive
    ::close(go[1]);
    int wstatus = 0;
    ::waitpid(child, &wstatus, 0);
    // A second stop waits for the same daemon, which now sees the end of input.
    auto [ec2, status2] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(!ec2);
    BOOST_REQUIRE(status2.has_value());
    BOOST_CHECK_EQUAL(*status2, 1);
    BOOST_CHECK(!st::shm_exists(name));
    ::shm_unlink(name.c_str());
    // A third stop has nothing to wait for.
    auto [ec3, status3] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(!ec3);
    BOOST_CHECK(!status3.has_value());
}

STEWARD_CORO_TEST(from_environment_refuses_bad_values) {
    fd_count_guard fds(ctx);
    std::error_code ec;
    ::unsetenv(tracker::environment_variable);
    (void)tracker::from_environment(ctx.get_executor(), ec);
    BOOST_CHECK(ec == std::errc::invalid_argument);
    ::setenv(tracker::environment_variable, "12abc", 1);
    (void)tracker::from_environment(ctx.get_executor(), ec);
    BOOST_CHECK(ec == std::errc::invalid_argument);
    ::setenv(tracker::environment_variable, "1000000", 1);
    (void)tracker::from_environment(ctx.get_executor(), ec);
    BOOST_CHECK(ec == std::errc::bad_file_descriptor);
    const int devnull = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    ::setenv(tracker::environment_variable, std::to_string(devnull).c_str(), 1);
    (void)tracker::from_environment(ctx.get_executor(), ec);
    BOOST_CHECK(ec == steward::errc::not_a_pipe);
    ::close(devnull);
    int p[2];
    BOOST_REQUIRE_EQUAL(::pipe2(p, O_CLOEXEC), 0);
    ::setenv(tracker::environment_variable, std::to_string(p[0]).c_str(), 1);  // a read end
    (void)tracker::from_environment(ctx.get_executor(), ec);
    BOOST_CHECK(ec);
    ::unsetenv(tracker::environment_variable);
    BOOST_CHECK_THROW((void)tracker::from_environment(ctx.get_executor()), std::system_error);
    // A good one is adopted, made CLOEXEC and removed from the environment.
    const int w = ::fcntl(p[1], F_DUPFD, 0);  // not CLOEXEC, as after an exec
    ::setenv(tracker::environment_variable, std::to_string(w).c_str(), 1);
    {
        tracker t = tracker::from_environment(ctx.get_executor(), ec);
        BOOST_CHECK(!ec);
        BOOST_CHECK_EQUAL(t.fd(), w);
        BOOST_CHECK_EQUAL(::fcntl(w, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
        BOOST_CHECK(std::getenv(tracker::environment_variable) == nullptr);
        BOOST_CHECK_EQUAL(t.daemon_pid(), -1);
        co_await t.async_register("/stw_env_x", resource_type::shared_memory, asio::use_awaitable);
        char buf[128];
        const auto n = ::read(p[0], buf, sizeof buf);
        BOOST_CHECK_EQUAL(std::string(buf, n > 0 ? static_cast<std::size_t>(n) : 0u),
                          "REGISTER:/stw_env_x:shared_memory\n");
        auto [sec, status] = co_await t.async_stop(1s, asio::as_tuple(asio::use_awaitable));
        BOOST_CHECK(!sec);
        BOOST_CHECK(!status.has_value());  // not ours to wait for
    }
    BOOST_CHECK_EQUAL(::fcntl(w, F_GETFD), -1);  // closed with the tracker
    ::close(p[0]);
    ::close(p[1]);
    BOOST_CHECK_EQUAL(tracker::environment_entry(3), "STEWARD_TRACKER_FD=3");
}

STEWARD_CORO_TEST(epipe_on_an_adopted_pipe_relaunches_a_daemon_and_re_registers) {
    fd_count_guard fds(ctx);
    st::temp_dir dir("epipe");
    st::stderr_capture err(dir.path / "daemon.err");
    int p[2];
    BOOST_REQUIRE_EQUAL(::pipe2(p, O_CLOEXEC), 0);
    steward::unique_fd read_end(p[0]);
    const int w = ::fcntl(p[1], F_DUPFD, 0);
    ::close(p[1]);
    ::setenv(tracker::environment_variable, std::to_string(w).c_str(), 1);
    tracker t = tracker::from_environment(ctx.get_executor());
    const std::string x = make_shm("epipe_x"), y = make_shm("epipe_y");
    co_await t.async_register(x, resource_type::shared_memory, asio::use_awaitable);
    read_end.reset();  // the "daemon" is gone: the next write fails with EPIPE
    auto [ec] =
        co_await t.async_register(y, resource_type::shared_memory, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(!ec);
    BOOST_CHECK_GT(t.daemon_pid(), 0);  // a daemon of its own now
    auto [sec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    err.restore();
    BOOST_CHECK(!sec);
    BOOST_REQUIRE(status.has_value());
    BOOST_CHECK_EQUAL(*status, 1);
    BOOST_CHECK(!st::shm_exists(x));
    BOOST_CHECK(!st::shm_exists(y));
    ::shm_unlink(x.c_str());
    ::shm_unlink(y.c_str());
    BOOST_CHECK_MESSAGE(err.text().find("its pipe has no reader") != std::string::npos, err.text());
}

BOOST_AUTO_TEST_CASE(threads_and_coroutines_together_every_line_once_and_in_order,
                     *boost::unit_test::precondition(st::io_uring_available)) {
    asio::io_context ctx;
    fd_count_guard fds(ctx);
    st::temp_dir dir("mt");
    const auto record = dir.path / "record.txt";
    auto guard = asio::make_work_guard(ctx);
    tracker t(ctx.get_executor(), tracker_options{st::make_recorder(dir.path, record)});
    constexpr int coroutines = 200, threads = 4, per = 50;
    std::atomic<int> finished{0};
    std::atomic<int> errors{0};
    auto name_of = [](const std::string& who, int k) {
        return "/tmp/stw_cl_mt_" + who + "_" + std::to_string(k);
    };
    for (int c = 0; c < coroutines; ++c)
        asio::co_spawn(
            ctx,
            [&, c]() -> asio::awaitable<void> {
                for (int k = 0; k < per; ++k) {
                    auto [ec] =
                        co_await t.async_register(name_of("c" + std::to_string(c), k), resource_type::file,
                                                  asio::as_tuple(asio::use_awaitable));
                    if (ec) ++errors;
                }
                ++finished;
            },
            asio::detached);
    std::vector<std::thread> runners;
    for (int i = 0; i < 3; ++i) runners.emplace_back([&] { ctx.run(); });
    std::vector<std::thread> callers;
    for (int i = 0; i < threads; ++i)
        callers.emplace_back([&, i] {
            for (int k = 0; k < per; ++k) {
                std::error_code ec;
                t.register_resource(name_of("t" + std::to_string(i), k), resource_type::file, ec);
                if (ec) ++errors;
            }
        });
    for (auto& c : callers) c.join();
    // A lost flush would leave coroutines waiting forever: bounded, and reported.
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (finished < coroutines && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
    BOOST_REQUIRE_EQUAL(finished.load(), coroutines);
    std::promise<std::error_code> stopped;
    t.async_stop(10s, [&](std::error_code ec, std::optional<int>) { stopped.set_value(ec); });
    BOOST_CHECK(!stopped.get_future().get());
    guard.reset();
    for (auto& r : runners) r.join();
    BOOST_CHECK_EQUAL(errors.load(), 0);

    const auto lines = lines_of(st::read_file(record));
    BOOST_REQUIRE_EQUAL(lines.size(), static_cast<std::size_t>((coroutines + threads) * per));
    std::map<std::string, int> next;  // per source: the k expected next
    for (const auto& l : lines) {
        const std::string prefix = "REGISTER:/tmp/stw_cl_mt_";
        BOOST_REQUIRE_MESSAGE(l.rfind(prefix, 0) == 0 && l.size() > 5 && l.substr(l.size() - 5) == ":file",
                              "torn line: " << l);
        const std::string body = l.substr(prefix.size(), l.size() - prefix.size() - 5);
        const auto us = body.rfind('_');
        const std::string who = body.substr(0, us);
        const int k = std::stoi(body.substr(us + 1));
        BOOST_REQUIRE_MESSAGE(next[who] == k, who << ": expected " << next[who] << ", got " << k);
        ++next[who];
    }
    BOOST_CHECK_EQUAL(next.size(), static_cast<std::size_t>(coroutines + threads));
}

STEWARD_CORO_TEST(a_full_pipe_is_waited_out_by_coroutines_and_blocking_callers) {
    fd_count_guard fds(ctx);
    st::temp_dir dir("slow");
    const auto record = dir.path / "record.txt";
    const auto script = dir.path / "slow.sh";
    {
        // A reader that starts late: the pipe (64 KiB) fills long before it reads anything.
        std::ofstream f(script);
        f << "#!/bin/sh\nsleep 0.3\nexec cat <&3 >'" << record.string() << "'\n";
    }
    ::chmod(script.c_str(), 0700);
    tracker t(ctx.get_executor(), tracker_options{script.string()});
    co_await t.async_ensure_running(asio::use_awaitable);
    constexpr int coroutines = 300, per = 10;  // about 150 KiB of messages
    int finished = 0;
    std::atomic<int> blocking_done{0};
    for (int c = 0; c < coroutines; ++c)
        asio::co_spawn(
            ctx,
            [&, c]() -> asio::awaitable<void> {
                for (int k = 0; k < per; ++k)
                    co_await t.async_register("/tmp/stw_cl_slow_c" + std::to_string(c) + "_" +
                                                  std::to_string(k) + std::string(20, 'x'),
                                              resource_type::file, asio::use_awaitable);
                ++finished;
            },
            asio::detached);
    std::thread blocking([&] {
        for (int k = 0; k < 200; ++k)
            t.register_resource("/tmp/stw_cl_slow_t_" + std::to_string(k) + std::string(20, 'x'),
                                resource_type::file);
        ++blocking_done;
    });
    while (finished < coroutines || blocking_done == 0) {
        asio::steady_timer timer(ctx, 5ms);
        co_await timer.async_wait(asio::use_awaitable);
    }
    blocking.join();
    auto [ec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(!ec);
    const auto lines = lines_of(st::read_file(record));
    BOOST_CHECK_EQUAL(lines.size(), static_cast<std::size_t>(coroutines * per + 200));
    std::set<std::string> unique(lines.begin(), lines.end());
    BOOST_CHECK_EQUAL(unique.size(), lines.size());
    for (const auto& l : lines)
        BOOST_REQUIRE_MESSAGE(l.rfind("REGISTER:/tmp/stw_cl_slow_", 0) == 0 &&
                                  l.find("xxxxxxxxxxxxxxxxxxxx:file") != std::string::npos,
                              "torn line: " << l);
}

// Where io_uring is blocked (a container's seccomp profile) the first start fails with the probe's
// error and its explanation, before any I/O object could throw from inside Asio. Run in a forked
// child: the filter cannot be removed.
BOOST_AUTO_TEST_CASE(blocked_io_uring_fails_the_start_with_the_probe_explanation,
                     *boost::unit_test::precondition(steward::test::seccomp_available)) {
#if STEWARD_IO_URING_BACKEND
    int report[2];
    BOOST_REQUIRE(::pipe2(report, O_CLOEXEC) == 0);
    const pid_t pid = ::fork();
    BOOST_REQUIRE(pid >= 0);
    if (pid == 0) {
        ::close(report[0]);
        int code = 10;
        if (steward::test::install_errno_filter(__NR_io_uring_setup, EPERM) == 0) {
            asio::io_context ctx;
            tracker t(ctx.get_executor());
            std::error_code ec;
            t.register_resource("/stw_cl_blocked", resource_type::shared_memory, ec);
            const std::string detail = t.last_error_detail();
            code = ec == steward::errc::io_uring_blocked ? 0 : 11;
            if (code == 0 && detail.find("seccomp") == std::string::npos) code = 12;
            if (code == 0 && detail.find("STEWARD_IO_BACKEND=epoll") == std::string::npos) code = 13;
            if (code == 0 && t.daemon_pid() != -1) code = 14;
        }
        (void)!::write(report[1], &code, sizeof code);
        ::_exit(0);
    }
    ::close(report[1]);
    int code = -1;
    BOOST_TEST(::read(report[0], &code, sizeof code) == static_cast<ssize_t>(sizeof code));
    ::close(report[0]);
    int status = 0;
    BOOST_TEST(::waitpid(pid, &status, 0) == pid);
    BOOST_TEST(code == 0);  // 10 filter, 11 wrong code, 12/13 explanation incomplete, 14 a daemon started
#else
    BOOST_TEST_MESSAGE("epoll build: io_uring is never used, nothing to refuse");
#endif
}

// A deferred operation starts when it is awaited: the tracker must hold its own copy of the name by
// then (ASan reports the use after free otherwise; without it, the registered name would differ).
STEWARD_CORO_TEST(deferred_register_keeps_its_own_copy_of_the_name) {
    tracker t(ctx.get_executor());
    const std::string expected = "/stw_cl_deferred_" + std::to_string(::getpid()) + "_longer_than_sso";
    auto op = [&] {
        std::string name = expected;  // destroyed before the operation starts
        return t.async_register(name, resource_type::shared_memory, asio::deferred);
    }();
    std::string clobber(expected.size(), 'x');  // likely reuses the freed block
    co_await std::move(op)(asio::use_awaitable);
    BOOST_TEST(t.is_registered(expected, resource_type::shared_memory));
    co_await t.async_unregister(expected, resource_type::shared_memory, asio::use_awaitable);
    const auto status = co_await t.async_stop(std::chrono::seconds(10), asio::use_awaitable);
    BOOST_TEST(status.has_value());
    if (status) BOOST_TEST(*status == 0);  // nothing leaked: the unregister matched the register
}

// ---- direct writes ----------------------------------------------------------------------------

namespace {

// Everything readable now from a pipe read end this test owns (not served by io_uring).
std::string read_available(int fd) {
    std::string out;
    char buf[8192];
    for (;;) {
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 0) != 1 || !(p.revents & POLLIN)) break;
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n <= 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
}

// A tracker writing into a pipe whose read end the test holds (the exec convention's adoption).
struct adopted_pipe {
    steward::unique_fd read_end;
    std::optional<tracker> t;
    explicit adopted_pipe(asio::io_context& ctx, int pipe_size = 0) {
        int p[2];
        BOOST_REQUIRE_EQUAL(::pipe2(p, O_CLOEXEC), 0);
        read_end.reset(p[0]);
        if (pipe_size) BOOST_REQUIRE_GE(::fcntl(p[1], F_SETPIPE_SZ, pipe_size), pipe_size);
        const int w = ::fcntl(p[1], F_DUPFD, 0);
        ::close(p[1]);
        ::setenv(tracker::environment_variable, std::to_string(w).c_str(), 1);
        t.emplace(tracker::from_environment(ctx.get_executor()));
    }
};

// True when `co_await op` completed without the executor running anything in between: a handler
// posted just before would have run first otherwise.
template <typename Awaitable>
asio::awaitable<bool> completes_without_suspending(asio::io_context& ctx, Awaitable op) {
    bool ran = false;
    asio::post(ctx, [&ran] { ran = true; });
    co_await std::move(op);
    const bool inline_completion = !ran;
    while (!ran) co_await asio::post(ctx, asio::use_awaitable);  // the flag must outlive the handler
    co_return inline_completion;
}

// Descriptors of this process naming the pipe with inode @p ino (found without /proc).
int fds_naming_pipe(ino_t ino) {
    int n = 0;
    for (int fd = 0; fd < 4096; ++fd) {
        struct stat st {};
        if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode) && st.st_ino == ino) ++n;
    }
    return n;
}

}  // namespace

// Direct writes go through a private O_NONBLOCK description of the pipe, reopened through /proc:
// the shared description, which children inherit, stays blocking, and the private one closes
// with it. Without /proc (hidden by a tmpfs in a private mount namespace) direct writes use
// pwritev2(RWF_NOWAIT) on the shared description, with the same bytes in the pipe.
BOOST_AUTO_TEST_CASE(direct_writes_use_a_private_nonblocking_description_or_rwf_nowait_without_proc) {
    for (const bool hide_proc : {false, true}) {
        auto child = st::fork_child([hide_proc] {
            if (hide_proc) {
                if (::unshare(CLONE_NEWNS) != 0) return 10;
                if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return 11;
                if (::mount("steward-test", "/proc", "tmpfs", 0, nullptr) != 0) return 12;
            }
            int p[2];
            if (::pipe2(p, O_CLOEXEC) != 0) return 13;
            steward::unique_fd read_end(p[0]);
            struct stat pipe_stat {};
            ::fstat(p[0], &pipe_stat);
            const int w = ::fcntl(p[1], F_DUPFD, 0);
            ::close(p[1]);
            ::setenv(tracker::environment_variable, std::to_string(w).c_str(), 1);
            std::string got;
            {
                asio::io_context io;
                tracker t = tracker::from_environment(io.get_executor());
                t.register_resource("/stw_private_desc", resource_type::shared_memory);
                // The read end, the shared write end, and the private one where /proc allows it.
                if (fds_naming_pipe(pipe_stat.st_ino) != (hide_proc ? 2 : 3)) return 14;
                if ((::fcntl(t.fd(), F_GETFL) & O_NONBLOCK) != 0) return 15;
                t.unregister_resource("/stw_private_desc", resource_type::shared_memory);
                char buf[256];
                const ssize_t n = ::read(read_end.get(), buf, sizeof buf);
                if (n > 0) got.assign(buf, static_cast<std::size_t>(n));
            }
            if (got !=
                "REGISTER:/stw_private_desc:shared_memory\nUNREGISTER:/stw_private_desc:shared_memory\n")
                return 16;
            // The tracker is gone: only the read end is left, both write ends closed (EOF).
            if (fds_naming_pipe(pipe_stat.st_ino) != 1) return 17;
            char c;
            if (::read(read_end.get(), &c, 1) != 0) return 18;
            return 0;
        });
        BOOST_TEST(child.wait() == 0, (hide_proc ? "without /proc" : "with /proc"));
    }
}

// An idle tracker writes a call's message at once and completes it in place; a full pipe sends
// the call (and every later one) through the queue, which waits for room without completing
// anything; once the queue has drained, calls write directly again. The order of one coroutine's
// REGISTER/UNREGISTER lines survives both transitions.
STEWARD_CORO_TEST(direct_write_then_a_full_pipe_falls_back_to_the_queue_in_order) {
    fd_count_guard fds(ctx);
    adopted_pipe a(ctx, 4096);
    tracker& t = *a.t;
    const std::string x0 = "/stw_direct_0", x1 = "/stw_direct_1", x2 = "/stw_direct_2";
    const bool inline0 =
        co_await completes_without_suspending(ctx, t.async_register(x0, resource_type::shared_memory,
                                                                    asio::use_awaitable));
    BOOST_CHECK(inline0);
    BOOST_CHECK(t.is_registered(x0, resource_type::shared_memory));
    BOOST_CHECK_EQUAL(read_available(a.read_end.get()), "REGISTER:" + x0 + ":shared_memory\n");

    // Fill the one-page pipe through a private non-blocking description of the write end.
    steward::unique_fd filler(
        ::open(("/proc/self/fd/" + std::to_string(t.fd())).c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
    BOOST_REQUIRE(filler);
    std::size_t filled = 0;
    while (::write(filler.get(), "#", 1) == 1) ++filled;
    BOOST_REQUIRE_EQUAL(errno, EAGAIN);
    BOOST_REQUIRE_GT(filled, 0U);

    bool done = false;
    std::error_code first_error;
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            for (const auto& [name, reg] : {std::pair{x1, true}, {x1, false}, {x2, true}}) {
                auto [ec] = reg ? co_await t.async_register(name, resource_type::shared_memory,
                                                           asio::as_tuple(asio::use_awaitable))
                                : co_await t.async_unregister(name, resource_type::shared_memory,
                                                             asio::as_tuple(asio::use_awaitable));
                if (ec && !first_error) first_error = ec;
            }
            done = true;
        },
        asio::detached);
    // Nothing completes while its message cannot be in the pipe.
    for (int i = 0; i < 10; ++i) {
        asio::steady_timer timer(ctx, 5ms);
        co_await timer.async_wait(asio::use_awaitable);
    }
    BOOST_CHECK(!done);
    std::string got;
    const std::string want_tail = "REGISTER:" + x1 + ":shared_memory\nUNREGISTER:" + x1 +
                                  ":shared_memory\nREGISTER:" + x2 + ":shared_memory\n";
    for (int i = 0; i < 2000 && (!done || got.size() < filled + want_tail.size()); ++i) {
        got += read_available(a.read_end.get());
        asio::steady_timer timer(ctx, 1ms);
        co_await timer.async_wait(asio::use_awaitable);
    }
    got += read_available(a.read_end.get());
    BOOST_REQUIRE(done);
    BOOST_REQUIRE_MESSAGE(!first_error, first_error.message());
    BOOST_REQUIRE_EQUAL(got.size(), filled + want_tail.size());
    BOOST_CHECK_EQUAL(got.substr(0, filled), std::string(filled, '#'));
    BOOST_CHECK_EQUAL(got.substr(filled), want_tail);
    BOOST_CHECK(!t.is_registered(x1, resource_type::shared_memory));
    BOOST_CHECK(t.is_registered(x2, resource_type::shared_memory));

    // The queue is empty again: direct once more, blocking and asynchronous alike.
    t.unregister_resource(x0, resource_type::shared_memory);
    BOOST_CHECK_EQUAL(read_available(a.read_end.get()), "UNREGISTER:" + x0 + ":shared_memory\n");
    const bool inline3 =
        co_await completes_without_suspending(ctx, t.async_unregister(x2, resource_type::shared_memory,
                                                                      asio::use_awaitable));
    BOOST_CHECK(inline3);
    BOOST_CHECK_EQUAL(read_available(a.read_end.get()), "UNREGISTER:" + x2 + ":shared_memory\n");
    // as_tuple(use_awaitable) takes the direct path too; a callback always goes through the executor.
    const bool inline4 = co_await completes_without_suspending(
        ctx, t.async_register(x2, resource_type::shared_memory, asio::as_tuple(asio::use_awaitable)));
    BOOST_CHECK(inline4);
    std::optional<std::error_code> callback_ec;
    t.async_unregister(x2, resource_type::shared_memory, [&](std::error_code e) { callback_ec = e; });
    BOOST_CHECK(!callback_ec);  // never inside the initiating call
    while (!callback_ec) co_await asio::post(ctx, asio::use_awaitable);
    BOOST_CHECK(!*callback_ec);
    BOOST_CHECK_EQUAL(read_available(a.read_end.get()),
                      "REGISTER:" + x2 + ":shared_memory\nUNREGISTER:" + x2 + ":shared_memory\n");
    // Invalid names fail on the direct path as on the queue, writing nothing.
    auto [bad] = co_await t.async_register("", resource_type::shared_memory, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(bad == std::errc::invalid_argument);
    BOOST_CHECK_THROW(co_await t.async_register(std::string(600, 'n'), resource_type::shared_memory,
                                                asio::use_awaitable),
                      std::system_error);
    BOOST_CHECK_EQUAL(read_available(a.read_end.get()), "");
}

// A long loop of calls that all complete in place still lets other work of the executor run.
STEWARD_CORO_TEST(a_loop_of_direct_calls_does_not_starve_the_executor) {
    fd_count_guard fds(ctx);
    adopted_pipe a(ctx);
    tracker& t = *a.t;
    int other_ran = 0;
    asio::post(ctx, [&] { ++other_ran; });
    for (int i = 0; i < 1000; ++i) {
        co_await t.async_register("/stw_loop", resource_type::shared_memory, asio::use_awaitable);
        co_await t.async_unregister("/stw_loop", resource_type::shared_memory, asio::use_awaitable);
        if (i % 100 == 0) (void)read_available(a.read_end.get());
    }
    BOOST_CHECK_EQUAL(other_ran, 1);
    (void)read_available(a.read_end.get());
}

// tracker_options::sigpipe_ignored: with SIGPIPE at its default action the option has no effect
// (the write that finds the daemon dead cannot kill the process); with SIGPIPE ignored the guard
// is skipped. Either way a dead daemon is relaunched and learns the registrations.
STEWARD_CORO_TEST(sigpipe_option_relaunches_with_or_without_ignored_sigpipe) {
    fd_count_guard fds(ctx);
    st::temp_dir dir("sigpipe");
    st::stderr_capture err(dir.path / "daemon.err");
    auto* const old = std::signal(SIGPIPE, SIG_DFL);
    for (const bool ignore : {false, true}) {
        (void)std::signal(SIGPIPE, ignore ? SIG_IGN : SIG_DFL);
        tracker_options options;
        options.sigpipe_ignored = true;
        tracker t(ctx.get_executor(), options);
        const std::string x = make_shm("sigpipe_x"), y = make_shm("sigpipe_y");
        co_await t.async_register(x, resource_type::shared_memory, asio::use_awaitable);
        const int first = t.daemon_pid();
        BOOST_REQUIRE_GT(first, 0);
        ::kill(first, SIGKILL);
        BOOST_REQUIRE(st::wait_gone(first));
        auto [ec] = co_await t.async_register(y, resource_type::shared_memory, asio::as_tuple(asio::use_awaitable));
        BOOST_CHECK(!ec);
        BOOST_CHECK_NE(t.daemon_pid(), first);
        auto [sec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
        BOOST_CHECK(!sec);
        BOOST_CHECK_MESSAGE(!st::shm_exists(x), "ignore=" << ignore);
        BOOST_CHECK_MESSAGE(!st::shm_exists(y), "ignore=" << ignore);
        ::shm_unlink(x.c_str());
        ::shm_unlink(y.c_str());
    }
    (void)std::signal(SIGPIPE, old);
    err.restore();
}

// kill -9 right after a registration completed (directly written, or through the queue) leaves
// nothing behind: the message was in the daemon's pipe when the call returned.
BOOST_AUTO_TEST_CASE(kill_9_right_after_a_completed_register_leaves_nothing_behind) {
    for (const int mode : {0, 1, 2}) {  // 0 direct co_await, 1 direct blocking call, 2 queued
        st::temp_dir dir("kill9");
        const std::string name = make_shm("kill9_" + std::to_string(mode));
        int report[2];
        BOOST_REQUIRE_EQUAL(::pipe2(report, O_CLOEXEC), 0);
        const pid_t child = ::fork();
        BOOST_REQUIRE_GE(child, 0);
        if (child == 0) {
            ::close(report[0]);
            st::stderr_capture err(dir.path / "daemon.err");
            asio::io_context ctx(1);
            tracker t(ctx.get_executor());
            asio::co_spawn(
                ctx,
                [&]() -> asio::awaitable<void> {
                    co_await t.async_ensure_running(asio::use_awaitable);
                    const int pid = t.daemon_pid();
                    if (::write(report[1], &pid, sizeof pid) != sizeof pid) ::_exit(3);
                    if (mode == 0) {
                        co_await t.async_register(name, resource_type::shared_memory, asio::use_awaitable);
                    } else if (mode == 1) {
                        t.register_resource(name, resource_type::shared_memory);
                    } else {
                        // A callback: always through the queue and a flush on the executor.
                        t.async_register(name, resource_type::shared_memory, [](std::error_code ec) {
                            ::kill(::getpid(), ec ? SIGTERM : SIGKILL);
                        });
                        co_return;
                    }
                    ::kill(::getpid(), SIGKILL);
                },
                [](const std::exception_ptr& e) {
                    if (e) ::_exit(4);
                });
            ctx.run();
            ::_exit(5);
        }
        ::close(report[1]);
        int daemon = -1;
        const ssize_t n = ::read(report[0], &daemon, sizeof daemon);
        ::close(report[0]);
        int wstatus = 0;
        BOOST_REQUIRE_EQUAL(::waitpid(child, &wstatus, 0), child);
        BOOST_REQUIRE_EQUAL(n, static_cast<ssize_t>(sizeof daemon));
        BOOST_CHECK_MESSAGE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL,
                            "mode " << mode << ": wait status " << wstatus);
        // The daemon sees end of input once the killed child's write end is gone, then cleans up.
        BOOST_REQUIRE_MESSAGE(st::wait_gone(daemon), "daemon still running, mode " << mode);
        BOOST_CHECK_MESSAGE(!st::shm_exists(name), name << " leaked, mode " << mode);
        ::shm_unlink(name.c_str());
    }
}
