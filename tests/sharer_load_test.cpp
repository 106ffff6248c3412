#define BOOST_TEST_MODULE sharer_load_test
#include "support/test_support.hpp"

#include "support/fd_test_support.hpp"
#include "support/reliability_support.hpp"

#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/sharer.hpp>

#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

// Issue 6, load: 64 client processes x 10,000 fetches against one sharer process (every id served
// exactly once, no fd growth anywhere), and a flood of 10,000 connections that never finish the
// handshake while an honest client keeps fetching.

using namespace steward;
namespace t = steward::test;
using clock_type = std::chrono::steady_clock;
using local_socket = asio::local::stream_protocol::socket;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

namespace {

struct address_slot {
    char text[128];
};

void publish_address(address_slot& slot, const std::string& address) {
    std::memset(slot.text, 0, sizeof slot.text);
    std::memcpy(slot.text, address.data(), std::min(address.size(), sizeof slot.text - 1));
}

void record_message(char (&dst)[160], const std::string& text) {
    if (dst[0] != 0) return;  // the first one is the interesting one
    (void)std::snprintf(dst, sizeof dst, "%s", text.c_str());
}

ino_t inode_of(int fd) {
    struct stat st {};
    return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

void put_key(std::vector<std::byte>& out, const share_key& key) {
    const std::size_t at = out.size();
    out.resize(at + 16);
    std::memcpy(out.data() + at, &key.high, 8);
    std::memcpy(out.data() + at + 8, &key.low, 8);
}

share_key get_key(const std::byte* p) {
    share_key key;
    std::memcpy(&key.high, p, 8);
    std::memcpy(&key.low, p + 8, 8);
    return key;
}

// ---------------------------------------------------------------------------------------------
// 64 processes x 10,000 fetches

// Per client: shares handed out at once at most (credit-based), so the server never holds more
// than clients x window descriptors (well below RLIMIT_NOFILE) while 640k shares go through.
// 64 x 128 = 8192 at most; less where RLIMIT_NOFILE's hard limit is too low for that.
std::size_t load_window(std::size_t clients) {
    const auto room = static_cast<std::size_t>(t::raise_nofile_limit());
    return std::clamp<std::size_t>(room > 512 ? (room - 512) / clients : 1, 1, 128);
}

struct load_client_report {
    std::uint64_t fetched = 0;
    std::uint64_t errors = 0;
    std::int64_t fds_before = -1;
    std::int64_t fds_after = -1;
    std::int64_t fds_peak = -1;
    char first_error[160];
};

struct load_server_report {
    sharer_stats stats;
    std::uint64_t issued = 0;
    std::uint64_t failures = 0;
    char first_error[160];
};

// One per client, in the server: shares a window of fresh memfds (recording each one's inode),
// sends their keys, then tops up as the client returns credits (uint32 counts).
asio::awaitable<void> feed_client(sharer& s, local_socket& sock, ino_t* issued, std::size_t n,
                                  std::size_t window, load_server_report& report) {
    std::size_t done = 0;
    std::size_t credit = window;
    std::vector<std::byte> out;
    std::array<std::byte, 4096> in{};
    std::size_t have = 0;
    while (done < n) {
        const std::size_t batch = std::min(credit, n - done);
        out.clear();
        for (std::size_t k = 0; k < batch; ++k) {
            unique_fd memfd(::memfd_create("steward-load", MFD_CLOEXEC));
            if (!memfd) {
                ++report.failures;
                record_message(report.first_error, std::string("memfd_create: ") + std::strerror(errno));
                co_return;
            }
            issued[done] = inode_of(memfd.get());
            std::error_code ec;
            const share_id id = s.share(memfd.get(), ec);
            if (ec) {
                ++report.failures;
                record_message(report.first_error, "share: " + ec.message());
                co_return;
            }
            put_key(out, id.key());
            ++done;
        }
        credit -= batch;
        report.issued += batch;
        if (!out.empty()) {
            auto [wec, wn] = co_await asio::async_write(sock, asio::buffer(out), use_tuple);
            (void)wn;
            if (wec) {
                ++report.failures;
                record_message(report.first_error, "feed write: " + wec.message());
                co_return;
            }
        }
        while (credit == 0 && done < n) {
            auto [rec, rn] =
                co_await sock.async_read_some(asio::buffer(in.data() + have, in.size() - have), use_tuple);
            if (rec) {
                ++report.failures;
                record_message(report.first_error, "credit read: " + rec.message());
                co_return;
            }
            have += rn;
            std::size_t used = 0;
            for (; used + 4 <= have; used += 4) {
                std::uint32_t c = 0;
                std::memcpy(&c, in.data() + used, 4);
                credit += c;
            }
            std::memmove(in.data(), in.data() + used, have - used);
            have -= used;
        }
    }
}

int run_load_server(std::vector<unique_fd>& server_ends, t::shared_array<ino_t>& issued, std::size_t n,
                    address_slot& address, load_server_report& report, int to_parent, int from_parent) {
    t::raise_nofile_limit();
    asio::io_context io(1);
    std::vector<std::unique_ptr<local_socket>> socks;
    {
        sharer s(io.get_executor());
        // The listener starts with the first share; nothing stays pending.
        {
            unique_fd probe = t::make_memfd("probe");
            const share_id id = s.share(probe.get());
            if (!s.revoke(id)) return 10;
        }
        publish_address(address, s.address());
        for (auto& fd : server_ends) {
            socks.push_back(std::make_unique<local_socket>(io));
            socks.back()->assign(asio::local::stream_protocol(), fd.release());
        }
        io.poll();  // the acceptor is set up on the strand
        io.restart();
        // The parent counts this process's descriptors now (the baseline), then says go.
        if (!t::send_byte(to_parent, 'r') || !t::wait_byte(from_parent)) return 11;

        int feeders_left = static_cast<int>(socks.size());
        const std::size_t window = load_window(socks.size());
        for (std::size_t i = 0; i < socks.size(); ++i)
            asio::co_spawn(io, feed_client(s, *socks[i], &issued[i * n], n, window, report),
                           [&](const std::exception_ptr&) { --feeders_left; });
        bool settled = false;
        asio::co_spawn(
            io,
            [&]() -> asio::awaitable<void> {
                // Settled: every share delivered and confirmed, every client connection gone.
                const auto limit = clock_type::now() + std::chrono::seconds(50);
                for (;;) {
                    const sharer_stats st = s.stats();
                    if (feeders_left == 0 && st.pending == 0 && st.connections_open == 0) break;
                    if (clock_type::now() > limit) break;
                    asio::steady_timer timer(io, std::chrono::milliseconds(5));
                    co_await timer.async_wait(use_tuple);
                }
                report.stats = s.stats();
                settled = true;
                // The parent counts descriptors again, then lets the server stop.
                if (t::send_byte(to_parent, 's')) (void)t::wait_byte(from_parent);
                co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
                io.stop();
            },
            asio::detached);
        io.run_for(std::chrono::seconds(55));
        if (!settled) return 12;
    }
    return report.failures == 0 ? 0 : 13;
}

struct load_client_state {
    std::size_t expected = 0;
    std::size_t keys_seen = 0;
    std::size_t finished = 0;
    std::uint32_t credit_pending = 0;
    bool flushing = false;
};

int run_load_client(unique_fd ctl_fd, const std::string& address, ino_t* received, std::size_t n,
                    load_client_report& report) {
    report.fds_before = t::open_fd_count();
    {
        asio::io_context io(1);
        local_socket ctl(io);
        ctl.assign(asio::local::stream_protocol(), ctl_fd.release());
        load_client_state st;
        st.expected = n;
        const asio::any_io_executor ex = io.get_executor();

        auto flush = [&]() -> asio::awaitable<void> {
            st.flushing = true;
            while (st.credit_pending != 0) {
                std::uint32_t c = std::exchange(st.credit_pending, 0);
                auto [wec, wn] = co_await asio::async_write(ctl, asio::buffer(&c, 4), use_tuple);
                (void)wn;
                if (wec) break;  // the server finished feeding and may be gone: harmless
            }
            st.flushing = false;
        };
        auto fetch_one = [&](share_key key) -> asio::awaitable<void> {
            auto [ec, fds] = co_await async_fetch(ex, share_id(address, key), use_tuple);
            if (ec || fds.size() != 1) {
                ++report.errors;
                record_message(report.first_error,
                               ec ? ec.message() : "wrong descriptor count " + std::to_string(fds.size()));
            } else {
                received[report.fetched++] = inode_of(fds[0].get());
            }
            fds.clear();
            ++st.finished;
            if ((st.finished & 255) == 0)
                report.fds_peak = std::max<std::int64_t>(report.fds_peak, t::open_fd_count());
            ++st.credit_pending;
            if (!st.flushing) asio::co_spawn(io, flush(), asio::detached);
        };
        asio::co_spawn(
            io,
            [&]() -> asio::awaitable<void> {
                std::vector<std::byte> buf(std::size_t{16} * 512);
                std::size_t have = 0;
                while (st.keys_seen < st.expected) {
                    auto [ec, got] = co_await ctl.async_read_some(
                        asio::buffer(buf.data() + have, buf.size() - have), use_tuple);
                    if (ec) {
                        ++report.errors;
                        record_message(report.first_error, "key stream: " + ec.message());
                        co_return;
                    }
                    have += got;
                    std::size_t used = 0;
                    for (; used + 16 <= have && st.keys_seen < st.expected; used += 16) {
                        ++st.keys_seen;
                        asio::co_spawn(io, fetch_one(get_key(buf.data() + used)), asio::detached);
                    }
                    std::memmove(buf.data(), buf.data() + used, have - used);
                    have -= used;
                }
            },
            asio::detached);
        io.run_for(std::chrono::seconds(50));
        if (st.finished != n) record_message(report.first_error, "not every fetch finished in time");
    }
    report.fds_after = t::open_fd_count();
    // The control socket was counted before and is closed now.
    return report.fetched == n && report.errors == 0 && report.fds_after + 1 == report.fds_before ? 0 : 20;
}

}  // namespace

BOOST_AUTO_TEST_CASE(load_64_processes_fetch_with_coroutines,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    constexpr std::size_t clients = 64;
    // Full size under sanitizers too: the work is mostly the kernel's, ASan+UBSan took 7.4 s for
    // the 640,000 fetches here. STEWARD_LOAD_SCALE=0.1 (for example) runs a tenth.
    const double scale = t::load_scale(1.0);
    const std::size_t n = std::max<std::size_t>(100, static_cast<std::size_t>(std::lround(10000 * scale)));
    BOOST_TEST_MESSAGE("sharer load: scale " << scale << (t::sanitized_build ? " (sanitizer build)" : "")
                                             << ": " << clients << " processes x " << n << " fetches");
    t::raise_nofile_limit();
    (void)authkey::family();  // one family key, inherited by every process forked below
    const auto shm_before = t::shm_entries();
    const int fds_before = t::open_fd_count();
    {
        t::shared_array<ino_t> issued(clients * n);
        t::shared_array<ino_t> received(clients * n);
        t::shared_array<load_client_report> client_reports(clients);
        t::shared_array<load_server_report> server_report(1);
        t::shared_array<address_slot> address(1);

        std::vector<unique_fd> server_ends, client_ends;
        for (std::size_t i = 0; i < clients; ++i) {
            auto a_b_pair = t::socket_pair();
            unique_fd a = std::move(a_b_pair.first);
            unique_fd b = std::move(a_b_pair.second);
            server_ends.push_back(std::move(a));
            client_ends.push_back(std::move(b));
        }
        auto up_r_up_w_pair = t::make_pipe();
        unique_fd up_r = std::move(up_r_up_w_pair.first);
        unique_fd up_w = std::move(up_r_up_w_pair.second);
        auto down_r_down_w_pair = t::make_pipe();
        unique_fd down_r = std::move(down_r_down_w_pair.first);
        unique_fd down_w = std::move(down_r_down_w_pair.second);

        auto server = t::fork_child([&] {
            client_ends.clear();
            up_r.reset();
            down_w.reset();
            return run_load_server(server_ends, issued, n, address[0], server_report[0], up_w.get(),
                                   down_r.get());
        });
        server_ends.clear();
        up_w.reset();
        down_r.reset();
        BOOST_REQUIRE_MESSAGE(t::wait_byte(up_r.get()), "the server process did not start");
        const std::string path = address[0].text;
        const int server_fds_before = t::fd_count_of(server.pid());
        BOOST_REQUIRE(t::send_byte(down_w.get()));

        const auto start = clock_type::now();
        std::vector<t::child_process> children;
        for (std::size_t i = 0; i < clients; ++i) {
            children.push_back(t::fork_child([&, i] {
                unique_fd mine = std::move(client_ends[i]);
                client_ends.clear();
                up_r.reset();
                down_w.reset();
                return run_load_client(std::move(mine), path, &received[i * n], n, client_reports[i]);
            }));
            client_ends[i].reset();
        }
        int failed_children = 0;
        for (auto& c : children) failed_children += c.wait() != 0;
        const double elapsed = t::seconds_since(start);
        BOOST_TEST(failed_children == 0);

        BOOST_REQUIRE_MESSAGE(t::wait_byte(up_r.get()), "the server did not report back");
        const int server_fds_after = t::fd_count_of(server.pid());
        BOOST_TEST(server_fds_after == server_fds_before);
        BOOST_REQUIRE(t::send_byte(down_w.get()));
        BOOST_TEST(server.wait() == 0);

        const load_server_report& sr = server_report[0];
        BOOST_TEST(sr.failures == 0u, sr.first_error);
        BOOST_REQUIRE(sr.issued == clients * n);
        std::uint64_t fetched = 0, errors = 0;
        std::int64_t client_growth = 0, client_peak_extra = 0;
        for (std::size_t i = 0; i < clients; ++i) {
            const load_client_report& r = client_reports[i];
            fetched += r.fetched;
            errors += r.errors;
            if (r.errors) BOOST_TEST_MESSAGE("client " << i << ": " << r.first_error);
            client_growth = std::max(client_growth, r.fds_after + 1 - r.fds_before);
            client_peak_extra = std::max(client_peak_extra, r.fds_peak - r.fds_before);
        }
        BOOST_TEST(errors == 0u);
        BOOST_TEST(fetched == clients * n);
        BOOST_TEST(client_growth == 0);

        // Every id served exactly once: what each client received is exactly what was shared for
        // it (each share a distinct memfd), nothing twice, nothing missing.
        std::size_t duplicates = 0, mismatched_clients = 0;
        {
            std::vector<ino_t> all(issued.begin(), issued.end());
            std::sort(all.begin(), all.end());
            BOOST_REQUIRE_MESSAGE(std::adjacent_find(all.begin(), all.end()) == all.end(),
                                  "the shared memfds are not distinct: the check below would be void");
            std::vector<ino_t> got(received.begin(), received.end());
            std::sort(got.begin(), got.end());
            for (std::size_t i = 1; i < got.size(); ++i) duplicates += got[i] == got[i - 1];
            for (std::size_t i = 0; i < clients; ++i) {
                std::vector<ino_t> a(&issued[i * n], &issued[i * n] + n);
                std::vector<ino_t> b(&received[i * n], &received[i * n] + n);
                std::sort(a.begin(), a.end());
                std::sort(b.begin(), b.end());
                mismatched_clients += a != b;
            }
        }
        BOOST_TEST(duplicates == 0u);
        BOOST_TEST(mismatched_clients == 0u);

        const sharer_stats& st = sr.stats;
        BOOST_TEST(st.requests == clients * n);
        BOOST_TEST(st.delivered == clients * n);
        BOOST_TEST(st.refused_requests == 0u);
        BOOST_TEST(st.returned == 0u);
        BOOST_TEST(st.pending == 0u);
        BOOST_TEST(st.connections_accepted == clients);  // one pooled connection per process
        BOOST_TEST(st.connections_open == 0u);

        std::printf(
            "sharer load: scale %g%s, %zu processes x %zu fetches = %llu fetches in %.2f s "
            "(%.0f fetch/s), errors %llu, duplicates %zu, missing %llu, server fds %d -> %d, "
            "client fd growth %lld (peak +%lld while running), connections accepted %llu\n",
            scale, t::sanitized_build ? " (sanitizer build)" : "", clients, n,
            static_cast<unsigned long long>(fetched), elapsed, static_cast<double>(fetched) / elapsed,
            static_cast<unsigned long long>(errors), duplicates,
            static_cast<unsigned long long>(clients * n - std::min<std::uint64_t>(fetched, clients * n)),
            server_fds_before, server_fds_after, static_cast<long long>(client_growth),
            static_cast<long long>(client_peak_extra),
            static_cast<unsigned long long>(st.connections_accepted));
        (void)std::fflush(stdout);
        struct stat gone {};
        BOOST_TEST(::lstat(path.c_str(), &gone) != 0);  // the socket went with stop()
    }
    BOOST_TEST(t::open_fd_count() == fds_before);
    t::check_shm_unchanged(shm_before);
}

// ---------------------------------------------------------------------------------------------
// A flood of connections that never finish the handshake, with an honest client fetching
// throughout.

namespace {

constexpr std::size_t honest_shares = 3000;
// 10,000, or fewer where RLIMIT_NOFILE's hard limit cannot hold them (the server holds the flood
// and the honest shares at once); the figures printed say which ran.
const std::size_t flood_connections = [] {
    const auto room = static_cast<std::size_t>(t::raise_nofile_limit());
    const std::size_t need_extra = honest_shares + 512;
    return room >= 10000 + need_extra ? std::size_t{10000}
                                      : std::max<std::size_t>(64, room > need_extra ? room - need_extra : 0);
}();
// The flood's handshake deadline (sharer_options::handshake_timeout): short, so the test is too,
// but long enough that its half stays a generous bound on a loaded 2-core CI machine (with both
// cores kept busy by other processes, honest fetches took at most 0.24 s here).
constexpr auto flood_deadline = std::chrono::milliseconds(3000);
// At the connection limit a new connection evicts one that has been in its handshake this long.
constexpr auto flood_stall_age = flood_deadline / 10;
// Functional bound on each honest fetch during the flood: it completes well before the deadline
// the flood is held to (half of it), i.e. the flood does not hold honest traffic up to its own
// deadline. Not a speed target.
constexpr auto honest_bound = flood_deadline / 2;

struct flood_conn_record {
    std::int64_t connect_ns = 0;
    std::int64_t eof_ns = 0;
    std::int32_t connect_errno = -1;
    std::int32_t got_data = 0;  // bytes (the server's challenge) arrived before EOF
};

enum class honest_kind : std::int32_t { pooled = 0, new_connection = 1 };

struct honest_sample {
    std::int64_t start_ns = 0;
    std::int64_t latency_ns = 0;
    honest_kind kind = honest_kind::pooled;
    std::int32_t error_value = 0;
    std::int32_t error_category = 0;  // 0 success, 1 steward::errc, 2 system, 3 other
    std::int32_t wrong_content = 0;
};

struct flood_control {
    std::int32_t stop_honest = 0;  // written by the parent, read by the honest client
    std::int32_t honest_samples = 0;
    std::int32_t honest_failures_to_start = 0;
};

struct flood_server_report {
    sharer_stats stats;
    std::uint64_t failures = 0;
    char first_error[160];
};

std::int64_t mono_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count();
}

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

int run_flood_server(std::size_t max_connections, t::shared_array<share_key>& keys, address_slot& address,
                     flood_server_report& report, int to_parent, int from_parent) {
    t::raise_nofile_limit();
    sharer_options opts;
    opts.handshake_timeout = flood_deadline;
    opts.max_connections = max_connections;
    sharer s(opts);
    s.start_background();
    {
        // One whole fetch (from this process) first: everything the server creates once (listener,
        // timers, the blocking fetch's ring here) exists before the baseline is counted.
        unique_fd probe = t::make_memfd("probe");
        std::error_code ec;
        const std::vector<unique_fd> got = fetch(s.share(probe.get()), ec);
        if (ec || got.size() != 1) return 10;
    }
    publish_address(address, s.address());
    if (!t::wait_for_condition([&] {
            const sharer_stats st = s.stats();
            return st.connections_open == 0 && st.delivered == 1;
        }))
        return 16;
    if (!t::send_byte(to_parent, 'r') || !t::wait_byte(from_parent)) return 11;  // baseline counted
    std::vector<share_id> ids;
    for (std::size_t i = 0; i < keys.size(); ++i) {
        unique_fd memfd = t::make_memfd("honest " + std::to_string(i));
        std::error_code ec;
        ids.push_back(s.share(memfd.get(), ec));
        if (ec) {
            ++report.failures;
            record_message(report.first_error, "share: " + ec.message());
            return 12;
        }
        keys[i] = ids.back().key();
    }
    if (!t::send_byte(to_parent, 'k') || !t::wait_byte(from_parent)) return 13;  // parent: finish
    for (const share_id& id : ids) (void)s.revoke(id);
    if (!t::wait_for_condition([&] {
            const sharer_stats st = s.stats();
            return st.pending == 0 && st.connections_open == 0;
        })) {
        ++report.failures;
        record_message(report.first_error, "connections or shares left after the flood");
    }
    report.stats = s.stats();
    if (!t::send_byte(to_parent, 's') || !t::wait_byte(from_parent)) return 14;  // counted again
    s.stop(std::chrono::seconds(1));
    return report.failures == 0 ? 0 : 15;
}

// Fetches the honest shares one at a time until told to stop, alternating a fetch on the pooled
// connection (set up before the flood) and a blocking fetch() that connects anew each time.
int run_honest_client(const t::shared_array<share_key>& keys, const std::string& path,
                      t::shared_array<honest_sample>& samples, flood_control& control, int to_parent) {
    asio::io_context io(1);
    const asio::any_io_executor ex = io.get_executor();
    auto pooled_fetch = [&](const share_id& id, std::error_code& ec) {
        std::vector<unique_fd> out;
        bool done = false;
        async_fetch(ex, id, [&](std::error_code e, std::vector<unique_fd> fds) {
            ec = e;
            out = std::move(fds);
            done = true;
        });
        io.restart();
        io.run_for(std::chrono::seconds(20));
        if (!done) ec = make_error_code(errc::timed_out);
        return out;
    };
    std::size_t next = 0;
    {
        std::error_code ec;
        auto fds = pooled_fetch(share_id(path, keys[next++]), ec);
        if (ec || fds.size() != 1) return 30;  // the pooled connection is up before the flood
    }
    if (!t::send_byte(to_parent, 'w')) return 31;
    std::size_t count = 0;
    while (next < keys.size() && count < samples.size() &&
           std::atomic_ref<std::int32_t>(control.stop_honest).load() == 0) {
        const std::size_t index = next++;
        honest_sample& sample = samples[count];
        sample.kind = count % 2 == 0 ? honest_kind::pooled : honest_kind::new_connection;
        const share_id id(path, keys[index]);
        std::error_code ec;
        sample.start_ns = mono_ns();
        std::vector<unique_fd> fds =
            sample.kind == honest_kind::pooled ? pooled_fetch(id, ec) : fetch(id, ec);
        sample.latency_ns = mono_ns() - sample.start_ns;
        sample.error_value = ec.value();
        sample.error_category = category_tag(ec);
        if (!ec && (fds.size() != 1 || t::read_contents(fds[0].get()) != "honest " + std::to_string(index)))
            sample.wrong_content = 1;
        ++count;
        std::atomic_ref<std::int32_t>(control.honest_samples).store(static_cast<std::int32_t>(count));
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return 0;
}

// Opens the flood: blocking connects (an AF_UNIX connect waits while the listener's backlog is
// full), half of them then send 3 bytes of a frame header, none ever finishes the handshake.
// Then drains every socket until EOF, recording when each one was closed.
int run_flooder(const std::string& path, t::shared_array<flood_conn_record>& conns, int to_parent) {
    t::raise_nofile_limit();
    unique_fd ep(::epoll_create1(EPOLL_CLOEXEC));
    if (!ep) return 40;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    std::vector<unique_fd> socks(conns.size());
    std::size_t open = 0;
    auto open_one = [&](std::size_t i) {
        unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!fd) {
            conns[i].connect_errno = errno;
            return true;
        }
        if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
            conns[i].connect_errno = errno;
            return true;
        }
        conns[i].connect_ns = mono_ns();
        conns[i].connect_errno = 0;
        if (i % 2 == 1) {
            const char partial[3] = {0, 0, 0};
            (void)::send(fd.get(), partial, sizeof partial, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.u64 = i;
        if (::epoll_ctl(ep.get(), EPOLL_CTL_ADD, fd.get(), &ev) != 0) return false;
        socks[i] = std::move(fd);
        ++open;
        return true;
    };
    // A second, small wave 300 ms later takes any slot an honest connection freed meanwhile (an
    // honest connect racing the first wave can hold one of the limit's slots until it is done).
    const std::size_t second_wave = std::min<std::size_t>(64, conns.size() / 4);
    const std::size_t first_wave = conns.size() - second_wave;
    for (std::size_t i = 0; i < first_wave; ++i)
        if (!open_one(i)) return 41;
    if (!t::send_byte(to_parent, 'o')) return 42;
    const auto second_wave_at = clock_type::now() + std::chrono::milliseconds(300);
    const auto deadline = clock_type::now() + std::chrono::seconds(30);
    std::array<epoll_event, 512> events{};
    bool second_wave_open = second_wave == 0;
    while ((open > 0 || !second_wave_open) && clock_type::now() < deadline) {
        if (!second_wave_open && clock_type::now() >= second_wave_at) {
            for (std::size_t i = first_wave; i < conns.size(); ++i)
                if (!open_one(i)) return 43;
            second_wave_open = true;
        }
        const int n = ::epoll_wait(ep.get(), events.data(), static_cast<int>(events.size()), 100);
        for (int k = 0; k < n; ++k) {
            const auto i = static_cast<std::size_t>(events[static_cast<std::size_t>(k)].data.u64);
            if (!socks[i]) continue;
            for (;;) {
                char buf[512];
                const ssize_t got = ::recv(socks[i].get(), buf, sizeof buf, MSG_DONTWAIT);
                if (got > 0) {
                    conns[i].got_data = 1;
                    continue;
                }
                if (got < 0 && (errno == EAGAIN || errno == EINTR)) break;
                conns[i].eof_ns = mono_ns();  // EOF or reset: the server closed it
                socks[i].reset();
                --open;
                break;
            }
        }
    }
    return 0;
}

struct flood_outcome {
    std::size_t connected = 0, eof = 0, held = 0, closed_at_once = 0, evicted = 0;
    double min_hold_s = 1e9, max_hold_s = 0, max_close_at_once_s = 0, min_evicted_s = 1e9;
    int server_fds_baseline = 0, server_fds_peak = 0, server_fds_end = 0;
    sharer_stats stats;
    std::vector<honest_sample> honest;
    std::int64_t flood_start_ns = 0, flood_end_ns = 0;
    std::int64_t first_wave_open_ns = 0;  // when the flooder had opened its first wave
    double seconds = 0;
};

flood_outcome run_flood(std::size_t max_connections) {
    flood_outcome out;
    t::raise_nofile_limit();
    (void)authkey::family();
    t::shared_array<share_key> keys(honest_shares);
    t::shared_array<address_slot> address(1);
    t::shared_array<flood_server_report> server_report(1);
    t::shared_array<flood_conn_record> conns(flood_connections);
    t::shared_array<honest_sample> samples(honest_shares);
    t::shared_array<flood_control> control(1);
    auto srv_up_r_srv_up_w_pair = t::make_pipe();
    unique_fd srv_up_r = std::move(srv_up_r_srv_up_w_pair.first);
    unique_fd srv_up_w = std::move(srv_up_r_srv_up_w_pair.second);
    auto srv_down_r_srv_down_w_pair = t::make_pipe();
    unique_fd srv_down_r = std::move(srv_down_r_srv_down_w_pair.first);
    unique_fd srv_down_w = std::move(srv_down_r_srv_down_w_pair.second);
    auto honest_up_r_honest_up_w_pair = t::make_pipe();
    unique_fd honest_up_r = std::move(honest_up_r_honest_up_w_pair.first);
    unique_fd honest_up_w = std::move(honest_up_r_honest_up_w_pair.second);
    auto flood_up_r_flood_up_w_pair = t::make_pipe();
    unique_fd flood_up_r = std::move(flood_up_r_flood_up_w_pair.first);
    unique_fd flood_up_w = std::move(flood_up_r_flood_up_w_pair.second);

    auto server = t::fork_child([&] {
        srv_up_r.reset();
        srv_down_w.reset();
        return run_flood_server(max_connections, keys, address[0], server_report[0], srv_up_w.get(),
                                srv_down_r.get());
    });
    srv_up_w.reset();
    srv_down_r.reset();
    BOOST_REQUIRE_MESSAGE(t::wait_byte(srv_up_r.get()), "flood server did not start");
    const std::string path = address[0].text;
    out.server_fds_baseline = t::fd_count_of(server.pid());
    BOOST_REQUIRE(t::send_byte(srv_down_w.get()));
    BOOST_REQUIRE_MESSAGE(t::wait_byte(srv_up_r.get()), "flood server did not share");

    auto honest = t::fork_child([&] {
        srv_up_r.reset();
        srv_down_w.reset();
        honest_up_r.reset();
        flood_up_r.reset();
        flood_up_w.reset();
        return run_honest_client(keys, path, samples, control[0], honest_up_w.get());
    });
    honest_up_w.reset();
    BOOST_REQUIRE_MESSAGE(t::wait_byte(honest_up_r.get()), "honest client did not connect");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // honest traffic before the flood

    const auto start = clock_type::now();
    out.flood_start_ns = mono_ns();
    auto flooder = t::fork_child([&] {
        srv_up_r.reset();
        srv_down_w.reset();
        honest_up_r.reset();
        flood_up_r.reset();
        return run_flooder(path, conns, flood_up_w.get());
    });
    flood_up_w.reset();
    // The server's descriptors while the flood lasts (sampled until the flooder is done).
    std::atomic<bool> flood_over{false};
    std::atomic<int> peak{0};
    std::thread sampler([&, server_pid = server.pid()] {
        while (!flood_over.load()) {
            peak.store(std::max(peak.load(), t::fd_count_of(server_pid)));
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
    });
    const bool opened = t::wait_byte(flood_up_r.get());
    out.first_wave_open_ns = mono_ns();
    const int flooder_status = flooder.wait();
    flood_over.store(true);
    sampler.join();
    out.server_fds_peak = peak.load();
    BOOST_REQUIRE_MESSAGE(opened, "flooder did not open its connections");
    BOOST_TEST(flooder_status == 0);
    out.flood_end_ns = mono_ns();
    out.seconds = t::seconds_since(start);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // honest traffic after the flood
    std::atomic_ref<std::int32_t>(control[0].stop_honest).store(1);
    BOOST_TEST(honest.wait() == 0);

    BOOST_REQUIRE(t::send_byte(srv_down_w.get()));  // finish
    BOOST_REQUIRE_MESSAGE(t::wait_byte(srv_up_r.get()), "flood server did not settle");
    out.server_fds_end = t::fd_count_of(server.pid());
    BOOST_REQUIRE(t::send_byte(srv_down_w.get()));
    BOOST_TEST(server.wait() == 0);
    BOOST_TEST(server_report[0].failures == 0u, server_report[0].first_error);
    out.stats = server_report[0].stats;

    const auto deadline_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(flood_deadline).count();
    const std::int64_t early = 20'000'000;  // timers never fire early; allow clock granularity
    const auto stall_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(flood_stall_age).count();
    for (const auto& c : conns) {
        if (c.connect_errno != 0) continue;
        ++out.connected;
        if (c.eof_ns == 0) continue;
        ++out.eof;
        const std::int64_t held_ns = c.eof_ns - c.connect_ns;
        if (held_ns >= deadline_ns - early) {
            ++out.held;
            out.min_hold_s = std::min(out.min_hold_s, static_cast<double>(held_ns) / 1e9);
            out.max_hold_s = std::max(out.max_hold_s, static_cast<double>(held_ns) / 1e9);
        } else if (held_ns >= stall_ns - early) {
            ++out.evicted;  // shut down to make room for a newer connection
            out.min_evicted_s = std::min(out.min_evicted_s, static_cast<double>(held_ns) / 1e9);
        } else {
            ++out.closed_at_once;
            out.max_close_at_once_s = std::max(out.max_close_at_once_s, static_cast<double>(held_ns) / 1e9);
        }
    }
    out.honest.assign(samples.begin(), samples.begin() + control[0].honest_samples);
    return out;
}

struct honest_summary {
    std::size_t during = 0, pooled = 0, fresh = 0, failed = 0, wrong = 0;
    double max_pooled_ms = 0, max_fresh_ms = 0;
    std::map<std::string, std::size_t> errors;  // message -> count (new connections during the flood)
};

honest_summary summarize(const flood_outcome& out) {
    honest_summary s;
    for (const auto& h : out.honest) {
        if (h.start_ns < out.flood_start_ns || h.start_ns > out.flood_end_ns) continue;
        ++s.during;
        const double ms = static_cast<double>(h.latency_ns) / 1e6;
        if (h.kind == honest_kind::pooled) {
            ++s.pooled;
            s.max_pooled_ms = std::max(s.max_pooled_ms, ms);
        } else {
            ++s.fresh;
            s.max_fresh_ms = std::max(s.max_fresh_ms, ms);
        }
        if (h.error_category != 0) {
            ++s.failed;
            ++s.errors[describe(h.error_category, h.error_value)];
        }
        s.wrong += h.wrong_content != 0;
    }
    return s;
}

void print_flood(const char* name, std::size_t max_connections, const flood_outcome& out,
                 const honest_summary& s) {
    std::string errors;
    for (const auto& [msg, count] : s.errors) errors += " [" + std::to_string(count) + "x " + msg + "]";
    std::printf(
        "sharer flood (%s, max_connections %zu, handshake deadline %.1f s): %zu connections flooded, "
        "%zu connected, %zu saw EOF (%zu held until the deadline: %.2f-%.2f s; by EOF time %zu evicted, "
        "after %.2f s or more, and %zu closed at once, within %.3f s), flood over in %.2f s; server fds %d -> "
        "%d during -> %d after; handshake_timeouts %llu, handshakes_evicted %llu, limit_violations "
        "%llu; honest fetches during the flood: %zu "
        "(%zu pooled, max %.1f ms; %zu new connections, max %.1f ms), failed %zu%s\n",
        name, max_connections, std::chrono::duration<double>(flood_deadline).count(), flood_connections,
        out.connected, out.eof, out.held, out.held ? out.min_hold_s : 0.0, out.max_hold_s, out.evicted,
        out.evicted ? out.min_evicted_s : 0.0, out.closed_at_once, out.max_close_at_once_s, out.seconds,
        out.server_fds_baseline, out.server_fds_peak, out.server_fds_end,
        static_cast<unsigned long long>(out.stats.handshake_timeouts),
        static_cast<unsigned long long>(out.stats.handshakes_evicted),
        static_cast<unsigned long long>(out.stats.limit_violations), s.during, s.pooled, s.max_pooled_ms,
        s.fresh, s.max_fresh_ms, s.failed, errors.c_str());
    (void)std::fflush(stdout);
}

}  // namespace

// With a connection limit above the flood, every flood connection is held until the handshake
// deadline and then closed; honest fetches, pooled and on new connections, go on meanwhile.
BOOST_AUTO_TEST_CASE(flood_of_silent_connections_is_closed_at_the_deadline,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const auto shm_before = t::shm_entries();
    const int fds_before = t::open_fd_count();
    const std::size_t limit = flood_connections + 1000;
    const flood_outcome out = run_flood(limit);
    const honest_summary s = summarize(out);
    print_flood("limit above the flood", limit, out, s);

    BOOST_TEST(out.connected == flood_connections);
    BOOST_TEST(out.eof == flood_connections);   // the server closed every one
    BOOST_TEST(out.held == flood_connections);  // and none before the deadline
    BOOST_TEST(out.max_hold_s < std::chrono::duration<double>(flood_deadline).count() + 5.0);
    BOOST_TEST(out.stats.handshake_timeouts == flood_connections);
    BOOST_TEST(out.stats.limit_violations == 0u);
    BOOST_TEST(out.stats.handshakes_evicted == 0u);  // never at the limit
    BOOST_TEST(out.server_fds_peak >= out.server_fds_baseline + static_cast<int>(flood_connections));
    BOOST_TEST(out.server_fds_end == out.server_fds_baseline);
    BOOST_TEST(out.stats.connections_open == 0u);

    BOOST_TEST(s.during >= 10u, "honest fetches during the flood: " << s.during);
    BOOST_TEST(s.pooled >= 1u);
    BOOST_TEST(s.fresh >= 1u);
    BOOST_TEST(s.failed == 0u);
    BOOST_TEST(s.wrong == 0u);
    const double bound_ms = std::chrono::duration<double, std::milli>(honest_bound).count();
    BOOST_TEST(s.max_pooled_ms < bound_ms);
    BOOST_TEST(s.max_fresh_ms < bound_ms);
    for (const auto& h : out.honest)
        BOOST_TEST(h.error_category == 0, describe(h.error_category, h.error_value));

    BOOST_TEST(t::open_fd_count() == fds_before);
    t::check_shm_unchanged(shm_before);
}

// With the default connection limit (1024) below the flood: the first connections fill the limit,
// the others are closed at once. An honest client's established (pooled) connection keeps being
// served. A new honest connection made while the limit is full and every silent connection is
// younger than a tenth of the deadline is refused like a flood connection (fetch.hpp documents
// that refusal as errc::limit_exceeded); later, each new connection evicts the oldest silent one
// (so do the flood's second wave and, on a slow machine, the tail of its first wave), and honest
// new connections succeed again. The silent connections not evicted are held until the deadline.
BOOST_AUTO_TEST_CASE(flood_against_the_connection_limit,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const auto shm_before = t::shm_entries();
    const int fds_before = t::open_fd_count();
    // The default limit, unless a low RLIMIT_NOFILE made the flood smaller than it.
    const std::size_t limit = std::min(sharer_options{}.max_connections, flood_connections / 2);
    const flood_outcome out = run_flood(limit);
    const honest_summary s = summarize(out);
    print_flood("default limit", limit, out, s);

    BOOST_TEST(out.connected == flood_connections);
    BOOST_TEST(out.eof == flood_connections);
    BOOST_TEST(out.held >= 1u);
    BOOST_TEST(out.stats.handshake_timeouts == out.held);
    BOOST_TEST(out.stats.handshakes_evicted >= 1u);  // at least the second wave made room for itself
    BOOST_TEST(out.server_fds_end == out.server_fds_baseline);
    BOOST_TEST(out.stats.connections_open == 0u);

    // Every flood connection not held until the deadline was refused or evicted, and the only
    // other refusals are the honest new connections refused. (Which of the two closed a given
    // flood connection cannot be told from the flooder's side: a slow flooder sees a refusal's EOF
    // late. The split by EOF time is printed above, not checked.)
    std::size_t honest_refused = 0;
    for (const auto& h : out.honest) honest_refused += h.error_category != 0;
    BOOST_TEST(out.stats.limit_violations + out.stats.handshakes_evicted ==
               flood_connections - out.held + honest_refused);

    BOOST_TEST(s.during >= 10u, "honest fetches during the flood: " << s.during);
    BOOST_TEST(s.wrong == 0u);
    const double bound_ms = std::chrono::duration<double, std::milli>(honest_bound).count();
    // A flood that keeps connecting keeps the waiting connections young (each new one evicts the
    // oldest), so the guarantee starts once the first wave is open and old enough to be evicted
    // (plus 100 ms of margin; the second wave takes only 64 of the ~1,000 slots).
    const std::int64_t evictable_ns =
        out.first_wave_open_ns + std::chrono::duration_cast<std::chrono::nanoseconds>(flood_stall_age).count() +
        100'000'000;
    std::size_t pooled_failed = 0, fresh_failed_wrong_error = 0, fresh_ok_after = 0;
    std::size_t fresh_late = 0, fresh_late_failed = 0;
    // Before the first silent connections reach their deadline: without eviction the limit stays
    // full until then and every new connection is refused.
    const std::int64_t before_deadline_ns =
        out.flood_start_ns + std::chrono::duration_cast<std::chrono::nanoseconds>(flood_deadline).count() -
        100'000'000;
    for (const auto& h : out.honest) {
        if (h.kind == honest_kind::pooled) {
            pooled_failed += h.error_category != 0;
            BOOST_TEST(static_cast<double>(h.latency_ns) / 1e6 < bound_ms);
            continue;
        }
        if (h.error_category != 0) {
            // The documented, specific error for "the server refused the connection (limit)".
            fresh_failed_wrong_error +=
                !(h.error_category == 1 && h.error_value == static_cast<int>(errc::limit_exceeded));
        } else if (h.start_ns > out.flood_end_ns) {
            ++fresh_ok_after;
        }
        if (h.start_ns >= evictable_ns && h.start_ns <= before_deadline_ns) {
            ++fresh_late;
            fresh_late_failed += h.error_category != 0;
            BOOST_TEST(static_cast<double>(h.latency_ns) / 1e6 < bound_ms);
        }
    }
    BOOST_TEST(pooled_failed == 0u);   // the established connection is not starved
    BOOST_TEST(fresh_ok_after >= 1u);  // and new connections are accepted again after the flood
    BOOST_TEST(fresh_failed_wrong_error == 0u,
               "a new connection refused by the connection limit must fail with errc::limit_exceeded "
               "(fetch.hpp)");
    // Silent connections cannot keep honest ones out: once they are old enough to be evicted, new
    // honest connections get in while the limit is still full of them. (How many are refused
    // meanwhile depends on how fast the server accepts the flood: the age that counts starts at
    // accept, and a loaded server accepts the first wave late; so this is printed, not bounded.)
    BOOST_TEST(fresh_late - fresh_late_failed >= 10u,
               "new honest connections admitted while the limit was full: " << fresh_late - fresh_late_failed
                                                                             << " of " << fresh_late);
    BOOST_TEST_MESSAGE("new honest connections once the flood was evictable: " << fresh_late << ", refused "
                                                                                << fresh_late_failed);

    BOOST_TEST(t::open_fd_count() == fds_before);
    t::check_shm_unchanged(shm_before);
}
