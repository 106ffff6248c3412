#define BOOST_TEST_MODULE sharer_server_test
#include "support/test_support.hpp"

#include "support/fd_test_support.hpp"
#include "support/sharer_warmup.hpp"

#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/sharer.hpp>

#include <asio/as_tuple.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>
#include <vector>

using namespace steward;
using steward::test::open_fd_count;
namespace t = steward::test;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

namespace {

[[maybe_unused]] void dump_fds() {
    for (int fd = 0; fd < 64; ++fd) {
        char link[64], target[256] = {};
        std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        if (::readlink(link, target, sizeof target - 1) > 0)
            std::fprintf(stderr, "fd %d -> %s\n", fd, target);
    }
}

// Descriptors open once the io_context has created its io_uring (lazily, with its first I/O
// object), so that the ring is not mistaken for a leak.
int baseline_fd_count(asio::io_context& ctx) {
    asio::local::stream_protocol::socket warm(ctx);
    return open_fd_count();
}

bool path_exists(const std::string& p) {
    struct stat st {};
    return ::lstat(p.c_str(), &st) == 0;
}

std::string parent_dir(const std::string& p) {
    return p.substr(0, p.rfind('/'));
}

bool same_file(int a, int b) {
    struct stat sa {
    }, sb{};
    return ::fstat(a, &sa) == 0 && ::fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

}  // namespace

STEWARD_CORO_TEST(share_and_fetch_in_process_then_refused) {
    const int before = baseline_fd_count(ctx);
    {
        sharer s(ctx.get_executor());
        BOOST_TEST(s.address().empty());  // lazy: no listener before the first share
        unique_fd memfd = t::make_memfd("hello from the sharer");
        const share_id id = s.share(memfd.get());
        BOOST_TEST(!s.address().empty());
        BOOST_TEST(id.address() == s.address());
        BOOST_TEST(s.pending() == 1u);
        // A 0700 directory of its own.
        struct stat st {};
        BOOST_REQUIRE(::stat(parent_dir(s.address()).c_str(), &st) == 0);
        BOOST_TEST((st.st_mode & 0777) == 0700u);

        auto [ec, fds] = co_await async_fetch(ctx.get_executor(), id, use_tuple);
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        BOOST_REQUIRE(fds.size() == 1u);
        BOOST_TEST(t::read_contents(fds[0].get()) == "hello from the sharer");
        BOOST_TEST(t::is_cloexec(fds[0].get()));
        BOOST_TEST(same_file(fds[0].get(), memfd.get()));

        // One-shot: the second fetch is refused, the same way as an unknown key.
        auto [ec2, fds2] = co_await async_fetch(ctx.get_executor(), id, use_tuple);
        BOOST_TEST(ec2 == make_error_code(errc::share_not_available));
        BOOST_TEST(fds2.empty());
        const share_id unknown(id.address(), share_key::generate());
        auto [ec3, fds3] = co_await async_fetch(ctx.get_executor(), unknown, use_tuple);
        BOOST_TEST(ec3 == make_error_code(errc::share_not_available));

        // The confirmation reaches the server: nothing pending, one delivery.
        for (int i = 0; i < 200 && s.pending() != 0; ++i) {
            asio::steady_timer timer(ctx, std::chrono::milliseconds(5));
            co_await timer.async_wait(use_tuple);
        }
        BOOST_TEST(s.pending() == 0u);
        const sharer_stats st2 = s.stats();
        BOOST_TEST(st2.delivered == 1u);
        BOOST_TEST(st2.refused_requests == 2u);
        BOOST_TEST(st2.connections_accepted == 1u);  // one pooled connection for all three fetches

        const std::string path = s.address();
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
        BOOST_TEST(!path_exists(path));
        BOOST_TEST(!path_exists(parent_dir(path)));
        std::error_code sec;
        (void)s.share(memfd.get(), sec);
        BOOST_TEST((sec == std::errc::operation_not_permitted));  // stopped
    }
    // Only the pooled client connection is left (closed with the io_context).
    BOOST_TEST(open_fd_count() <= before + 1);
}

BOOST_AUTO_TEST_CASE(cross_process_socket_echo_and_memfd,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        auto mine_theirs_pair = t::socket_pair();
        unique_fd mine = std::move(mine_theirs_pair.first);
        unique_fd theirs = std::move(mine_theirs_pair.second);
        unique_fd memfd = t::make_memfd("memfd contents across processes");
        const int both[] = {theirs.get(), memfd.get()};
        const share_id id = s.share(std::span<const int>(both));
        theirs.reset();  // the sharer holds its own copy

        auto child = t::fork_child([&] {
            t::child_checks c;
            mine.reset();
            std::error_code ec;
            std::vector<unique_fd> fds = fetch(id, ec);
            if (!c.expect(!ec && fds.size() == 2, "fetch two descriptors")) return 50;
            c.expect(t::read_contents(fds[1].get()) == "memfd contents across processes", "memfd contents");
            char buf[16] = {};
            const ssize_t n = ::read(fds[0].get(), buf, sizeof buf);
            c.expect(n == 4 && std::string(buf, 4) == "ping", "request on the shared socket");
            c.expect(::write(fds[0].get(), "pong", 4) == 4, "echo");
            std::vector<unique_fd> again = fetch(id, ec);
            c.expect(ec == make_error_code(errc::share_not_available), "second fetch refused");
            return c.exit_code();
        });
        BOOST_REQUIRE(::write(mine.get(), "ping", 4) == 4);
        // A child that failed exits without answering: a bounded wait, not a hang.
        pollfd answer{mine.get(), POLLIN, 0};
        BOOST_TEST(::poll(&answer, 1, 30000) == 1);
        char buf[8] = {};
        BOOST_TEST(::recv(mine.get(), buf, 4, MSG_DONTWAIT) == 4);
        BOOST_TEST(std::string(buf, 4) == "pong");
        BOOST_TEST(child.wait() == 0);
        for (int i = 0; i < 400 && s.pending() != 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        BOOST_TEST(s.pending() == 0u);
        BOOST_TEST(s.stats().delivered == 1u);
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(thousand_fds_under_one_id, *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        std::vector<unique_fd> originals;
        std::vector<int> numbers;
        for (int i = 0; i < 1000; ++i) {
            originals.push_back(t::make_memfd(std::to_string(i)));
            BOOST_REQUIRE(originals.back());
            numbers.push_back(originals.back().get());
        }
        const share_id id = s.share(numbers);
        numbers.clear();

        auto child = t::fork_child([&] {
            t::child_checks c;
            std::error_code ec;
            std::vector<unique_fd> fds = fetch(id, ec);
            if (!c.expect(!ec, "fetch 1000")) return 50;
            if (!c.expect(fds.size() == 1000, "all 1000 arrive")) return 51;
            for (int i = 0; i < 1000; ++i) {
                if (!c.expect(t::read_contents(fds[static_cast<std::size_t>(i)].get()) == std::to_string(i),
                              "order and identity"))
                    break;
                c.expect(same_file(fds[static_cast<std::size_t>(i)].get(),
                                   originals[static_cast<std::size_t>(i)].get()),
                         "same file");
            }
            return c.exit_code();
        });
        BOOST_TEST(child.wait() == 0);
        originals.clear();
        for (int i = 0; i < 400 && s.pending() != 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        BOOST_TEST(s.pending() == 0u);
        // The server closes its 1000 copies once the receiver's confirmation has been processed,
        // which may come a moment after the entry left the cache (pending() == 0): wait, bounded.
        for (int i = 0; i < 400 && open_fd_count() >= before + 20; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        BOOST_TEST(open_fd_count() < before + 20);
    }
    BOOST_TEST(open_fd_count() == before);
}

STEWARD_CORO_TEST(ttl_expiry_revoke_and_cap) {
    const int before = baseline_fd_count(ctx);
    {
        sharer_options opts;
        opts.max_pending_shares = 3;
        sharer s(ctx.get_executor(), opts);
        unique_fd memfd = t::make_memfd("x");

        share_options short_ttl;
        short_ttl.ttl = t::slowed(std::chrono::milliseconds(30));
        const share_id expiring = s.share(memfd.get(), short_ttl);
        const share_id revoked = s.share(memfd.get());
        const share_id kept = s.share(memfd.get());
        BOOST_TEST(s.pending() == 3u);

        std::error_code ec;
        const share_id over = s.share(memfd.get(), ec);
        BOOST_TEST(ec == make_error_code(errc::too_many_shares));
        BOOST_TEST(over.empty());
        BOOST_CHECK_THROW((void)s.share(memfd.get()), std::system_error);

        BOOST_TEST(s.revoke(revoked));
        BOOST_TEST(!s.revoke(revoked));
        BOOST_TEST(s.pending() == 2u);

        asio::steady_timer timer(ctx, t::slowed(std::chrono::milliseconds(80)));
        co_await timer.async_wait(use_tuple);
        // The sweep closed the expired share's copy.
        BOOST_TEST(s.pending() == 1u);
        BOOST_TEST(s.stats().expired == 1u);
        BOOST_TEST(s.stats().revoked == 1u);

        auto [e1, f1] = co_await async_fetch(ctx.get_executor(), expiring, use_tuple);
        BOOST_TEST(e1 == make_error_code(errc::share_not_available));
        auto [e2, f2] = co_await async_fetch(ctx.get_executor(), revoked, use_tuple);
        BOOST_TEST(e2 == make_error_code(errc::share_not_available));
        auto [e3, f3] = co_await async_fetch(ctx.get_executor(), kept, use_tuple);
        BOOST_TEST(!e3);
        BOOST_TEST(f3.size() == 1u);

        // Below the cap again.
        const share_id again = s.share(memfd.get(), ec);
        BOOST_TEST(!ec);
        BOOST_TEST(s.revoke(again));
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before + 1);
}

STEWARD_CORO_TEST(pipelined_concurrent_fetches_share_one_connection) {
    const int before = baseline_fd_count(ctx);
    {
        sharer s(ctx.get_executor());
        constexpr int n = 300;
        std::vector<unique_fd> files;
        std::vector<share_id> ids;
        for (int i = 0; i < n; ++i) {
            files.push_back(t::make_memfd(std::to_string(i)));
            ids.push_back(s.share(files.back().get()));
        }
        files.clear();
        int done = 0, ok = 0;
        for (int i = 0; i < n; ++i) {
            async_fetch(ctx.get_executor(), ids[static_cast<std::size_t>(i)],
                        [&, i](std::error_code ec, std::vector<unique_fd> fds) {
                            ++done;
                            if (!ec && fds.size() == 1 && t::read_contents(fds[0].get()) == std::to_string(i))
                                ++ok;
                        });
        }
        for (int i = 0; i < 2000 && done < n; ++i) {
            asio::steady_timer timer(ctx, std::chrono::milliseconds(2));
            co_await timer.async_wait(use_tuple);
        }
        BOOST_TEST(done == n);
        BOOST_TEST(ok == n);
        BOOST_TEST(s.stats().connections_accepted == 1u);
        BOOST_TEST(s.stats().requests == static_cast<std::uint64_t>(n));
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
        BOOST_TEST(s.pending() == 0u);
    }
    BOOST_TEST(open_fd_count() <= before + 1);
}

BOOST_AUTO_TEST_CASE(stop_with_transfers_in_flight, *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    std::string path;
    {
        sharer s;
        s.start_background();
        std::vector<share_id> ids;
        for (int i = 0; i < 200; ++i) {
            unique_fd f = t::make_memfd("payload");
            ids.push_back(s.share(f.get()));
        }
        path = s.address();
        // A client process fetches as fast as it can while the parent stops the server.
        auto go_r_go_w_pair = t::make_pipe();
        unique_fd go_r = std::move(go_r_go_w_pair.first);
        unique_fd go_w = std::move(go_r_go_w_pair.second);
        auto child = t::fork_child([&] {
            go_r.reset();
            asio::io_context c;
            int got = 0, failed = 0, done = 0;
            for (auto& id : ids)
                async_fetch(c.get_executor(), id, [&](std::error_code ec, std::vector<unique_fd> fds) {
                    // The parent stops once transfers are under way.
                    if (++done == 1) t::send_byte(go_w.get());
                    if (!ec && fds.size() == 1)
                        ++got;
                    else if (ec)
                        ++failed;
                });
            c.run_for(std::chrono::seconds(20));
            // Every fetch finished one way or the other; some may have succeeded.
            std::fprintf(stderr, "[stop test child] got %d failed %d\n", got, failed);
            return done == static_cast<int>(ids.size()) ? 0 : 60;
        });
        go_w.reset();
        BOOST_REQUIRE(t::wait_byte(go_r.get()));
        s.stop(std::chrono::milliseconds(500));
        BOOST_TEST(!path_exists(path));
        BOOST_TEST(s.pending() == 0u);
        BOOST_TEST(child.wait() == 0);
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(fork_child_forgets_the_parents_shares,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("parent's");
        const share_id parent_id = s.share(memfd.get());
        const std::string parent_path = s.address();

        auto child = t::fork_child([&] {
            t::child_checks c;
            c.expect(s.pending() == 0, "child forgot the parent's shares");
            c.expect(s.address().empty(), "child has no listener yet");
            unique_fd mine = t::make_memfd("child's");
            std::error_code ec;
            const share_id own = s.share(mine.get(), ec);
            c.expect(!ec, "child shares");
            c.expect(own.address() != parent_path, "child listens on its own socket");
            std::vector<unique_fd> fds = fetch(own, ec);
            c.expect(!ec && fds.size() == 1 && t::read_contents(fds[0].get()) == "child's",
                     "child fetches its own");
            s.stop(std::chrono::milliseconds(100));
            c.expect(path_exists(parent_path), "parent's socket untouched by the child's stop");
            return c.exit_code();
        });
        BOOST_TEST(child.wait() == 0);
        BOOST_TEST(path_exists(parent_path));
        std::error_code ec;
        std::vector<unique_fd> fds = fetch(parent_id, ec);
        BOOST_TEST(!ec);
        BOOST_REQUIRE(fds.size() == 1u);
        BOOST_TEST(t::read_contents(fds[0].get()) == "parent's");
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(socket_directory_falls_back_from_a_long_base,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    // An XDG_RUNTIME_DIR too long for sun_path: the sharer moves on to a shorter base.
    char templ[] = "/tmp/steward-long-XXXXXX";
    BOOST_REQUIRE(::mkdtemp(templ));
    std::string long_dir = templ;
    while (long_dir.size() < 110) {
        long_dir += "/dddddddddddddddddddd";
        BOOST_REQUIRE(::mkdir(long_dir.c_str(), 0700) == 0);
    }
    const char* old_xdg = std::getenv("XDG_RUNTIME_DIR");
    const std::string saved = old_xdg ? old_xdg : "";
    ::setenv("XDG_RUNTIME_DIR", long_dir.c_str(), 1);
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("x");
        const share_id id = s.share(memfd.get());
        BOOST_TEST(id.address().size() <= 107u);
        BOOST_TEST(id.address().rfind(long_dir, 0) != 0);
        std::error_code ec;
        std::vector<unique_fd> fds = fetch(id, ec);
        BOOST_TEST(!ec);
    }
    {
        // Only the configured base, too long: a clear error and nothing created.
        sharer_options opts;
        opts.socket_base_dir = long_dir;
        sharer s(opts);
        s.start_background();
        unique_fd memfd = t::make_memfd("x");
        std::error_code ec;
        (void)s.share(memfd.get(), ec);
        BOOST_TEST((ec == std::errc::filename_too_long));
        BOOST_TEST(s.pending() == 0u);
    }
    if (old_xdg)
        ::setenv("XDG_RUNTIME_DIR", saved.c_str(), 1);
    else
        ::unsetenv("XDG_RUNTIME_DIR");
    for (std::string d = long_dir; d.size() >= std::string(templ).size(); d = parent_dir(d))
        ::rmdir(d.c_str());
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(share_from_many_threads_and_wait_empty,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("x");
        std::vector<std::vector<share_id>> per_thread(4);
        std::vector<std::thread> threads;
        for (int i = 0; i < 4; ++i)
            threads.emplace_back([&, i] {
                for (int k = 0; k < 100; ++k)
                    per_thread[static_cast<std::size_t>(i)].push_back(s.share(memfd.get()));
            });
        for (auto& th : threads) th.join();
        BOOST_TEST(s.pending() == 400u);

        std::promise<std::error_code> empty;
        s.async_wait_empty([&](std::error_code ec) { empty.set_value(ec); });
        auto future = empty.get_future();
        BOOST_TEST((future.wait_for(std::chrono::milliseconds(20)) == std::future_status::timeout));

        // Revoke from one thread while another fetches: every share ends exactly once.
        std::atomic<int> revoked{0};  // Boost.Test assertions are not thread-safe: count here
        std::thread revoker([&] {
            for (auto& id : per_thread[0])
                if (s.revoke(id)) ++revoked;
        });
        int fetched = 0;
        for (std::size_t i = 1; i < 4; ++i)
            for (auto& id : per_thread[i]) {
                std::error_code ec;
                if (fetch(id, ec).size() == 1) ++fetched;
            }
        revoker.join();
        BOOST_TEST(revoked.load() == 100);
        BOOST_TEST(fetched == 300);
        BOOST_REQUIRE((future.wait_for(std::chrono::seconds(10)) == std::future_status::ready));
        BOOST_TEST(!future.get());
        BOOST_TEST(s.pending() == 0u);
        const sharer_stats st = s.stats();
        BOOST_TEST(st.delivered == 300u);
        BOOST_TEST(st.revoked == 100u);
    }
    BOOST_TEST(open_fd_count() == before);
}
