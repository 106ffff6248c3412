#include <steward/cpython_fetch.hpp>
#include <steward/io/backend_probe.hpp>

#include <steward/error.hpp>
#include <steward/io/async_recv_fds.hpp>

#include "sharer/handshake_driver.hpp"
#include "sharer/pickle.hpp"

#include <asio/as_tuple.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <exception>
#include <new>

namespace steward {
namespace detail {
namespace {

using fetch_result = std::pair<std::error_code, std::vector<unique_fd>>;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t max_address = 107;  // sun_path[108] minus the terminating NUL

struct reply_result {
    std::error_code ec;
    std::size_t bytes = 0;
    std::vector<unique_fd> fds;
};

asio::awaitable<reply_result> receive_reply(local_socket& socket, std::byte& data) {
    auto [ec, bytes, fds] = co_await io::async_recv_fds(socket, asio::buffer(&data, 1), use_tuple);
    co_return reply_result{ec, bytes, std::move(fds)};
}

// The reply, or errc::timed_out / operation_aborted. Descriptors of a failed or late reply are
// closed by the vector's destructor.
asio::awaitable<reply_result> receive_reply_until(local_socket& socket, std::byte& data,
                                                  std::chrono::steady_clock::duration timeout) {
    using namespace asio::experimental::awaitable_operators;
    asio::steady_timer timer(socket.get_executor(), timeout);
    auto result = co_await (receive_reply(socket, data) || timer.async_wait(use_tuple));
    if (result.index() == 0) co_return std::move(std::get<0>(result));
    const auto [timer_ec] = std::get<1>(result);
    co_return reply_result{
        timer_ec ? std::error_code(asio::error::operation_aborted) : make_error_code(errc::timed_out), 0, {}};
}

// Asio reports errno values in its own "asio.system" category, which does not compare equal to
// std::errc conditions; steward hands out std::system_category() codes (errno_code), except for
// asio::error::operation_aborted, which callers compare against Asio's constant.
std::error_code normalize(std::error_code ec) noexcept {
    if (ec && ec.category() == asio::error::get_system_category() && ec != asio::error::operation_aborted)
        return errno_code(ec.value());
    return ec;
}

asio::awaitable<fetch_result> fetch_cpython_coro(cpython_ident ident, authkey key,
                                                 cpython_fetch_options options) {
    auto fail = [](std::error_code ec) { return fetch_result{ec, std::vector<unique_fd>{}}; };
    std::error_code ec;
    const share_key share = share_key::from_decimal(ident.key, ec);
    if (ec) co_return fail(ec);
    if (ident.address.empty() || ident.address.find('\0') != std::string::npos)
        co_return fail(std::make_error_code(std::errc::invalid_argument));
    if (ident.address.size() > max_address)
        co_return fail(std::make_error_code(std::errc::filename_too_long));

    if (auto probe = io::io_uring_status()) co_return fail(probe);  // cached per process

    // Asio opens sockets without SOCK_CLOEXEC; open it ourselves and hand it over.
    unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) co_return fail(errno_code(errno));
    local_socket socket(co_await asio::this_coro::executor);
    socket.assign(asio::local::stream_protocol(), fd.get(), ec);
    if (ec) co_return fail(ec);
    (void)fd.release();

    const asio::local::stream_protocol::endpoint endpoint(ident.address);
    auto [connect_ec] = co_await socket.async_connect(endpoint, use_tuple);
    if (connect_ec) co_return fail(connect_ec);

    ec = co_await authenticate_as_client(socket, key, options.handshake_timeout);
    if (ec) co_return fail(ec);

    // CPython's client sends pickle.dumps((key, os.getpid())) with its default protocol; 4 is
    // what 3.8-3.13 write and every version reads.
    const std::vector<std::byte> request = pickle::encode_request(share, ::getpid(), 4);
    ec = co_await write_frame(socket, request);
    if (ec == asio::error::broken_pipe || ec == asio::error::connection_reset)
        co_return fail(errc::share_not_available);
    if (ec) co_return fail(ec);

    std::byte data{};
    reply_result reply = co_await receive_reply_until(socket, data, options.reply_timeout);
    // An unknown or used key: the server's thread raised KeyError and closed the connection.
    if (reply.ec == asio::error::eof || reply.ec == asio::error::connection_reset)
        co_return fail(errc::share_not_available);
    if (reply.ec) co_return fail(reply.ec);
    if (reply.bytes != 1 || reply.fds.empty() || std::to_integer<std::size_t>(data) != reply.fds.size() % 256)
        co_return fail(errc::malformed_message);

    // CPython 3.14+ servers wait for this byte; older ones may have closed already (EPIPE), and
    // a full socket buffer (EAGAIN) cannot happen with nothing else in flight. Never blocks.
    static constexpr char ack = 'A';
    (void)::send(socket.native_handle(), &ack, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    co_return fetch_result{std::error_code{}, std::move(reply.fds)};
}

}  // namespace

void start_fetch_cpython(asio::any_io_executor executor, cpython_ident ident, authkey key,
                         cpython_fetch_options options, cpython_fetch_handler handler) {
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto handler_executor = asio::get_associated_executor(handler, executor);
    asio::co_spawn(
        executor, fetch_cpython_coro(std::move(ident), key, options),
        asio::bind_cancellation_slot(
            slot, asio::bind_executor(handler_executor, [h = std::move(handler)](std::exception_ptr e,
                                                                                 fetch_result r) mutable {
                if (e) {
                    std::error_code ec = std::make_error_code(std::errc::not_enough_memory);
                    try {
                        std::rethrow_exception(e);
                    } catch (const std::system_error& se) {
                        ec = se.code();
                    } catch (...) {
                    }
                    std::move(h)(ec, std::vector<unique_fd>{});
                    return;
                }
                std::move(h)(normalize(r.first), std::move(r.second));
            })));
}

}  // namespace detail

std::vector<unique_fd> fetch_cpython(const cpython_ident& ident, const authkey& key, std::error_code& ec,
                                     cpython_fetch_options options) noexcept {
    try {
        asio::io_context ctx;
        std::vector<unique_fd> out;
        ec = make_error_code(errc::timed_out);
        async_fetch_cpython(
            ctx.get_executor(), ident, key,
            [&](std::error_code result, std::vector<unique_fd> fds) {
                ec = result;
                out = std::move(fds);
            },
            options);
        ctx.run();
        return out;
    } catch (const std::system_error& e) {
        ec = e.code();
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
    } catch (...) {
        ec = std::make_error_code(std::errc::io_error);
    }
    return {};
}

std::vector<unique_fd> fetch_cpython(const cpython_ident& ident, const authkey& key,
                                     cpython_fetch_options options) {
    std::error_code ec;
    std::vector<unique_fd> fds = fetch_cpython(ident, key, ec, options);
    throw_if(ec, "steward::fetch_cpython");
    return fds;
}

}  // namespace steward
