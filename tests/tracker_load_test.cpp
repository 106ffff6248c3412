#define BOOST_TEST_MODULE tracker_load_test
#include "support/test_support.hpp"
#include "support/reliability_support.hpp"
#include "support/tracker_client_support.hpp"

#include <steward/tracker.hpp>

#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/wait.h>

#include <atomic>
#include <cmath>
#include <random>
#include <regex>
#include <map>
#include <set>

#include <sys/syscall.h>

// Issue 6, load: 16 forked processes x 1,000 coroutines registering and unregistering real files on
// one tracker (one daemon for the whole family). The fate of every name is known in advance, so a
// lost or duplicated message shows up as a wrong file on disk, a wrong name in the daemon's leak
// report, or a warning from the daemon (exit status 3):
//
// - leaked (registered, never unregistered): must be named in the report and removed by the
//   daemon. A lost REGISTER leaves the file on disk and out of the report.
// - handed over (registered, unregistered, the file kept): must never be named and must stay. A
//   lost UNREGISTER gets it removed and named.
// - removed (unlinked, then unregistered): must never be named. A lost UNREGISTER gets it named;
//   a duplicated UNREGISTER, or one whose REGISTER was lost, draws a warning.
//
// A REGISTER replayed after its UNREGISTER leaves the name tracked (named in the report). Only a
// REGISTER repeated before its own UNREGISTER cannot be seen: the daemon keeps a set, by design.
// The daemon's descriptors are sampled throughout, every process counts its own before and after.

using steward::resource_type;
using steward::tracker;
namespace fs = std::filesystem;
namespace st = steward::test;
using namespace std::chrono_literals;

namespace {

constexpr int process_count = 16;
constexpr int coroutines_per_process = 1000;

enum class fate : unsigned char { removed, handed_over, leaked };

// What each forked process reports back (in anonymous shared memory: no descriptor involved).
struct process_result {
    std::uint64_t registers_done = 0;
    std::uint64_t unregisters_done = 0;
    std::uint64_t errors = 0;
    int fds_before = -1;
    int fds_after = -1;
    int unexpected_fds = 0;  // new descriptors other than the client's one write-room waiter
    int finished = 0;
    char first_error[160] = {};
};

struct plan {
    int rounds = 0;
    fs::path dir;
    // fate of the last round's name of coroutine (p, c), index p * coroutines_per_process + c;
    // earlier rounds alternate between removed and handed over.
    std::vector<fate> last_fate;

    [[nodiscard]] fs::path path(int p, int c, int r) const {
        return dir / ("p" + std::to_string(p) + "_c" + std::to_string(c) + "_r" + std::to_string(r));
    }
    [[nodiscard]] fate fate_of(int p, int c, int r) const {
        if (r == rounds - 1) return last_fate[static_cast<std::size_t>(p * coroutines_per_process + c)];
        return (p + c + r) % 2 == 0 ? fate::removed : fate::handed_over;
    }
};

// fd -> what it refers to, for this process (the listing's own descriptor left out).
std::map<int, std::string> fd_targets() {
    std::map<int, std::string> out;
    std::vector<fs::path> entries;
    for (const auto& e : fs::directory_iterator("/proc/self/fd")) entries.push_back(e.path());
    for (const auto& e : entries) {
        std::error_code ec;
        const auto target = fs::read_symlink(e, ec);
        if (!ec) out[std::stoi(e.filename().string())] = target.string();
    }
    return out;
}

// Waits until @p pid sleeps in the system call that waits for input (io_uring_enter, epoll_wait,
// read): the daemon is set up, or has caught up with everything written so far.
bool wait_idle(pid_t pid, std::chrono::milliseconds limit = 10s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    int settled = 0;
    while (std::chrono::steady_clock::now() < deadline) {
        const std::string call = st::read_file("/proc/" + std::to_string(pid) + "/syscall");
        const long nr = call.empty() ? -1 : std::strtol(call.c_str(), nullptr, 10);
        const bool waiting = nr == SYS_io_uring_enter || nr == SYS_epoll_wait || nr == SYS_epoll_pwait ||
                             nr == SYS_read;
        const std::string state = st::proc_status_field(pid, "State");
        // Twice in a row, a few milliseconds apart: not a wait between two reads of a backlog.
        settled = waiting && !state.empty() && state[0] == 'S' ? settled + 1 : 0;
        if (settled == 3) return true;
        std::this_thread::sleep_for(2ms);
    }
    return false;
}

void note_error(process_result& out, const std::string& what) {
    ++out.errors;
    if (out.first_error[0] == 0) std::snprintf(out.first_error, sizeof out.first_error, "%s", what.c_str());
}

asio::awaitable<void> churn(tracker& t, const plan& pl, int p, int c, process_result& out) {
    for (int r = 0; r < pl.rounds; ++r) {
        const std::string name = pl.path(p, c, r).string();
        // Register, then create: the order that cannot leak.
        auto [ec] = co_await t.async_register(name, resource_type::file, asio::as_tuple(asio::use_awaitable));
        if (ec) {
            note_error(out, "register " + name + ": " + ec.message());
            continue;
        }
        ++out.registers_done;
        const int fd = ::open(name.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
        if (fd < 0) {
            note_error(out, "create " + name + ": " + std::strerror(errno));
            continue;
        }
        ::close(fd);
        const fate f = pl.fate_of(p, c, r);
        if (f == fate::leaked) continue;
        // Remove, then unregister: a kill in between leaves only a name whose object is gone.
        if (f == fate::removed && ::unlink(name.c_str()) != 0) note_error(out, "unlink " + name);
        auto [uec] = co_await t.async_unregister(name, resource_type::file, asio::as_tuple(asio::use_awaitable));
        if (uec)
            note_error(out, "unregister " + name + ": " + uec.message());
        else
            ++out.unregisters_done;
    }
}

// One forked member of the family: 1,000 coroutines on the inherited tracker. Never returns.
[[noreturn]] void member(asio::io_context& ctx, tracker& t, const plan& pl, int p, process_result& out) {
    try {
        ctx.notify_fork(asio::execution_context::fork_child);
        const auto before = fd_targets();
        out.fds_before = st::open_fd_count();
        for (int c = 0; c < coroutines_per_process; ++c)
            asio::co_spawn(ctx, churn(t, pl, p, c, out), [&out](std::exception_ptr e) {
                if (e) note_error(out, "a coroutine threw");
            });
        ctx.run();
        out.fds_after = st::open_fd_count();
        // The client may open one descriptor for the whole life of the tracker: a duplicate of its
        // write end to wait for room when the pipe is full. Anything else is growth.
        const auto after = fd_targets();
        const std::string pipe = before.count(t.fd()) ? before.at(t.fd()) : "?";
        int waiters = 0;
        for (const auto& [fd, target] : after) {
            const auto was = before.find(fd);
            if (was != before.end() && was->second == target) continue;
            if (target == pipe && waiters++ == 0) continue;
            ++out.unexpected_fds;
            note_error(out, "new descriptor " + std::to_string(fd) + " -> " + target);
        }
        out.finished = 1;
    } catch (const std::exception& e) {
        note_error(out, std::string("member threw: ") + e.what());
    }
    ::_exit(0);  // no destructors: the parent's objects are the parent's to tear down
}

// "There appear to be N leaked file objects to clean up at shutdown: {'/a', '/b'}" -> names.
std::set<std::string> reported_files(const std::string& text, std::string& other_lines) {
    std::set<std::string> names;
    std::istringstream in(text);
    std::string line;
    const std::string head = "steward-tracker: There appear to be ";
    const std::regex report_line(R"(steward-tracker: There appear to be (\d+) leaked file objects to clean up at shutdown: \{(.*)\})");
    while (std::getline(in, line)) {
        std::smatch m;
        if (!std::regex_match(line, m, report_line)) {
            other_lines += line + "\n";
            continue;
        }
        const std::string list = m[2].str();
        std::size_t count = 0;
        for (std::size_t at = 0; (at = list.find('\'', at)) != std::string::npos;) {
            const auto end = list.find('\'', at + 1);
            if (end == std::string::npos) break;
            names.insert(list.substr(at + 1, end - at - 1));
            ++count;
            at = end + 1;
        }
        if (count != std::stoul(m[1].str())) other_lines += "(count mismatch) " + line + "\n";
    }
    return names;
}

}  // namespace

BOOST_AUTO_TEST_CASE(processes_x_coroutines_register_and_unregister_without_loss,
                     *boost::unit_test::precondition(st::io_uring_available)) {
    // Rounds per coroutine: 4 (64,000 names, 127,000-odd messages); fewer under a sanitizer.
    const int rounds = std::max(1, static_cast<int>(std::lround(4 * st::load_scale(0.25))));
    const unsigned seed = std::random_device{}();
    BOOST_TEST_MESSAGE("tracker_load: " << process_count << " processes x " << coroutines_per_process
                                        << " coroutines x " << rounds << " rounds, seed " << seed);

    const int fds_before = st::open_fd_count();
    st::temp_dir work("trload");
    plan pl;
    pl.rounds = rounds;
    pl.dir = work.path / "files";
    fs::create_directories(pl.dir);
    // About 1 in 40 coroutines leaks its last name; the rest of the last round is split as before.
    std::mt19937 rng(seed);
    pl.last_fate.resize(static_cast<std::size_t>(process_count * coroutines_per_process));
    std::set<std::string> expect_leaked, expect_kept;
    for (int p = 0; p < process_count; ++p)
        for (int c = 0; c < coroutines_per_process; ++c) {
            const auto roll = rng() % 40;
            pl.last_fate[static_cast<std::size_t>(p * coroutines_per_process + c)] =
                roll == 0 ? fate::leaked : roll % 2 ? fate::handed_over : fate::removed;
            for (int r = 0; r < rounds; ++r) {
                const fate f = pl.fate_of(p, c, r);
                if (f == fate::leaked) expect_leaked.insert(pl.path(p, c, r).string());
                if (f == fate::handed_over) expect_kept.insert(pl.path(p, c, r).string());
            }
        }
    BOOST_REQUIRE(!expect_leaked.empty());

    st::shared_array<process_result> results(process_count);
    std::uint64_t registers = 0, unregisters = 0, errors = 0;
    int daemon_fds_start = -1, daemon_fds_end = -1, daemon_fds_max = -1, daemon_fds_min = -1, samples = 0;
    std::optional<int> status;
    std::string daemon_err;
    double seconds = 0;
    {
        asio::io_context ctx;
        tracker t(ctx.get_executor());
        {
            st::stderr_capture err(work.path / "daemon.err");  // the daemon inherits it
            t.ensure_running();
        }
        const int daemon = t.daemon_pid();
        BOOST_REQUIRE_GT(daemon, 0);
        BOOST_CHECK_MESSAGE(wait_idle(daemon), "the daemon never settled in its wait for input");
        daemon_fds_start = daemon_fds_max = daemon_fds_min = st::fd_count_of(daemon);

        const auto start = std::chrono::steady_clock::now();
        std::vector<pid_t> members;
        for (int p = 0; p < process_count; ++p) {
            const pid_t pid = ::fork();
            BOOST_REQUIRE(pid >= 0);
            if (pid == 0) member(ctx, t, pl, p, results[static_cast<std::size_t>(p)]);
            members.push_back(pid);
        }
        // Wait for the family, sampling the daemon's descriptors while it works.
        const auto deadline = start + 300s;
        std::size_t running = members.size();
        while (running > 0 && std::chrono::steady_clock::now() < deadline) {
            for (pid_t& pid : members) {
                if (pid <= 0) continue;
                int ws = 0;
                if (::waitpid(pid, &ws, WNOHANG) == pid) {
                    BOOST_CHECK_MESSAGE(WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "member " << pid << " status " << ws);
                    pid = -1;
                    --running;
                }
            }
            const int n = st::fd_count_of(daemon);
            ++samples;
            daemon_fds_max = std::max(daemon_fds_max, n);
            daemon_fds_min = std::min(daemon_fds_min, n);
            std::this_thread::sleep_for(5ms);
        }
        seconds = st::seconds_since(start);
        for (pid_t pid : members)
            if (pid > 0) {
                ::kill(pid, SIGKILL);
                ::waitpid(pid, nullptr, 0);
            }
        BOOST_REQUIRE_MESSAGE(running == 0, running << " member processes did not finish within 300 s");
        // The last sample once the daemon has read all the family's traffic, before it can see end
        // of input (this process still holds the pipe).
        BOOST_CHECK_MESSAGE(wait_idle(daemon), "the daemon did not catch up with the family's traffic");
        daemon_fds_end = st::fd_count_of(daemon);
        daemon_fds_max = std::max(daemon_fds_max, daemon_fds_end);
        daemon_fds_min = std::min(daemon_fds_min, daemon_fds_end);

        std::error_code stop_ec;
        asio::co_spawn(
            ctx,
            [&]() -> asio::awaitable<void> {
                auto [ec, s] = co_await t.async_stop(60s, asio::as_tuple(asio::use_awaitable));
                stop_ec = ec;
                status = s;
            },
            asio::detached);
        ctx.run();
        BOOST_CHECK_MESSAGE(!stop_ec, "async_stop: " << stop_ec.message());
    }
    daemon_err = st::read_file(work.path / "daemon.err");

    for (int p = 0; p < process_count; ++p) {
        const process_result& r = results[static_cast<std::size_t>(p)];
        BOOST_TEST_CONTEXT("member " << p) {
            BOOST_CHECK_EQUAL(r.finished, 1);
            BOOST_CHECK_MESSAGE(r.errors == 0, r.errors << " errors, first: " << r.first_error);
            BOOST_CHECK_EQUAL(r.unexpected_fds, 0);
            BOOST_CHECK_LE(r.fds_after, r.fds_before + 1);
        }
        registers += r.registers_done;
        unregisters += r.unregisters_done;
        errors += r.errors;
    }
    const std::uint64_t names = std::uint64_t{process_count} * coroutines_per_process * static_cast<unsigned>(rounds);
    BOOST_CHECK_EQUAL(errors, 0u);
    BOOST_CHECK_EQUAL(registers, names);
    BOOST_CHECK_EQUAL(unregisters, names - expect_leaked.size());

    // The daemon: found leaks, all removed, no bad input (status 3 would mean a torn, unknown or
    // duplicated message), its descriptors never grew.
    BOOST_REQUIRE(status.has_value());
    BOOST_CHECK_MESSAGE(*status == 1, "daemon exit status " << *status << "; stderr:\n" << daemon_err.substr(0, 2000));
    BOOST_CHECK_EQUAL(daemon_fds_end, daemon_fds_start);
    BOOST_CHECK_EQUAL(daemon_fds_max, daemon_fds_start);
    BOOST_CHECK_EQUAL(daemon_fds_min, daemon_fds_start);

    // Its report names exactly the leaked set, and nothing else was said.
    std::string other;
    const auto reported = reported_files(daemon_err, other);
    BOOST_CHECK_MESSAGE(other.empty(), "unexpected daemon output:\n" << other.substr(0, 2000));
    BOOST_CHECK_EQUAL(reported.size(), expect_leaked.size());
    std::size_t wrongly_reported = 0, missing_from_report = 0;
    for (const auto& n : reported) wrongly_reported += expect_leaked.count(n) == 0;
    for (const auto& n : expect_leaked) missing_from_report += reported.count(n) == 0;
    BOOST_CHECK_EQUAL(wrongly_reported, 0u);
    BOOST_CHECK_EQUAL(missing_from_report, 0u);

    // On disk: exactly the handed-over files remain; the leaked ones were removed by the daemon.
    std::set<std::string> on_disk;
    for (const auto& e : fs::directory_iterator(pl.dir)) on_disk.insert(e.path().string());
    std::size_t leaked_left = 0, kept_lost = 0, strays = 0;
    for (const auto& n : expect_leaked) leaked_left += on_disk.count(n);
    for (const auto& n : expect_kept) kept_lost += on_disk.count(n) == 0;
    for (const auto& n : on_disk) strays += expect_kept.count(n) == 0;
    BOOST_CHECK_EQUAL(leaked_left, 0u);
    BOOST_CHECK_EQUAL(kept_lost, 0u);
    BOOST_CHECK_EQUAL(strays, 0u);

    BOOST_CHECK_EQUAL(st::open_fd_count(), fds_before);
    BOOST_TEST_MESSAGE("tracker_load: " << registers + unregisters << " messages (" << registers
                                        << " REGISTER, " << unregisters << " UNREGISTER) from "
                                        << process_count * coroutines_per_process << " coroutines in "
                                        << seconds << " s; " << errors << " errors; " << reported.size()
                                        << " leaked names reported and removed (expected " << expect_leaked.size()
                                        << "); " << expect_kept.size() << " handed-over files kept; daemon fds "
                                        << daemon_fds_start << " (min " << daemon_fds_min << ", max "
                                        << daemon_fds_max << " over " << samples << " samples)");
}
