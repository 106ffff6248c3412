#define BOOST_TEST_MODULE sharer_cpython_client_test
#include "support/cloexec_socket.hpp"
#include "support/python3.hpp"
#include "support/test_support.hpp"

#include <steward/authkey.hpp>
#include <steward/cpython_fetch.hpp>
#include <steward/error.hpp>
#include <steward/io/async_send_fds.hpp>

#include "sharer/framing.hpp"
#include "sharer/handshake_driver.hpp"
#include "sharer/pickle.hpp"

#include <asio/as_tuple.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/deferred.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <filesystem>
#include <sstream>

using namespace std::chrono_literals;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

namespace {

// The io_uring service opens its ring on the first socket; count descriptors after that.
int fd_count_after_warm_up(asio::io_context& ctx) {
    {
        asio::local::stream_protocol::socket s(ctx);
        s.open();
    }
    return steward::test::open_fd_count();
}

// A CPython process serving two DupFd shares (memfd, pipe) with authkey @p key.
struct cpython_server {
    steward::test::python_process py;
    steward::cpython_ident memfd_share;
    steward::cpython_ident pipe_share;

    explicit cpython_server(const steward::authkey& key)
        : py({steward::test::python_script("cpython_share_server.py"), key.to_hex()}, true) {
        memfd_share = parse(py.read_line());
        pipe_share = parse(py.read_line());
    }
    static steward::cpython_ident parse(const std::string& line) {
        std::istringstream in(line);
        steward::cpython_ident id;
        in >> id.address >> id.key;
        BOOST_REQUIRE_MESSAGE(!id.address.empty() && !id.key.empty(), "bad line from python: " << line);
        return id;
    }
    // Lets CPython exit normally so it removes its listener directory.
    int finish() {
        py.close_stdin();
        return py.wait();
    }
};

std::string read_all(int fd) {
    std::string out;
    char buf[256];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
    return out;
}

std::string pread_all(int fd) {
    char buf[256];
    const ssize_t n = ::pread(fd, buf, sizeof buf, 0);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

}  // namespace

STEWARD_CPYTHON_CORO_TEST(fetch_from_cpython_resource_sharer) {
    const int fds_before = fd_count_after_warm_up(ctx);
    {
        const auto key = steward::authkey::generate();
        cpython_server server(key);
        BOOST_TEST(std::filesystem::exists(server.memfd_share.address));

        // A wrong authkey is refused, and CPython keeps serving the share.
        auto [wrong_ec, wrong_fds] = co_await steward::async_fetch_cpython(
            ctx.get_executor(), server.memfd_share, steward::authkey::generate(), use_tuple);
        BOOST_TEST((wrong_ec == steward::errc::authentication_failed), wrong_ec.message());
        BOOST_TEST(wrong_fds.empty());

        auto [ec, fds] =
            co_await steward::async_fetch_cpython(ctx.get_executor(), server.memfd_share, key, use_tuple);
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        BOOST_REQUIRE(fds.size() == 1u);
        BOOST_TEST(pread_all(fds[0].get()) == "memfd contents from CPython");
        BOOST_TEST((::fcntl(fds[0].get(), F_GETFD) & FD_CLOEXEC) != 0);
        BOOST_TEST(std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(fds[0].get()))
                       .string()
                       .find("memfd:steward-cpython-test") != std::string::npos);

        // One-shot: the second fetch of the same ident is refused.
        auto [again_ec, again_fds] =
            co_await steward::async_fetch_cpython(ctx.get_executor(), server.memfd_share, key, use_tuple);
        BOOST_TEST((again_ec == steward::errc::share_not_available), again_ec.message());
        BOOST_TEST(again_fds.empty());

        // An unknown key gets the same answer.
        auto unknown = server.memfd_share;
        unknown.key = "340282366920938463463374607431768211455";
        auto [unknown_ec, unknown_fds] =
            co_await steward::async_fetch_cpython(ctx.get_executor(), unknown, key, use_tuple);
        BOOST_TEST((unknown_ec == steward::errc::share_not_available), unknown_ec.message());

        // The pipe share, with asio::deferred this time.
        auto [pipe_ec, pipe_fds] = co_await steward::async_fetch_cpython(
            ctx.get_executor(), server.pipe_share, key, asio::deferred)(use_tuple);
        BOOST_REQUIRE_MESSAGE(!pipe_ec, pipe_ec.message());
        BOOST_REQUIRE(pipe_fds.size() == 1u);
        BOOST_TEST(read_all(pipe_fds[0].get()) == "pipe contents from CPython");

        BOOST_TEST(server.finish() == 0);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(blocking_fetch_and_callback,
                     *boost::unit_test::precondition(steward::test::io_uring_available) *
                         boost::unit_test::precondition(steward::test::python3_available)) {
    const auto key = steward::authkey::generate();
    cpython_server server(key);
    {
        const auto fds = steward::fetch_cpython(server.memfd_share, key);
        BOOST_REQUIRE(fds.size() == 1u);
        BOOST_TEST(pread_all(fds[0].get()) == "memfd contents from CPython");
    }
    std::error_code ec;
    auto none = steward::fetch_cpython(server.memfd_share, key, ec);
    BOOST_TEST((ec == steward::errc::share_not_available));
    BOOST_TEST(none.empty());
    BOOST_CHECK_THROW((void)steward::fetch_cpython(server.memfd_share, key), std::system_error);

    // A plain callback handler.
    asio::io_context ctx;
    bool called = false;
    steward::async_fetch_cpython(ctx.get_executor(), server.pipe_share, key,
                                 [&](std::error_code result, std::vector<steward::unique_fd> fds) {
                                     called = true;
                                     BOOST_TEST(!result, result.message());
                                     BOOST_REQUIRE(fds.size() == 1u);
                                     BOOST_TEST(read_all(fds[0].get()) == "pipe contents from CPython");
                                 });
    BOOST_TEST(!called);  // never invoked from within the initiating function
    ctx.run();
    BOOST_TEST(called);
    BOOST_TEST(server.finish() == 0);
}

STEWARD_CORO_TEST(bad_idents_and_addresses) {
    const int fds_before = fd_count_after_warm_up(ctx);
    const auto key = steward::authkey::generate();
    const asio::any_io_executor ex = ctx.get_executor();
    // Named idents: GCC 12 mishandles non-trivial temporaries inside a co_await expression.
    const std::vector<std::pair<steward::cpython_ident, std::error_code>> cases = {
        {{"/tmp/x", "12a"}, steward::errc::malformed_message},
        {{"/tmp/x", "340282366920938463463374607431768211456"}, steward::errc::malformed_message},
        {{"/" + std::string(107, 'x'), "1"}, std::make_error_code(std::errc::filename_too_long)},
        {{"", "1"}, std::make_error_code(std::errc::invalid_argument)},
        {{"/nonexistent/steward-test-socket", "1"},
         std::make_error_code(std::errc::no_such_file_or_directory)},
    };
    for (const auto& [ident, expected] : cases) {
        auto [ec, fds] = co_await steward::async_fetch_cpython(ex, ident, key, use_tuple);
        BOOST_TEST((ec == expected.default_error_condition()),
                   ident.address << " " << ident.key << ": " << ec.category().name() << " " << ec.message());
        BOOST_TEST(fds.empty());
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

// A server that accepts and then stays silent: the handshake deadline ends the fetch, and so does
// a terminal cancellation.
STEWARD_CORO_TEST(silent_server_deadline_and_cancellation) {
    const int fds_before = fd_count_after_warm_up(ctx);
    char tmpl[] = "/tmp/stw-cpy-XXXXXX";
    BOOST_REQUIRE(::mkdtemp(tmpl));
    const std::string path = std::string(tmpl) + "/s";
    {
        auto acceptor = steward::test::cloexec_listener(ctx, path);
        std::vector<asio::local::stream_protocol::socket> held;
        auto accept_loop = [&]() -> asio::awaitable<void> {
            for (;;) {
                auto [ec, s] = co_await steward::test::accept_cloexec(acceptor);
                if (ec) co_return;
                held.push_back(std::move(s));
            }
        };
        asio::co_spawn(ctx, accept_loop(), asio::detached);
        const auto key = steward::authkey::generate();

        steward::cpython_fetch_options quick;
        quick.handshake_timeout = 200ms;
        const steward::cpython_ident silent{path, "1"};
        auto [ec, fds] =
            co_await steward::async_fetch_cpython(ctx.get_executor(), silent, key, use_tuple, quick);
        BOOST_TEST((ec == steward::errc::timed_out), ec.message());

        asio::cancellation_signal signal;
        asio::steady_timer timer(ctx, 100ms);
        timer.async_wait([&](std::error_code) { signal.emit(asio::cancellation_type::terminal); });
        auto [cec, cfds] = co_await steward::async_fetch_cpython(
            ctx.get_executor(), silent, key, asio::bind_cancellation_slot(signal.slot(), use_tuple));
        BOOST_TEST((cec == asio::error::operation_aborted), cec.message());
        BOOST_TEST(cfds.empty());
        acceptor.close();
        co_await asio::post(ctx, asio::use_awaitable);  // let the accept loop see the close
        held.clear();
    }
    std::filesystem::remove_all(tmpl);
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

// ---- against a scripted server that checks what CPython 3.14's server checks --------------------

namespace {

struct scripted_reply {
    std::byte data{1};
    int fd_count = 1;
};

struct server_view {
    std::error_code handshake;
    steward::detail::pickle::decoded request;
    std::error_code request_ec;
    std::string ack;  // what the client sent after the descriptors (3.14 waits for "A")
};

// Accepts one connection and answers like CPython's resource_sharer server would, with the
// given data byte and number of descriptors (memfds holding "scripted").
asio::awaitable<server_view> scripted_server(asio::local::stream_protocol::acceptor& acceptor,
                                             const steward::authkey& key, scripted_reply reply) {
    server_view view;
    auto [aec, socket] = co_await steward::test::accept_cloexec(acceptor);
    BOOST_REQUIRE(!aec);
    view.handshake = co_await steward::detail::authenticate_as_server(socket, key);
    if (view.handshake) co_return view;
    std::vector<std::byte> payload;
    view.request_ec = co_await steward::detail::read_frame(socket, payload, 256);
    if (view.request_ec) co_return view;
    view.request = steward::detail::pickle::decode(payload, view.request_ec);
    std::vector<steward::unique_fd> fds;
    std::vector<int> numbers;
    for (int i = 0; i < reply.fd_count; ++i) {
        fds.emplace_back(::memfd_create("scripted", MFD_CLOEXEC));
        BOOST_REQUIRE(fds.back());
        BOOST_REQUIRE(::write(fds.back().get(), "scripted", 8) == 8);
        numbers.push_back(fds.back().get());
    }
    auto [sec, sent] =
        co_await steward::io::async_send_fds(socket, numbers, asio::buffer(&reply.data, 1), use_tuple);
    BOOST_REQUIRE(!sec);
    fds.clear();  // CPython's server closes its copy right after sending
    char ack[4];
    auto [rec, n] = co_await socket.async_receive(asio::buffer(ack), use_tuple);
    if (!rec) view.ack.assign(ack, n);
    co_return view;
}

}  // namespace

STEWARD_CORO_TEST(scripted_server_checks) {
    using namespace asio::experimental::awaitable_operators;
    const int fds_before = fd_count_after_warm_up(ctx);
    char tmpl[] = "/tmp/stw-cpy-XXXXXX";
    BOOST_REQUIRE(::mkdtemp(tmpl));
    const std::string path = std::string(tmpl) + "/s";
    const auto key = steward::authkey::generate();
    const steward::cpython_ident ident{path, "340282366920938463463374607431768211455"};
    const asio::any_io_executor ex = ctx.get_executor();
    {
        auto acceptor = steward::test::cloexec_listener(ctx, path);

        // The request is (key, os.getpid()) with the full 128-bit key; the client acknowledges.
        auto [view, result] = co_await (scripted_server(acceptor, key, {std::byte{1}, 1}) &&
                                        steward::async_fetch_cpython(ex, ident, key, use_tuple));
        auto& [ec, fds] = result;
        BOOST_TEST(!view.handshake);
        BOOST_TEST(!view.request_ec);
        BOOST_TEST((view.request.kind == steward::detail::pickle::value_kind::request));
        BOOST_TEST((view.request.request.key == steward::share_key{~0ULL, ~0ULL}));
        BOOST_TEST(view.request.request.pid == ::getpid());
        BOOST_TEST(view.ack == "A");
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        BOOST_REQUIRE(fds.size() == 1u);
        BOOST_TEST(pread_all(fds[0].get()) == "scripted");

        // Several descriptors with the matching count byte are accepted.
        auto [view2, result2] = co_await (scripted_server(acceptor, key, {std::byte{2}, 2}) &&
                                          steward::async_fetch_cpython(ex, ident, key, use_tuple));
        BOOST_TEST(!std::get<0>(result2));
        BOOST_TEST(std::get<1>(result2).size() == 2u);
        BOOST_TEST(view2.ack == "A");

        // A data byte that does not match the count, or no descriptors at all: refused, and
        // whatever arrived is closed (checked by the descriptor count below).
        auto [view3, result3] = co_await (scripted_server(acceptor, key, {std::byte{7}, 1}) &&
                                          steward::async_fetch_cpython(ex, ident, key, use_tuple));
        BOOST_TEST((std::get<0>(result3) == steward::errc::malformed_message));
        BOOST_TEST(std::get<1>(result3).empty());
        BOOST_TEST(view3.ack.empty());  // no acknowledgement for a refused reply
        auto [view4, result4] = co_await (scripted_server(acceptor, key, {std::byte{1}, 0}) &&
                                          steward::async_fetch_cpython(ex, ident, key, use_tuple));
        BOOST_TEST((std::get<0>(result4) == steward::errc::malformed_message));
        (void)view4;
    }
    std::filesystem::remove_all(tmpl);
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}
