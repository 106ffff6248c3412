#define BOOST_TEST_MODULE sharer_fetch_test
#include "support/test_support.hpp"

#include "support/cloexec_socket.hpp"
#include "support/fd_test_support.hpp"
#include "support/sharer_warmup.hpp"

#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/sharer.hpp>

#include "sharer/handshake_driver.hpp"
#include "sharer/quick_connect.hpp"

#include <asio/as_tuple.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/deferred.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

using namespace steward;
using steward::test::open_fd_count;
namespace t = steward::test;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

namespace {

int baseline_fd_count(asio::io_context& ctx) {
    asio::local::stream_protocol::socket warm(ctx);
    return open_fd_count();
}

struct temp_dir {
    std::string path;
    temp_dir() {
        char templ[] = "/tmp/steward-fetch-test-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(templ));
        path = templ;
    }
    ~temp_dir() {
        ::unlink((path + "/s").c_str());
        ::rmdir(path.c_str());
    }
};

}  // namespace

STEWARD_CORO_TEST(bad_ids_and_missing_servers) {
    const int before = baseline_fd_count(ctx);
    {
        auto [e1, f1] = co_await async_fetch(ctx.get_executor(), share_id{}, use_tuple);
        BOOST_TEST((e1 == std::errc::invalid_argument));
        BOOST_TEST(f1.empty());

        temp_dir dir;
        const share_id nobody(dir.path + "/s", share_key::generate());
        auto [e2, f2] = co_await async_fetch(ctx.get_executor(), nobody, use_tuple);
        BOOST_TEST((e2 == std::errc::no_such_file_or_directory));

        // A socket file nobody listens on any more.
        { auto acceptor = t::cloexec_listener(ctx, dir.path + "/s"); }
        auto [e3, f3] = co_await async_fetch(ctx.get_executor(), nobody, use_tuple);
        BOOST_TEST((e3 == std::errc::connection_refused));

        // The blocking forms.
        std::error_code ec;
        BOOST_TEST(fetch(nobody, ec).empty());
        BOOST_TEST((ec == std::errc::connection_refused));
        BOOST_CHECK_THROW((void)fetch(nobody), std::system_error);
    }
    BOOST_TEST(open_fd_count() == before);
}

STEWARD_CORO_TEST(connection_is_reused_and_tokens_work) {
    const int before = baseline_fd_count(ctx);
    {
        sharer s(ctx.get_executor());
        std::vector<share_id> ids;
        for (int i = 0; i < 6; ++i) {
            unique_fd f = t::make_memfd(std::to_string(i));
            ids.push_back(s.share(f.get()));
        }
        // use_awaitable (throws on error)
        std::vector<unique_fd> a = co_await async_fetch(ctx.get_executor(), ids[0], asio::use_awaitable);
        BOOST_TEST(t::read_contents(a.at(0).get()) == "0");
        // deferred
        auto op = async_fetch(ctx.get_executor(), ids[1], asio::deferred);
        std::vector<unique_fd> b = co_await std::move(op)(asio::use_awaitable);
        BOOST_TEST(t::read_contents(b.at(0).get()) == "1");
        // as_tuple
        auto [ec, c] = co_await async_fetch(ctx.get_executor(), ids[2], use_tuple);
        BOOST_TEST(!ec);
        // a callback, never invoked inside the initiating call
        bool called = false;
        bool inline_call = true;
        async_fetch(ctx.get_executor(), ids[3], [&](std::error_code e, std::vector<unique_fd> fds) {
            called = !e && fds.size() == 1;
            inline_call = false;
        });
        BOOST_TEST(!called);
        for (int i = 0; i < 400 && !called; ++i) {
            asio::steady_timer timer(ctx, std::chrono::milliseconds(2));
            co_await timer.async_wait(use_tuple);
        }
        BOOST_TEST(called);
        BOOST_TEST(!inline_call);
        // use_awaitable throws the error
        bool threw = false;
        try {
            (void)co_await async_fetch(ctx.get_executor(), ids[0], asio::use_awaitable);
        } catch (const std::system_error& e) {
            threw = e.code() == make_error_code(errc::share_not_available);
        }
        BOOST_TEST(threw);
        BOOST_TEST(s.stats().connections_accepted == 1u);  // all on one pooled connection
        co_await s.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    }
    BOOST_TEST(open_fd_count() <= before + 1);
}

BOOST_AUTO_TEST_CASE(fetches_from_several_threads, *boost::unit_test::precondition(t::io_uring_available)) {
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        constexpr int n = 200;
        std::vector<share_id> ids;
        for (int i = 0; i < n; ++i) {
            unique_fd f = t::make_memfd(std::to_string(i));
            ids.push_back(s.share(f.get()));
        }
        asio::io_context io;
        std::atomic<int> ok{0}, done{0};
        for (int i = 0; i < n; ++i)
            async_fetch(io.get_executor(), ids[static_cast<std::size_t>(i)],
                        [&, i](std::error_code ec, std::vector<unique_fd> fds) {
                            if (!ec && fds.size() == 1 && t::read_contents(fds[0].get()) == std::to_string(i))
                                ++ok;
                            ++done;
                        });
        std::thread other([&] { io.run_for(std::chrono::seconds(20)); });
        io.run_for(std::chrono::seconds(20));
        other.join();
        BOOST_TEST(done.load() == n);
        BOOST_TEST(ok.load() == n);
        // The last confirmations may still be on their way to the server thread.
        for (int i = 0; i < 400 && s.pending() != 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        BOOST_TEST(s.pending() == 0u);
    }
    BOOST_TEST(open_fd_count() == before);
}

STEWARD_CORO_TEST(handshake_timeout_reply_timeout_and_cancellation) {
    const int before = baseline_fd_count(ctx);
    {
        // The scripted servers below speak the full handshake: the client takes that path for a
        // server of another uid (quick connect is tested in sharer_quick_test).
        struct foreign_uid {
            foreign_uid() { detail::quick::set_peer_uid_override_for_tests(::getuid() + 4242); }
            ~foreign_uid() { detail::quick::set_peer_uid_override_for_tests(std::nullopt); }
        } foreign;
        temp_dir dir;
        auto acceptor = t::cloexec_listener(ctx, dir.path + "/s");
        const share_id id(dir.path + "/s", share_key::generate());

        // 1. A server that accepts and never speaks: the handshake deadline.
        fetch_options quick;
        quick.handshake_timeout = t::slowed(std::chrono::milliseconds(100));
        quick.reply_timeout = t::slowed(std::chrono::milliseconds(100));
        std::error_code e1;
        bool done1 = false;
        async_fetch(
            ctx.get_executor(), id,
            [&](std::error_code e, std::vector<unique_fd>) {
                e1 = e;
                done1 = true;
            },
            quick);
        auto [aec, silent] = co_await t::accept_cloexec(acceptor);
        BOOST_REQUIRE(!aec);
        for (int i = 0; i < 200 * t::slowdown() && !done1; ++i) {
            asio::steady_timer timer(ctx, std::chrono::milliseconds(5));
            co_await timer.async_wait(use_tuple);
        }
        BOOST_TEST(done1);
        BOOST_TEST(e1 == make_error_code(errc::timed_out));
        silent.close();

        // 2. A server that authenticates but never answers requests: the reply deadline.
        //    (Its HELLO_ACK never comes either, so the request is still queued; a queued request
        //    is bounded by handshake + reply timeouts.)
        std::error_code e2;
        bool done2 = false;
        async_fetch(
            ctx.get_executor(), id,
            [&](std::error_code e, std::vector<unique_fd>) {
                e2 = e;
                done2 = true;
            },
            quick);
        auto [aec2, mute] = co_await t::accept_cloexec(acceptor);
        BOOST_REQUIRE(!aec2);
        std::error_code hec = co_await detail::authenticate_as_server(mute, authkey::family());
        BOOST_TEST(!hec);
        asio::cancellation_signal signal;
        auto pending3 = async_fetch(ctx.get_executor(), share_id(dir.path + "/s", share_key::generate()),
                                    asio::bind_cancellation_slot(signal.slot(), asio::deferred), quick);
        // 3. Terminal cancellation of a request that waits for the session to open.
        bool cancelled = false;
        std::move(pending3)([&](std::error_code e, std::vector<unique_fd> fds) {
            cancelled = e == asio::error::operation_aborted && fds.empty();
        });
        asio::steady_timer pause(ctx, std::chrono::milliseconds(10));
        co_await pause.async_wait(use_tuple);
        signal.emit(asio::cancellation_type::terminal);
        asio::steady_timer pause2(ctx, std::chrono::milliseconds(20));
        co_await pause2.async_wait(use_tuple);
        BOOST_TEST(cancelled);
        BOOST_TEST(!done2);
        for (int i = 0; i < 200 * t::slowdown() && !done2; ++i) {
            asio::steady_timer timer(ctx, std::chrono::milliseconds(5));
            co_await timer.async_wait(use_tuple);
        }
        BOOST_TEST(done2);
        BOOST_TEST(e2 == make_error_code(errc::timed_out));
        mute.close();
    }
    // Let the failed connections' handlers finish.
    asio::steady_timer settle(ctx, std::chrono::milliseconds(50));
    co_await settle.async_wait(use_tuple);
    BOOST_TEST(open_fd_count() <= before);
}
