#define BOOST_TEST_MODULE sharer_security_test
#include "support/test_support.hpp"

#include "support/fd_test_support.hpp"
#include "support/sharer_warmup.hpp"

#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/sharer.hpp>

#include "sharer/handshake_driver.hpp"
#include "sharer/native_protocol.hpp"

#include <asio/as_tuple.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <string>
#include <thread>
#include <vector>

using namespace steward;
using steward::test::open_fd_count;
namespace t = steward::test;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

namespace {

std::string parent_dir(const std::string& p) {
    return p.substr(0, p.rfind('/'));
}

int baseline_fd_count(asio::io_context& ctx) {
    asio::local::stream_protocol::socket warm(ctx);
    return open_fd_count();
}

// A CLOEXEC socket connected to @p path, on @p ctx.
asio::local::stream_protocol::socket connect_raw(asio::io_context& ctx, const std::string& path) {
    unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    BOOST_REQUIRE(fd);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    BOOST_REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
    asio::local::stream_protocol::socket s(ctx);
    s.assign(asio::local::stream_protocol(), fd.release());
    return s;
}

// Reads until EOF or error; true if the peer closed (EOF/reset) within the deadline.
asio::awaitable<bool> closed_by_peer(asio::local::stream_protocol::socket& s) {
    std::array<char, 512> buf{};
    for (;;) {
        auto [ec, n] = co_await s.async_read_some(asio::buffer(buf), use_tuple);
        (void)n;
        if (ec) co_return ec == asio::error::eof || ec == asio::error::connection_reset;
    }
}

template <typename Pred>
asio::awaitable<void> wait_until(asio::io_context& ctx, Pred pred) {
    for (int i = 0; i < 1000 && !pred(); ++i) {
        asio::steady_timer timer(ctx, std::chrono::milliseconds(5));
        co_await timer.async_wait(use_tuple);
    }
}

}  // namespace

BOOST_AUTO_TEST_CASE(wrong_authkey_is_refused_and_others_still_served,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("secret");
        const share_id id = s.share(memfd.get());
        auto child = t::fork_child([&] {
            t::child_checks c;
            fetch_options other;
            other.key = authkey::generate();  // another family
            std::error_code ec;
            std::vector<unique_fd> fds = fetch(id, ec, other);
            c.expect(ec == make_error_code(errc::authentication_failed), "other key refused");
            c.expect(fds.empty(), "nothing received");
            return c.exit_code();
        });
        BOOST_TEST(child.wait() == 0);
        BOOST_TEST(s.stats().refused_auth == 1u);
        BOOST_TEST(s.pending() == 1u);  // untouched
        std::error_code ec;
        std::vector<unique_fd> fds = fetch(id, ec);
        BOOST_TEST(!ec);
        BOOST_TEST(fds.size() == 1u);
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(client_of_another_uid_is_refused,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    if (::geteuid() != 0) {
        BOOST_TEST_MESSAGE("not root: cannot setuid(65534) in a child; test skipped");
        return;
    }
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("root's");
        const share_id id = s.share(memfd.get());
        // The 0700 directory alone keeps others out (connect: EACCES)...
        auto child1 = t::fork_child([&] {
            t::child_checks c;
            if (!c.expect(::setgid(65534) == 0 && ::setuid(65534) == 0, "setuid nobody")) return 40;
            std::error_code ec;
            std::vector<unique_fd> fds = fetch(id, ec);
            c.expect(ec == std::errc::permission_denied, "0700 directory refuses nobody");
            return c.exit_code();
        });
        BOOST_TEST(child1.wait() == 0);
        // ...and with the directory opened up, SO_PEERCRED still does.
        BOOST_REQUIRE(::chmod(parent_dir(id.address()).c_str(), 0755) == 0);
        BOOST_REQUIRE(::chmod(id.address().c_str(), 0777) == 0);
        auto child2 = t::fork_child([&] {
            t::child_checks c;
            if (!c.expect(::setgid(65534) == 0 && ::setuid(65534) == 0, "setuid nobody")) return 40;
            std::error_code ec;
            std::vector<unique_fd> fds = fetch(id, ec);
            c.expect(ec == make_error_code(errc::authentication_failed),
                     ("peer uid refused: " + ec.message()).c_str());
            c.expect(fds.empty(), "nothing received");
            return c.exit_code();
        });
        BOOST_TEST(child2.wait() == 0);
        BOOST_TEST(s.stats().refused_peer == 1u);
        std::error_code ec;
        std::vector<unique_fd> fds = fetch(id, ec);
        BOOST_TEST(!ec);
        BOOST_TEST(fds.size() == 1u);
    }
    {
        // An allow-listed uid is let in.
        sharer_options opts;
        opts.allowed_uids = {65534};
        sharer s(opts);
        s.start_background();
        unique_fd memfd = t::make_memfd("for nobody");
        const share_id id = s.share(memfd.get());
        BOOST_REQUIRE(::chmod(parent_dir(id.address()).c_str(), 0755) == 0);
        BOOST_REQUIRE(::chmod(id.address().c_str(), 0777) == 0);
        auto child = t::fork_child([&] {
            t::child_checks c;
            if (!c.expect(::setgid(65534) == 0 && ::setuid(65534) == 0, "setuid nobody")) return 40;
            std::error_code ec;
            std::vector<unique_fd> fds = fetch(id, ec);
            c.expect(!ec && fds.size() == 1 && t::read_contents(fds[0].get()) == "for nobody", "allowed uid");
            return c.exit_code();
        });
        BOOST_TEST(child.wait() == 0);
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(per_share_pid_restriction, *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("pid bound");
        auto id_r_id_w_pair = t::make_pipe();
        unique_fd id_r = std::move(id_r_id_w_pair.first);
        unique_fd id_w = std::move(id_r_id_w_pair.second);
        auto done_r_done_w_pair = t::make_pipe();
        unique_fd done_r = std::move(done_r_done_w_pair.first);
        unique_fd done_w = std::move(done_r_done_w_pair.second);
        auto child = t::fork_child([&] {
            t::child_checks c;
            id_w.reset();
            char text[256] = {};
            ssize_t n = ::read(id_r.get(), text, sizeof text - 1);
            if (!c.expect(n > 0, "id received")) return 40;
            const share_id id = share_id::parse(std::string(text, static_cast<std::size_t>(n)));
            std::error_code ec;
            std::vector<unique_fd> fds = fetch(id, ec);
            c.expect(!ec && fds.size() == 1 && t::read_contents(fds[0].get()) == "pid bound",
                     "allowed pid fetches");
            return c.exit_code();
        });
        id_r.reset();
        share_options for_child;
        for_child.allowed_pid = child.pid();
        const share_id id = s.share(memfd.get(), for_child);
        // This process is not that pid: refused exactly like an unknown key, and nothing consumed.
        std::error_code ec;
        std::vector<unique_fd> fds = fetch(id, ec);
        BOOST_TEST(ec == make_error_code(errc::share_not_available));
        BOOST_TEST(s.pending() == 1u);
        const std::string text = id.format();
        BOOST_REQUIRE(::write(id_w.get(), text.data(), text.size()) == static_cast<ssize_t>(text.size()));
        BOOST_TEST(child.wait() == 0);
        for (int i = 0; i < 400 && s.pending() != 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        BOOST_TEST(s.pending() == 0u);
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(control_truncated_at_a_tiny_rlimit_gives_the_share_back,
                     *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        std::vector<unique_fd> files;
        std::vector<int> numbers;
        for (int i = 0; i < 40; ++i) {
            files.push_back(t::make_memfd(std::to_string(i)));
            numbers.push_back(files.back().get());
        }
        unique_fd warm = t::make_memfd("warm");
        const share_id warm_id = s.share(warm.get());
        const share_id id = s.share(numbers);
        files.clear();
        numbers.clear();

        auto child = t::fork_child([&] {
            t::child_checks c;
            asio::io_context io;
            std::error_code ec1, ec2;
            std::size_t got1 = 0, got2 = 0;
            // First fetch: the connection is up (io_uring, socket) before the limit is lowered.
            async_fetch(io.get_executor(), warm_id, [&](std::error_code ec, std::vector<unique_fd> fds) {
                ec1 = ec;
                got1 = fds.size();
                fds.clear();
                int highest = 0;
                for (int fd = 0; fd < 4096; ++fd)
                    if (::fcntl(fd, F_GETFD) >= 0) highest = fd;
                // Fill the holes below (descriptors inherited from the parent and closed there), so
                // the limit really leaves room for a handful only.
                for (int fd = 0; fd < highest; ++fd)
                    if (::fcntl(fd, F_GETFD) < 0) ::dup2(2, fd);
                // Room for a handful of descriptors only.
                rlimit lim{static_cast<rlim_t>(highest + 6), static_cast<rlim_t>(highest + 6)};
                c.expect(::setrlimit(RLIMIT_NOFILE, &lim) == 0, "setrlimit");
                async_fetch(io.get_executor(), id, [&](std::error_code result, std::vector<unique_fd> fds2) {
                    ec2 = result;
                    got2 = fds2.size();
                });
            });
            io.run_for(std::chrono::seconds(20));
            c.expect(!ec1 && got1 == 1, "warm-up fetch");
            if (!c.expect(ec2 == make_error_code(errc::control_truncated), "MSG_CTRUNC reported"))
                std::fprintf(stderr, "got %s, %zu fds\n", ec2.message().c_str(), got2);
            c.expect(got2 == 0, "nothing handed over");
            return c.exit_code();
        });
        BOOST_TEST(child.wait() == 0);
        // Given back: still fetchable, whole.
        std::error_code ec;
        std::vector<unique_fd> fds;
        for (int i = 0; i < 100; ++i) {
            fds = fetch(id, ec);
            if (ec != make_error_code(errc::share_not_available)) break;
            std::this_thread::sleep_for(
                std::chrono::milliseconds(10));  // the give-back may still be in transit
        }
        BOOST_TEST(!ec);
        BOOST_REQUIRE(fds.size() == 40u);
        for (int i = 0; i < 40; ++i)
            BOOST_TEST(t::read_contents(fds[static_cast<std::size_t>(i)].get()) == std::to_string(i));
        BOOST_TEST(s.stats().returned >= 1u);
    }
    BOOST_TEST(open_fd_count() == before);
}

STEWARD_CORO_TEST(huge_length_prefix_closes_only_that_connection) {
    const int before = baseline_fd_count(ctx);
    {
        sharer s(ctx.get_executor());
        unique_fd memfd = t::make_memfd("still served");
        const share_id id = s.share(memfd.get());

        auto raw = connect_raw(ctx, id.address());
        std::error_code ec = co_await detail::authenticate_as_client(raw, authkey::family());
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        // 2 GiB announced: refused from the header, never allocated.
        const std::array<std::byte, 4> huge{std::byte{0x7f}, std::byte{0xff}, std::byte{0xff},
                                            std::byte{0xff}};
        ec = co_await detail::send_all(raw, huge);
        BOOST_TEST(!ec);
        const bool closed1 = co_await closed_by_peer(raw);
        BOOST_TEST(closed1);
        co_await wait_until(ctx, [&] { return s.stats().limit_violations == 1; });
        BOOST_TEST(s.stats().limit_violations == 1u);

        // A negative length other than -1 is malformed.
        auto raw2 = connect_raw(ctx, id.address());
        ec = co_await detail::authenticate_as_client(raw2, authkey::family());
        BOOST_REQUIRE(!ec);
        const std::array<std::byte, 4> negative{std::byte{0xff}, std::byte{0xff}, std::byte{0xff},
                                                std::byte{0xfe}};
        ec = co_await detail::send_all(raw2, negative);
        const bool closed2 = co_await closed_by_peer(raw2);
        BOOST_TEST(closed2);
        co_await wait_until(ctx, [&] { return s.stats().protocol_errors == 1; });
        BOOST_TEST(s.stats().protocol_errors == 1u);

        auto [fec, fds] = co_await async_fetch(ctx.get_executor(), id, use_tuple);
        BOOST_TEST(!fec);
        BOOST_TEST(fds.size() == 1u);
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before + 1);  // + the pooled client connection
}

STEWARD_CORO_TEST(handshake_deadline_closes_a_silent_peer) {
    const int before = baseline_fd_count(ctx);
    {
        sharer_options opts;
        opts.handshake_timeout = std::chrono::milliseconds(150);
        sharer s(ctx.get_executor(), opts);
        unique_fd memfd = t::make_memfd("x");
        const share_id id = s.share(memfd.get());
        auto raw = connect_raw(ctx, id.address());
        const auto start = std::chrono::steady_clock::now();
        const bool closed3 = co_await closed_by_peer(raw);
        BOOST_TEST(closed3);
        BOOST_TEST((std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(100)));
        co_await wait_until(ctx, [&] { return s.stats().handshake_timeouts == 1; });
        BOOST_TEST(s.stats().handshake_timeouts == 1u);
        BOOST_TEST(s.pending() == 1u);
        auto [fec, fds] = co_await async_fetch(ctx.get_executor(), id, use_tuple);
        BOOST_TEST(!fec);
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before + 1);
}

STEWARD_CORO_TEST(connection_limit_and_unknown_first_frame) {
    const int before = baseline_fd_count(ctx);
    {
        sharer_options opts;
        opts.max_connections = 1;
        sharer s(ctx.get_executor(), opts);
        unique_fd memfd = t::make_memfd("x");
        const share_id id = s.share(memfd.get());
        auto first = connect_raw(ctx, id.address());
        std::error_code ec = co_await detail::authenticate_as_client(first, authkey::family());
        BOOST_REQUIRE(!ec);
        // A second connection is over the limit: closed at once, counted.
        auto second = connect_raw(ctx, id.address());
        const bool closed4 = co_await closed_by_peer(second);
        BOOST_TEST(closed4);
        BOOST_TEST(s.stats().limit_violations == 1u);
        // The first one speaks neither protocol: closed.
        const std::array<std::byte, 5> junk{std::byte{0}, std::byte{0}, std::byte{0}, std::byte{1},
                                            std::byte{0x42}};
        ec = co_await detail::send_all(first, junk);
        const bool closed5 = co_await closed_by_peer(first);
        BOOST_TEST(closed5);
        co_await wait_until(ctx, [&] { return s.stats().protocol_errors == 1; });
        BOOST_TEST(s.stats().protocol_errors == 1u);
        co_await wait_until(ctx, [&] { return s.stats().connections_open == 0; });
        auto [fec, fds] = co_await async_fetch(ctx.get_executor(), id, use_tuple);
        BOOST_TEST(!fec);
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before + 1);
}

STEWARD_CORO_TEST(at_the_limit_the_oldest_stalled_handshake_is_evicted_never_an_authenticated_one) {
    const int before = baseline_fd_count(ctx);
    {
        sharer_options opts;
        opts.max_connections = 3;
        opts.handshake_timeout = std::chrono::seconds(10);  // evictable after 1 s in the handshake
        sharer s(ctx.get_executor(), opts);
        unique_fd memfd = t::make_memfd("served through the survivor");
        const share_id id = s.share(memfd.get());
        // Two silent connections, accepted in this order, then old enough to be evicted.
        auto oldest = connect_raw(ctx, id.address());
        co_await wait_until(ctx, [&] { return s.stats().connections_open == 1; });
        auto second = connect_raw(ctx, id.address());
        co_await wait_until(ctx, [&] { return s.stats().connections_open == 2; });
        asio::steady_timer age(ctx, std::chrono::milliseconds(1200));
        co_await age.async_wait(use_tuple);
        // The third slot: authenticated right away, so never a candidate.
        auto authenticated = connect_raw(ctx, id.address());
        std::error_code ec = co_await detail::authenticate_as_client(authenticated, authkey::family());
        BOOST_REQUIRE(!ec);
        BOOST_TEST(s.stats().connections_open == 3u);
        // Each new connection at the limit evicts the oldest stalled one, in accept order.
        auto third = connect_raw(ctx, id.address());
        const bool oldest_closed = co_await closed_by_peer(oldest);
        BOOST_TEST(oldest_closed);
        co_await wait_until(ctx, [&] { return s.stats().handshakes_evicted == 1; });
        BOOST_TEST(s.stats().handshakes_evicted == 1u);
        auto fourth = connect_raw(ctx, id.address());
        const bool second_closed = co_await closed_by_peer(second);
        BOOST_TEST(second_closed);
        co_await wait_until(ctx, [&] { return s.stats().handshakes_evicted == 2; });
        // Now the limit holds the authenticated connection and two young ones: refused.
        auto refused = connect_raw(ctx, id.address());
        const bool refused_closed = co_await closed_by_peer(refused);
        BOOST_TEST(refused_closed);
        BOOST_TEST(s.stats().limit_violations == 1u);
        BOOST_TEST(s.stats().handshakes_evicted == 2u);
        // The authenticated connection was kept: it still fetches.
        std::vector<std::byte> out;
        detail::native::append_frame(out, detail::native::hello{});
        detail::native::append_frame(out, detail::native::fetch{1, id.key()});
        ec = co_await detail::send_all(authenticated, out);
        BOOST_REQUIRE(!ec);
        std::array<char, 47> in{};  // HELLO_ACK (19 bytes) and the REPLY (28)
        auto [rec, n] = co_await asio::async_read(authenticated, asio::buffer(in), use_tuple);
        BOOST_TEST(!rec);
        BOOST_TEST(n == in.size());
        BOOST_TEST(s.stats().connections_open == 3u);
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before + 1);
}

STEWARD_CORO_TEST(unconfirmed_delivery_goes_back_when_the_peer_leaves) {
    const int before = baseline_fd_count(ctx);
    {
        sharer s(ctx.get_executor());
        unique_fd memfd = t::make_memfd("kept until confirmed");
        const share_id id = s.share(memfd.get());
        {
            // A native client that receives the reply and goes away without CONFIRM.
            auto raw = connect_raw(ctx, id.address());
            std::error_code ec = co_await detail::authenticate_as_client(raw, authkey::family());
            BOOST_REQUIRE(!ec);
            std::vector<std::byte> out;
            detail::native::append_frame(out, detail::native::hello{});
            detail::native::append_frame(out, detail::native::fetch{1, id.key()});
            ec = co_await detail::send_all(raw, out);
            BOOST_REQUIRE(!ec);
            // HELLO_ACK (19 bytes) then the REPLY (28 bytes, with the descriptor): read them all.
            std::array<char, 47> in{};
            auto [rec, n] = co_await asio::async_read(raw, asio::buffer(in), use_tuple);
            BOOST_TEST(!rec);
            BOOST_TEST(n == in.size());
            BOOST_TEST(s.pending() == 1u);  // in transfer, not yet delivered
        }  // closed: the received descriptor (dropped unread by the kernel) and the connection
        co_await wait_until(ctx, [&] { return s.stats().returned == 1; });
        BOOST_TEST(s.stats().returned == 1u);
        BOOST_TEST(s.stats().delivered == 0u);
        auto [fec, fds] = co_await async_fetch(ctx.get_executor(), id, use_tuple);
        BOOST_TEST(!fec);
        BOOST_REQUIRE(fds.size() == 1u);
        BOOST_TEST(t::read_contents(fds[0].get()) == "kept until confirmed");
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before + 1);
}

STEWARD_CORO_TEST(idle_connections_are_closed_and_counted) {
    const int before = baseline_fd_count(ctx);
    {
        sharer_options opts;
        opts.idle_timeout = std::chrono::milliseconds(100);
        sharer s(ctx.get_executor(), opts);
        unique_fd memfd = t::make_memfd("x");
        const share_id id = s.share(memfd.get());
        auto raw = connect_raw(ctx, id.address());
        std::error_code ec = co_await detail::authenticate_as_client(raw, authkey::family());
        BOOST_REQUIRE(!ec);
        const bool closed = co_await closed_by_peer(raw);  // says nothing after the handshake
        BOOST_TEST(closed);
        BOOST_TEST(s.stats().idle_timeouts == 1u);
        BOOST_TEST(s.pending() == 1u);
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before);
}
