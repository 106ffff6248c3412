#define BOOST_TEST_MODULE sharer_fault_test
#include "support/test_support.hpp"

#include "support/fd_test_support.hpp"
#include "support/reliability_support.hpp"
#include "support/sharer_warmup.hpp"

#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/sharer.hpp>

#include <asio/io_context.hpp>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <csignal>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

// Issue 6, faults: the client killed with -9 mid-transfer, the server killed with -9 mid-transfer,
// stop() with transfers in flight. After each: no descriptor delivered twice, none leaked on the
// surviving side, and the cache in the state docs/sharer.md promises ("exactly once or to nobody":
// a share is delivered once its receiver confirmed it; a transfer that fails puts it back, still
// fetchable; a share still pending at stop is closed).
//
// Receiver at RLIMIT_NOFILE (clear error, share still fetchable): the single-fetch case is
// sharer_security_test's control_truncated_at_a_tiny_rlimit_gives_the_share_back; here the limit is
// reached in the middle of a pipeline (receiver_reaching_rlimit_mid_pipeline).

using namespace steward;
namespace t = steward::test;
using clock_type = std::chrono::steady_clock;

namespace {

// The shares of every scenario: 400 ids, mostly one memfd, every tenth three, and one of 300
// (two SCM_RIGHTS messages: a multi-part reply can be cut by the kill too).
constexpr std::size_t share_count = 400;
constexpr std::size_t big_share = 7;

std::size_t share_size(std::size_t i) {
    if (i == big_share) return 300;
    return i % 10 == 0 ? 3 : 1;
}

std::vector<std::size_t> share_offsets() {
    std::vector<std::size_t> off(share_count + 1, 0);
    for (std::size_t i = 0; i < share_count; ++i) off[i + 1] = off[i] + share_size(i);
    return off;
}

ino_t inode_of(int fd) {
    struct stat st {};
    return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

// What a client saw for one share.
struct fetch_record {
    std::int32_t state = 0;           // 0 not finished, 1 received, 2 failed
    std::int32_t error_category = 0;  // 1 steward::errc, 2 system, 3 other
    std::int32_t error_value = 0;
    std::int32_t wrong = 0;  // received, but not exactly the shared descriptors
};

// Everything shared between the processes of one scenario (anonymous shared memory, no fds).
struct fault_layout {
    std::vector<std::size_t> offsets = share_offsets();
    t::shared_array<share_key> keys{share_count};
    t::shared_array<ino_t> inodes{share_offsets().back()};
    t::shared_array<fetch_record> records{share_count};
    t::shared_array<char> address{128};

    [[nodiscard]] std::string path() const { return {&address[0]}; }
};

std::int32_t category_tag(const std::error_code& ec) {
    if (!ec) return 0;
    if (ec.category() == make_error_code(errc::timed_out).category()) return 1;
    if (ec.category() == std::system_category() || ec.category() == std::generic_category()) return 2;
    return 3;
}

std::string describe(std::int32_t tag, std::int32_t value) {
    switch (tag) {
        case 0:
            return "ok";
        case 1:
            return make_error_code(static_cast<errc>(value)).message();
        case 2:
            return std::system_category().message(value);
        default:
            return "error " + std::to_string(value) + " of another category";
    }
}

// Shares the 400 ids on @p s (fresh memfds; our own copies are closed), recording keys and inodes.
void make_shares(sharer& s, fault_layout& layout) {
    for (std::size_t i = 0; i < share_count; ++i) {
        std::vector<unique_fd> files;
        std::vector<int> numbers;
        for (std::size_t k = 0; k < share_size(i); ++k) {
            files.emplace_back(::memfd_create("steward-fault", MFD_CLOEXEC));
            if (!files.back()) throw std::system_error(errno, std::system_category(), "memfd_create");
            layout.inodes[layout.offsets[i] + k] = inode_of(files.back().get());
            numbers.push_back(files.back().get());
        }
        layout.keys[i] = s.share(numbers).key();
    }
    const std::string a = s.address();
    std::memcpy(&layout.address[0], a.c_str(), std::min<std::size_t>(a.size() + 1, layout.address.size()));
}

// Starts an async_fetch of every share on @p io; each completion is recorded (and checked against
// the shared inodes) before @p hook runs with the number of completions so far.
void fetch_all(asio::io_context& io, fault_layout& layout, const std::function<void(std::size_t)>& hook) {
    auto completed = std::make_shared<std::size_t>(0);
    const std::string path = layout.path();
    for (std::size_t i = 0; i < share_count; ++i) {
        async_fetch(io.get_executor(), share_id(path, layout.keys[i]),
                    [&layout, i, completed, hook](std::error_code ec, std::vector<unique_fd> fds) {
                        fetch_record& r = layout.records[i];
                        if (ec) {
                            r.error_category = category_tag(ec);
                            r.error_value = ec.value();
                            r.state = 2;
                        } else {
                            bool exact = fds.size() == share_size(i);
                            for (std::size_t k = 0; exact && k < fds.size(); ++k)
                                exact = inode_of(fds[k].get()) == layout.inodes[layout.offsets[i] + k];
                            r.wrong = exact ? 0 : 1;
                            r.state = 1;
                        }
                        fds.clear();
                        hook(++*completed);
                    });
    }
}

std::size_t count_state(const fault_layout& layout, std::int32_t state) {
    std::size_t n = 0;
    for (std::size_t i = 0; i < share_count; ++i) n += layout.records[i].state == state;
    return n;
}

std::size_t count_wrong(const fault_layout& layout) {
    std::size_t n = 0;
    for (std::size_t i = 0; i < share_count; ++i) n += layout.records[i].wrong != 0;
    return n;
}

std::string error_summary(const fault_layout& layout) {
    std::map<std::string, std::size_t> counts;
    for (std::size_t i = 0; i < share_count; ++i)
        if (layout.records[i].state == 2)
            ++counts[describe(layout.records[i].error_category, layout.records[i].error_value)];
    std::string out;
    for (const auto& [msg, n] : counts) out += " [" + std::to_string(n) + "x " + msg + "]";
    return out.empty() ? " none" : out;
}

std::uint64_t base_seed() {
    if (const char* text = std::getenv("STEWARD_FAULT_SEED"); text && *text)
        return std::strtoull(text, nullptr, 0);
    return std::random_device{}();
}

// A fetch by the surviving side (blocking, a connection of its own): the received descriptors'
// inodes, or the error.
struct survivor_result {
    std::error_code ec;
    bool exact = false;
};

survivor_result survivor_fetch(const fault_layout& layout, std::size_t i) {
    survivor_result r;
    std::vector<unique_fd> fds = fetch(share_id(layout.path(), layout.keys[i]), r.ec);
    if (r.ec) return r;
    r.exact = fds.size() == share_size(i);
    for (std::size_t k = 0; r.exact && k < fds.size(); ++k)
        r.exact = inode_of(fds[k].get()) == layout.inodes[layout.offsets[i] + k];
    return r;
}

std::size_t fds_of_shares(const std::vector<std::size_t>& which) {
    std::size_t n = 0;
    for (std::size_t i : which) n += share_size(i);
    return n;
}

// Starts the listener and runs one whole fetch through it, so that everything the server and
// this process's blocking fetch create once (listener, rings, timers) exists before the baseline.
void warm_up(sharer& s) {
    unique_fd probe = t::make_memfd("probe");
    std::error_code ec;
    std::vector<unique_fd> got = fetch(s.share(probe.get()), ec);
    BOOST_REQUIRE_MESSAGE(!ec && got.size() == 1, "warm-up fetch: " << ec.message());
    BOOST_REQUIRE(t::wait_for_condition([&] {
        const sharer_stats st = s.stats();
        return st.pending == 0 && st.connections_open == 0;
    }));
    BOOST_REQUIRE(t::wait_for_condition([&] { return s.stats().delivered == 1; }));
}

}  // namespace

// A client process fetching all 400 shares at once (pipelined on its pooled connection) is killed
// with -9 after a random number of completions: either while it keeps fetching ("active": requests,
// replies and confirmations in flight) or while its io_context is stuck in a handler ("stalled":
// the server's replies, with their descriptors, pile up unread in its socket). Afterwards every
// share the dead client completed is gone for good (its CONFIRM was written before its handler
// ran), every other one is either counted delivered or still fetchable, the server holds exactly
// one copy per fetchable descriptor, and a survivor gets each fetchable share whole, once.
BOOST_AUTO_TEST_CASE(client_killed_mid_transfer, *boost::unit_test::precondition(t::io_uring_available)) {
    const std::uint64_t seed = base_seed();
    std::mt19937_64 rng(seed);
    const auto shm_before = t::shm_entries();
    const int fds_before = t::open_fd_count();
    std::size_t rounds = 0, killed_completed_total = 0, survivor_total = 0, put_back_total = 0;
    std::size_t redelivered_total = 0, lost_total = 0;
    const auto start = clock_type::now();
    enum class kill_mode { self, active, stalled };
    for (const kill_mode mode : {kill_mode::self, kill_mode::active, kill_mode::stalled, kill_mode::self,
                                 kill_mode::active, kill_mode::stalled}) {
        ++rounds;
        const bool stalled = mode == kill_mode::stalled;
        const char* mode_name = mode == kill_mode::self ? "self-kill in a handler"
                                : stalled               ? "stalled"
                                                        : "active";
        const std::size_t kill_after = std::uniform_int_distribution<std::size_t>(1, share_count / 2)(rng);
        BOOST_TEST_CONTEXT("round " << rounds << " " << mode_name << ", kill after " << kill_after
                                    << " completions, seed " << seed) {
            fault_layout layout;
            sharer s;
            s.start_background();
            warm_up(s);
            const int server_base = t::open_fd_count();
            make_shares(s, layout);
            BOOST_REQUIRE_EQUAL(t::open_fd_count(), server_base + static_cast<int>(layout.inodes.size()));

            auto up = t::make_pipe();
            auto client = t::fork_child([&] {
                up.first.reset();
                asio::io_context io(1);
                fetch_all(io, layout, [&](std::size_t done) {
                    if (done != kill_after) return;
                    t::send_byte(up.second.get());
                    if (mode == kill_mode::self)
                        (void)::raise(SIGKILL);  // replies and confirmations in flight
                    if (stalled) std::this_thread::sleep_for(std::chrono::seconds(30));  // killed in here
                });
                io.run_for(std::chrono::seconds(30));
                ::pause();  // everything done before the kill arrived: still die by it
                return 0;
            });
            up.second.reset();
            BOOST_REQUIRE(t::wait_byte(up.first.get()));
            if (stalled) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // replies pile up
            ::kill(client.pid(), SIGKILL);
            BOOST_TEST(client.wait() == 128 + SIGKILL);
            up.first.reset();

            // The server notices the peer is gone and settles the connection's unconfirmed shares.
            BOOST_TEST(t::wait_for_condition([&] { return s.stats().connections_open == 0; }));
            const sharer_stats after_kill = s.stats();
            const std::size_t delivered = after_kill.delivered - 1;  // not the warm-up
            std::vector<std::size_t> completed_by_dead;
            for (std::size_t i = 0; i < share_count; ++i)
                if (layout.records[i].state == 1) completed_by_dead.push_back(i);
            BOOST_TEST(count_wrong(layout) == 0u);
            BOOST_TEST(completed_by_dead.size() + count_state(layout, 2) >= kill_after);
            BOOST_TEST(count_state(layout, 2) == 0u, "the dead client's failures:" << error_summary(layout));
            BOOST_TEST(delivered >= completed_by_dead.size());  // every completion was confirmed
            BOOST_TEST(after_kill.pending == share_count - delivered);

            // The survivor: each share not delivered is fetchable, whole; each delivered one is not.
            std::vector<std::size_t> fetched_by_survivor;
            std::size_t refused = 0, other_errors = 0, inexact = 0, redelivered = 0;
            const int before_survivor = t::open_fd_count();
            const auto held_by_server = static_cast<std::size_t>(before_survivor - server_base);
            for (std::size_t i = 0; i < share_count; ++i) {
                const survivor_result r = survivor_fetch(layout, i);
                if (!r.ec) {
                    fetched_by_survivor.push_back(i);
                    inexact += !r.exact;
                    redelivered += layout.records[i].state == 1;
                } else if (r.ec == errc::share_not_available) {
                    ++refused;
                } else {
                    ++other_errors;
                    BOOST_TEST_MESSAGE("survivor fetch " << i << ": " << r.ec.message());
                }
            }
            // No share the dead client completed comes out again.
            BOOST_TEST(redelivered == 0u);
            BOOST_TEST(inexact == 0u);
            BOOST_TEST(other_errors == 0u);
            // Every share not delivered is still fetchable.
            BOOST_TEST(fetched_by_survivor.size() == share_count - delivered);
            BOOST_TEST(refused == delivered);
            // The server held exactly one copy of each descriptor still fetchable (none leaked,
            // none closed too early).
            BOOST_TEST(held_by_server == fds_of_shares(fetched_by_survivor));
            BOOST_TEST(t::wait_for_condition([&] { return s.pending() == 0; }, std::chrono::seconds(2)));
            BOOST_TEST(s.stats().delivered == share_count + 1);  // + the warm-up
            BOOST_TEST(t::wait_for_condition([&] { return t::open_fd_count() == server_base; },
                                             std::chrono::seconds(2)));
            killed_completed_total += completed_by_dead.size();
            redelivered_total += redelivered;
            lost_total += refused - std::min<std::size_t>(refused, delivered);
            survivor_total += fetched_by_survivor.size();
            put_back_total += after_kill.returned;
            std::printf(
                "sharer fault, client -9 (%s, after %zu completions): dead client completed %zu, "
                "server counted %zu delivered and put %llu back, survivor fetched %zu, refused %zu\n",
                mode_name, kill_after, completed_by_dead.size(), delivered,
                static_cast<unsigned long long>(after_kill.returned), fetched_by_survivor.size(), refused);
        }
    }
    std::printf(
        "sharer fault, client -9: %zu rounds (seed %llu; STEWARD_FAULT_SEED replays), "
        "%zu shares completed by killed clients, %zu put back and fetched by the survivor, "
        "%zu transfers put back, %zu shares delivered twice, %zu neither delivered nor fetchable, "
        "in %.2f s\n",
        rounds, static_cast<unsigned long long>(seed), killed_completed_total, survivor_total, put_back_total,
        redelivered_total, lost_total, t::seconds_since(start));
    (void)std::fflush(stdout);
    BOOST_TEST(t::open_fd_count() == fds_before);
    t::check_shm_unchanged(shm_before);
}

namespace {

bool allowed_connection_loss(const fetch_record& r) {
    if (r.error_category != 2) return false;
    const auto e = static_cast<std::errc>(r.error_value);
    return e == std::errc::connection_reset || e == std::errc::connection_refused ||
           e == std::errc::no_such_file_or_directory;
}

// Failures that are none of the documented outcomes of losing the server (fetch.hpp): the
// connection lost (connection_reset, also when the loss shows on a write), no listener any more
// (ECONNREFUSED, ENOENT), and with @p closed_shares_refused the share closed by stop()
// (errc::share_not_available, the answer for a share that is gone).
std::size_t count_disallowed_errors(const fault_layout& layout, bool closed_shares_refused = false) {
    std::size_t n = 0;
    for (std::size_t i = 0; i < share_count; ++i) {
        const fetch_record& r = layout.records[i];
        if (r.state != 2 || allowed_connection_loss(r)) continue;
        if (closed_shares_refused && r.error_category == 1 &&
            r.error_value == static_cast<int>(errc::share_not_available))
            continue;
        ++n;
    }
    return n;
}

// A private socket base directory (the server killed with -9 cannot remove its socket).
struct private_base {
    std::string path;
    private_base() {
        std::string templ = "/tmp/steward-fault-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(templ.data()) != nullptr);
        path = templ;
    }
    private_base(const private_base&) = delete;
    private_base& operator=(const private_base&) = delete;
    ~private_base() {
        for (const std::string& name : entries()) {
            ::unlink((path + "/" + name + "/s").c_str());
            ::rmdir((path + "/" + name).c_str());
        }
        ::rmdir(path.c_str());
    }
    [[nodiscard]] std::vector<std::string> entries() const {
        std::vector<std::string> names;
        if (DIR* dir = ::opendir(path.c_str())) {
            while (auto* e = ::readdir(dir))
                if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0)
                    names.emplace_back(e->d_name);
            ::closedir(dir);
        }
        return names;
    }
};

}  // namespace

// The server process is killed with -9 while this process has all 400 fetches in flight on its
// pooled connection: at the K-th completion (inside the handler) or from another thread at a random
// moment. Every fetch completes (none hangs), each one either with exactly the shared descriptors or
// with a connection error; nothing received twice; this process holds no descriptor afterwards;
// a later fetch fails at once with ECONNREFUSED. (The dead server's socket file stays behind: only
// stop() or the destructor remove it; the test clears it.)
BOOST_AUTO_TEST_CASE(server_killed_mid_transfer, *boost::unit_test::precondition(t::io_uring_available)) {
    const std::uint64_t seed = base_seed();
    std::mt19937_64 rng(seed);
    const auto shm_before = t::shm_entries();
    const int fds_before = t::open_fd_count();
    const auto start = clock_type::now();
    std::size_t rounds = 0, received_total = 0, lost_total = 0, twice_total = 0, hung_total = 0;
    for (const bool in_handler : {true, false, true, false}) {
        ++rounds;
        const std::size_t kill_after = std::uniform_int_distribution<std::size_t>(1, share_count / 2)(rng);
        const auto kill_delay = std::chrono::microseconds(std::uniform_int_distribution<int>(0, 3000)(rng));
        BOOST_TEST_CONTEXT(
            "round " << rounds << (in_handler ? " kill in the K-th handler, K = " : " kill after ")
                     << (in_handler ? kill_after : static_cast<std::size_t>(kill_delay.count()))
                     << (in_handler ? "" : " us") << ", seed " << seed) {
            private_base base;
            fault_layout layout;
            (void)authkey::family();
            auto up = t::make_pipe();
            auto server = t::fork_child([&] {
                up.first.reset();
                sharer_options opts;
                opts.socket_base_dir = base.path;
                sharer s(opts);
                s.start_background();
                make_shares(s, layout);
                t::send_byte(up.second.get());
                for (;;) ::pause();  // until killed
                return 0;
            });
            up.second.reset();
            BOOST_REQUIRE(t::wait_byte(up.first.get()));
            up.first.reset();

            const int fds_round = t::open_fd_count();
            std::size_t finished = 0;
            {
                asio::io_context io(1);
                std::thread killer;
                if (!in_handler) {
                    killer = std::thread([pid = server.pid(), kill_delay] {
                        std::this_thread::sleep_for(kill_delay);
                        ::kill(pid, SIGKILL);
                    });
                }
                fetch_all(io, layout, [&](std::size_t done) {
                    finished = done;
                    if (in_handler && done == kill_after) ::kill(server.pid(), SIGKILL);
                });
                io.run_for(std::chrono::seconds(20));
                if (killer.joinable()) killer.join();
                BOOST_TEST(server.wait() == 128 + SIGKILL);
                BOOST_TEST(finished == share_count);  // none hangs
            }
            BOOST_TEST(t::open_fd_count() == fds_round);  // received descriptors closed, connection gone
            const std::size_t received = count_state(layout, 1);
            BOOST_TEST(count_wrong(layout) == 0u);  // whole, the right files, in order
            BOOST_TEST(count_disallowed_errors(layout) == 0u, "errors:" << error_summary(layout));
            if (in_handler) BOOST_TEST(received >= kill_after);

            // Nothing received twice: the inodes of all received shares are distinct.
            std::vector<ino_t> got;
            for (std::size_t i = 0; i < share_count; ++i)
                if (layout.records[i].state == 1)
                    got.insert(got.end(), &layout.inodes[layout.offsets[i]],
                               &layout.inodes[layout.offsets[i]] + share_size(i));
            std::sort(got.begin(), got.end());
            std::size_t twice = 0;
            for (std::size_t k = 1; k < got.size(); ++k) twice += got[k] == got[k - 1];
            BOOST_TEST(twice == 0u);
            twice_total += twice;
            hung_total += share_count - finished;

            // A later fetch: a clear error at once.
            std::size_t unfetched = share_count;
            for (std::size_t i = 0; i < share_count; ++i)
                if (layout.records[i].state != 1) unfetched = i;
            if (unfetched != share_count) {
                const auto t0 = clock_type::now();
                const survivor_result r = survivor_fetch(layout, unfetched);
                // Right after the reap the kernel may still hold the dead server's listener (its
                // io_uring is torn down asynchronously): the connect succeeds and the connection is
                // then dropped. Either way the error must say "no server / connection lost", not
                // blame the key.
                const bool connection_error = r.ec == std::errc::connection_refused ||
                                              r.ec == std::errc::connection_reset ||
                                              r.ec == std::errc::no_such_file_or_directory;
                BOOST_TEST(connection_error, "fetch right after the server died: " << r.ec.message());
                BOOST_TEST(t::seconds_since(t0) < 1.0);
                BOOST_TEST(t::wait_for_condition(
                    [&] { return survivor_fetch(layout, unfetched).ec == std::errc::connection_refused; },
                    std::chrono::seconds(5)));
            }
            // kill -9 leaves the socket (and its directory) behind; nothing else.
            BOOST_TEST(base.entries().size() == 1u);
            received_total += received;
            lost_total += share_count - received;
            std::printf("sharer fault, server -9 (%s): %zu received whole, %zu failed:%s\n",
                        in_handler ? ("in the handler of completion " + std::to_string(kill_after)).c_str()
                                   : ("after " + std::to_string(kill_delay.count()) + " us").c_str(),
                        received, share_count - received, error_summary(layout).c_str());
        }
    }
    std::printf(
        "sharer fault, server -9: %zu rounds (seed %llu), %zu shares received whole, %zu fetches "
        "failed (errors per round above), %zu hung, %zu descriptors received twice, in %.2f s\n",
        rounds, static_cast<unsigned long long>(seed), received_total, lost_total, hung_total, twice_total,
        t::seconds_since(start));
    (void)std::fflush(stdout);
    BOOST_TEST(t::open_fd_count() == fds_before);
    t::check_shm_unchanged(shm_before);
}

// stop() while a client process has all 400 fetches in flight: either the client keeps reading
// ("active", stop with 2 s for confirmations: every share the client received was confirmed and
// counted delivered) or its io_context is stuck in a handler longer than stop's timeout ("stalled":
// the server gives up waiting and closes its copies; replies already queued in the client's socket
// still arrive there). Either way: after stop nothing is fetchable, the server holds no descriptor,
// every share reached the client at most once and whole, and the client leaks nothing.
BOOST_AUTO_TEST_CASE(stop_with_fetches_in_flight_keeps_exactly_once,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const std::uint64_t seed = base_seed();
    std::mt19937_64 rng(seed);
    const auto shm_before = t::shm_entries();
    const int fds_before = t::open_fd_count();
    const auto start = clock_type::now();
    std::size_t rounds = 0;
    for (const bool stalled : {false, true, false, true}) {
        ++rounds;
        const std::size_t stop_after = std::uniform_int_distribution<std::size_t>(1, share_count / 2)(rng);
        BOOST_TEST_CONTEXT("round " << rounds << (stalled ? " stalled" : " active") << ", stop after "
                                    << stop_after << " completions, seed " << seed) {
            fault_layout layout;
            std::string path;
            sharer_stats st;
            int client_status = -1;
            {
                sharer s;
                s.start_background();
                make_shares(s, layout);
                path = s.address();
                auto up = t::make_pipe();
                auto client = t::fork_child([&] {
                    up.first.reset();
                    const int before = t::open_fd_count();
                    {
                        asio::io_context io(1);
                        fetch_all(io, layout, [&](std::size_t done) {
                            if (done != stop_after) return;
                            t::send_byte(up.second.get());
                            if (stalled) std::this_thread::sleep_for(std::chrono::milliseconds(400));
                        });
                        io.run_for(std::chrono::seconds(20));
                    }
                    up.second.reset();
                    return t::open_fd_count() + 1 == before ? 0 : 70;  // + the pipe end closed
                });
                up.second.reset();
                BOOST_REQUIRE(t::wait_byte(up.first.get()));
                s.stop(stalled ? std::chrono::milliseconds(100) : std::chrono::seconds(2));
                st = s.stats();
                BOOST_TEST(s.pending() == 0u);
                std::error_code ec;
                unique_fd again = t::make_memfd("after stop");
                (void)s.share(again.get(), ec);
                BOOST_TEST((ec == std::errc::operation_not_permitted));
                struct stat gone {};
                BOOST_TEST(::lstat(path.c_str(), &gone) != 0);
                // Nothing is fetchable any more.
                for (std::size_t i = 0; i < share_count; i += 40) BOOST_TEST(survivor_fetch(layout, i).ec);
                client_status = client.wait();
            }
            BOOST_TEST(client_status == 0);  // every fetch finished; the client leaked nothing
            const std::size_t received = count_state(layout, 1);
            BOOST_TEST(count_state(layout, 0) == 0u);
            BOOST_TEST(count_wrong(layout) == 0u);
            BOOST_TEST(count_disallowed_errors(layout, true) == 0u, "errors:" << error_summary(layout));
            BOOST_TEST(received >= stop_after);
            if (stalled)
                BOOST_TEST(st.delivered <= received);
            else
                BOOST_TEST(st.delivered == received);  // confirmations had time to arrive
            std::printf(
                "sharer fault, stop (%s, timeout %s, after %zu completions): client received %zu "
                "whole, server counted %llu delivered (%zu received after the server closed its "
                "copies), %zu failed:%s\n",
                stalled ? "stalled client" : "active client", stalled ? "100 ms" : "2 s", stop_after,
                received, static_cast<unsigned long long>(st.delivered),
                received - std::min<std::size_t>(received, st.delivered), share_count - received,
                error_summary(layout).c_str());
        }
        BOOST_TEST(t::open_fd_count() == fds_before);  // every copy closed, the server thread gone
    }
    std::printf("sharer fault, stop: %zu rounds (seed %llu) in %.2f s\n", rounds,
                static_cast<unsigned long long>(seed), t::seconds_since(start));
    (void)std::fflush(stdout);
    t::check_shm_unchanged(shm_before);
}

namespace {

struct rlimit_report {
    std::int32_t ok = 0;
    std::int32_t truncated = 0;
    std::int32_t other_errors = 0;
    std::int32_t inexact = 0;
    std::int32_t refetched_ok = 0;
    std::int32_t fd_growth = -1;
};

}  // namespace

// Complements sharer_security_test's control_truncated_at_a_tiny_rlimit_gives_the_share_back (one
// fetch, a fresh process fetches the share back): here the receiver runs out of descriptors in the
// middle of a pipeline of 210 fetches on its pooled connection, keeping what it receives. Each fetch
// ends whole or with errc::control_truncated (nothing in between, nothing else), every truncated
// share goes back to the cache and is fetched whole by the same process over the same connection
// once it has room again, and neither side leaks a descriptor.
BOOST_AUTO_TEST_CASE(receiver_reaching_rlimit_mid_pipeline,
                     *boost::unit_test::precondition(t::io_uring_available) *
                         boost::unit_test::precondition(t::not_under_valgrind)) {
    constexpr std::size_t singles = 200, groups = 10, group_size = 20, room = 25;
    const auto shm_before = t::shm_entries();
    const int fds_before = t::open_fd_count();
    t::shared_array<rlimit_report> report(1);
    {
        sharer s;
        s.start_background();
        std::vector<share_id> ids;
        std::vector<std::vector<ino_t>> inodes;
        for (std::size_t i = 0; i < singles + groups; ++i) {
            std::vector<unique_fd> files;
            std::vector<int> numbers;
            inodes.emplace_back();
            // A group every 21 shares, so that one arrives when the table has room for only part
            // of it (the kernel installs what fits and reports MSG_CTRUNC).
            for (std::size_t k = 0; k < (i % 21 == 10 ? group_size : 1); ++k) {
                files.emplace_back(::memfd_create("steward-rlimit", MFD_CLOEXEC));
                BOOST_REQUIRE(files.back());
                inodes.back().push_back(inode_of(files.back().get()));
                numbers.push_back(files.back().get());
            }
            ids.push_back(s.share(numbers));
        }
        unique_fd warm_file = t::make_memfd("warm");
        const share_id warm = s.share(warm_file.get());
        warm_file.reset();

        auto child = t::fork_child([&] {
            rlimit_report& r = report[0];
            asio::io_context io(1);
            const asio::any_io_executor ex = io.get_executor();
            auto exact = [&](std::size_t i, const std::vector<unique_fd>& fds) {
                if (fds.size() != inodes[i].size()) return false;
                for (std::size_t k = 0; k < fds.size(); ++k)
                    if (inode_of(fds[k].get()) != inodes[i][k]) return false;
                return true;
            };
            std::error_code warm_ec;
            async_fetch(ex, warm, [&](std::error_code ec, std::vector<unique_fd>) { warm_ec = ec; });
            io.run_for(std::chrono::seconds(10));
            io.restart();
            if (warm_ec) return 40;  // the pooled connection is up before the limit is lowered
            const int before = t::open_fd_count();

            // Fill the holes below the highest descriptor, then allow `room` more.
            rlimit old{};
            ::getrlimit(RLIMIT_NOFILE, &old);
            int highest = 0;
            for (int fd = 0; fd < static_cast<int>(old.rlim_cur); ++fd)
                if (::fcntl(fd, F_GETFD) >= 0) highest = fd;
            std::vector<unique_fd> fillers;
            for (int fd = 0; fd < highest; ++fd)
                if (::fcntl(fd, F_GETFD) < 0 && ::dup3(2, fd, O_CLOEXEC) == fd) fillers.emplace_back(fd);
            rlimit low = old;
            low.rlim_cur = static_cast<rlim_t>(highest) + 1 + room;
            if (::setrlimit(RLIMIT_NOFILE, &low) != 0) return 41;

            std::vector<unique_fd> kept;  // what arrives stays open: the table fills up
            std::vector<std::size_t> truncated;
            for (std::size_t i = 0; i < ids.size(); ++i)
                async_fetch(ex, ids[i], [&, i](std::error_code ec, std::vector<unique_fd> fds) {
                    if (!ec) {
                        ++r.ok;
                        r.inexact += !exact(i, fds);
                        for (auto& f : fds) kept.push_back(std::move(f));
                    } else if (ec == errc::control_truncated) {
                        ++r.truncated;
                        truncated.push_back(i);
                    } else {
                        ++r.other_errors;
                        std::fprintf(stderr, "fetch %zu: %s\n", i, ec.message().c_str());
                    }
                    r.inexact += ec && !fds.empty();  // an error hands over nothing
                });
            io.run_for(std::chrono::seconds(20));
            io.restart();

            // Room again: the truncated shares, fetched again on the same connection.
            kept.clear();
            if (::setrlimit(RLIMIT_NOFILE, &old) != 0) return 42;
            for (std::size_t i : truncated)
                async_fetch(ex, ids[i], [&, i](std::error_code ec, std::vector<unique_fd> fds) {
                    if (!ec && exact(i, fds)) ++r.refetched_ok;
                });
            io.run_for(std::chrono::seconds(20));
            fillers.clear();
            r.fd_growth = t::open_fd_count() - before;
            return 0;
        });
        BOOST_TEST(child.wait() == 0);
        const rlimit_report& r = report[0];
        const auto total = static_cast<std::int32_t>(ids.size());
        BOOST_TEST(r.ok + r.truncated == total);
        BOOST_TEST(r.other_errors == 0);
        BOOST_TEST(r.ok >= 1);
        BOOST_TEST(r.truncated >= 1);  // the limit was really reached
        BOOST_TEST(r.inexact == 0);
        BOOST_TEST(r.refetched_ok == r.truncated);
        BOOST_TEST(r.fd_growth == 0);
        BOOST_TEST(t::wait_for_condition([&] { return s.pending() == 0; }, std::chrono::seconds(5)));
        const sharer_stats st = s.stats();
        BOOST_TEST(st.delivered == ids.size() + 1);
        BOOST_TEST(st.returned == static_cast<std::uint64_t>(r.truncated));
        BOOST_TEST(st.connections_accepted == 1u);  // the truncations did not cost the connection
        std::printf(
            "sharer fault, receiver at RLIMIT_NOFILE mid-pipeline: %d of %d fetches whole, %d "
            "control_truncated and given back, all %d fetched whole again on the same connection, "
            "other errors %d, server returned %llu, connections %llu\n",
            r.ok, total, r.truncated, r.refetched_ok, r.other_errors,
            static_cast<unsigned long long>(st.returned),
            static_cast<unsigned long long>(st.connections_accepted));
        (void)std::fflush(stdout);
    }
    BOOST_TEST(t::open_fd_count() == fds_before);
    t::check_shm_unchanged(shm_before);
}
