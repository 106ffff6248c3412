#define BOOST_TEST_MODULE io_immediate_completion_test
#include "support/test_support.hpp"

// Operations that complete at once (detail/immediate.hpp): use_awaitable resumes the coroutine
// without an executor round trip and without growing the stack; every other token follows Asio's
// rule (dispatch on the associated immediate executor, a post by default, so never inside the
// initiating call); cancellation of operations that do wait is unchanged.

#include <steward/error.hpp>
#include <steward/io/async_recv_fds.hpp>
#include <steward/io/async_send_fds.hpp>
#include <steward/io/async_write_message.hpp>
#include <steward/unique_fd.hpp>

#include <asio/as_tuple.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_immediate_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/system_executor.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using steward::unique_fd;
namespace sio = steward::io;
using stream_socket = asio::local::stream_protocol::socket;

struct fd_balance {
    int before = steward::test::open_fd_count();
    ~fd_balance() { BOOST_TEST(steward::test::open_fd_count() == before); }
};

// In a coroutine test the io_context's ring is set up by its first I/O object: create one before
// counting, so the count sees only what the test itself opens.
struct ring_ready {
    explicit ring_ready(asio::io_context& ctx) { asio::posix::stream_descriptor warm(ctx); }
};

struct pipe_pair {
    unique_fd read_end;
    unique_fd write_end;
};

pipe_pair make_pipe() {
    int fds[2];
    BOOST_REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    return {unique_fd{fds[0]}, unique_fd{fds[1]}};
}

std::array<unique_fd, 2> make_socketpair() {
    int sv[2];
    BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    return {unique_fd{sv[0]}, unique_fd{sv[1]}};
}

stream_socket adopt(asio::io_context& ctx, unique_fd fd) {
    stream_socket s(ctx);
    s.assign(asio::local::stream_protocol(), fd.get());
    (void)fd.release();
    return s;
}

int bytes_in(int fd) {
    int n = -1;
    BOOST_REQUIRE(::ioctl(fd, FIONREAD, &n) == 0);
    return n;
}

std::string drain(int fd) {
    std::string out;
    char buf[4096];
    ssize_t n = 0;
    while ((n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) out.append(buf, static_cast<std::size_t>(n));
    return out;
}

// Fills the pipe without blocking and without touching its file status flags.
void fill_pipe(int fd) {
    static std::array<char, 4096> page{};
    iovec iov{page.data(), page.size()};
    while (::pwritev2(fd, &iov, 1, -1, RWF_NOWAIT) > 0) {
    }
}

// A handler posted before the operation runs before anything that comes back through the executor
// (the scheduler is FIFO), so `posted` still false after the co_await proves that the coroutine
// was resumed without an executor round trip.
struct post_probe {
    bool ran = false;
    explicit post_probe(asio::io_context& ctx) {
        asio::post(ctx, [this] { ran = true; });
    }
};

constexpr char message[] = "REGISTER:/psm_immediate:shared_memory\n";
constexpr std::size_t message_size = sizeof message - 1;

}  // namespace

STEWARD_CORO_TEST(use_awaitable_write_that_completes_at_once_skips_the_executor) {
    ring_ready ring(ctx);
    fd_balance fds;
    pipe_pair p = make_pipe();
    asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
    {
        post_probe probe(ctx);
        const std::size_t n =
            co_await sio::async_write_message(pipe, asio::buffer(message, message_size), asio::use_awaitable);
        BOOST_TEST(n == message_size);
        BOOST_TEST(!probe.ran);
        BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(message_size));
        co_await asio::post(ctx, asio::use_awaitable);
        BOOST_TEST(probe.ran);
    }
    {
        post_probe probe(ctx);
        auto [ec, n] = co_await sio::async_write_message(pipe, asio::buffer(message, message_size),
                                                         asio::as_tuple(asio::use_awaitable));
        BOOST_TEST(!ec);
        BOOST_TEST(n == message_size);
        BOOST_TEST(!probe.ran);
        co_await asio::post(ctx, asio::use_awaitable);
    }
    {
        // An immediate error is delivered the same way: thrown for use_awaitable...
        post_probe probe(ctx);
        const std::string too_long(sio::max_message_size + 1, 'x');
        bool threw = false;
        try {
            (void)co_await sio::async_write_message(pipe, asio::buffer(too_long), asio::use_awaitable);
        } catch (const std::system_error& e) {
            threw = e.code() == steward::errc::message_too_long;
        }
        BOOST_TEST(threw);
        BOOST_TEST(!probe.ran);
        // ... and handed over in the tuple for as_tuple(use_awaitable).
        auto [ec, n] = co_await sio::async_write_message(pipe, asio::buffer(too_long),
                                                         asio::as_tuple(asio::use_awaitable));
        BOOST_TEST((ec == steward::errc::message_too_long));
        BOOST_TEST(n == 0u);
        BOOST_TEST(!probe.ran);
        co_await asio::post(ctx, asio::use_awaitable);
    }
    BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(2 * message_size));
}

STEWARD_CORO_TEST(use_awaitable_send_and_receive_that_complete_at_once_skip_the_executor) {
    ring_ready ring(ctx);
    fd_balance fds;
    auto [a, b] = make_socketpair();
    stream_socket sender = adopt(ctx, std::move(a));
    stream_socket receiver = adopt(ctx, std::move(b));
    pipe_pair carried = make_pipe();
    const int carried_fd = carried.write_end.get();

    post_probe probe(ctx);
    const std::size_t sent = co_await sio::async_send_fds(sender, std::span<const int>(&carried_fd, 1),
                                                          asio::buffer("m", 1), asio::use_awaitable);
    BOOST_TEST(sent == 1u);
    BOOST_TEST(!probe.ran);

    char c = 0;
    auto [n, got] = co_await sio::async_recv_fds(receiver, asio::buffer(&c, 1), asio::use_awaitable);
    BOOST_TEST(n == 1u);
    BOOST_TEST(c == 'm');
    BOOST_REQUIRE(got.size() == 1u);
    BOOST_TEST((::fcntl(got[0].get(), F_GETFD) & FD_CLOEXEC) != 0);
    BOOST_TEST(!probe.ran);

    auto [ec, n2] =
        co_await sio::async_send_fds(sender, {}, asio::buffer("n", 1), asio::as_tuple(asio::use_awaitable));
    BOOST_TEST(!ec);
    BOOST_TEST(n2 == 1u);
    auto [ec3, n3, got3] =
        co_await sio::async_recv_fds(receiver, asio::buffer(&c, 1), asio::as_tuple(asio::use_awaitable));
    BOOST_TEST(!ec3);
    BOOST_TEST(n3 == 1u);
    BOOST_TEST(got3.empty());
    BOOST_TEST(!probe.ran);
    co_await asio::post(ctx, asio::use_awaitable);
    BOOST_TEST(probe.ran);
}

// A callback is never invoked inside the initiating call (the default immediate executor posts),
// and it runs on the I/O executor's thread when the context runs.
BOOST_AUTO_TEST_CASE(callback_is_not_invoked_inside_the_initiating_call,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    fd_balance fds;
    asio::io_context ctx;
    pipe_pair p = make_pipe();
    asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
    auto [a, b] = make_socketpair();
    stream_socket sender = adopt(ctx, std::move(a));
    stream_socket receiver = adopt(ctx, std::move(b));

    int calls = 0;
    std::error_code write_ec, send_ec, recv_ec, refused_ec;
    std::size_t written = 0, sent = 0, received = 0;
    std::vector<unique_fd> got;
    char c = 0;

    sio::async_write_message(pipe, asio::buffer(message, message_size),
                             [&](std::error_code ec, std::size_t n) {
                                 ++calls;
                                 write_ec = ec;
                                 written = n;
                             });
    BOOST_TEST(calls == 0);
    BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(message_size));  // the write itself happened

    sio::async_send_fds(sender, {}, asio::buffer("x", 1), [&](std::error_code ec, std::size_t n) {
        ++calls;
        send_ec = ec;
        sent = n;
    });
    BOOST_TEST(calls == 0);

    sio::async_recv_fds(receiver, asio::buffer(&c, 1),
                        [&](std::error_code ec, std::size_t n, std::vector<unique_fd> f) {
                            ++calls;
                            recv_ec = ec;
                            received = n;
                            got = std::move(f);
                        });
    BOOST_TEST(calls == 0);

    // An error found before any system call is no exception.
    const std::array<int, 254> too_many{};
    sio::async_send_fds(sender, too_many, asio::buffer("y", 1), [&](std::error_code ec, std::size_t) {
        ++calls;
        refused_ec = ec;
    });
    BOOST_TEST(calls == 0);

    ctx.run();
    BOOST_TEST(calls == 4);
    BOOST_TEST(!write_ec);
    BOOST_TEST(written == message_size);
    BOOST_TEST(!send_ec);
    BOOST_TEST(sent == 1u);
    BOOST_TEST(!recv_ec);
    BOOST_TEST(received == 1u);
    BOOST_TEST(c == 'x');
    BOOST_TEST((refused_ec == steward::errc::too_many_fds));
}

// asio::bind_immediate_executor is how a caller allows the handler to run inside the call.
BOOST_AUTO_TEST_CASE(bound_immediate_executor_runs_the_handler_inside_the_call,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    fd_balance fds;
    asio::io_context ctx;
    pipe_pair p = make_pipe();
    asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
    int calls = 0;
    sio::async_write_message(
        pipe, asio::buffer(message, message_size),
        asio::bind_immediate_executor(asio::system_executor(), [&](std::error_code ec, std::size_t n) {
            BOOST_TEST(!ec);
            BOOST_TEST(n == message_size);
            ++calls;
        }));
    BOOST_TEST(calls == 1);
    // Binding the io_context's own executor: its dispatch runs inline only on a thread that runs
    // the context, so from here (outside run()) it is still queued.
    sio::async_write_message(
        pipe, asio::buffer(message, message_size),
        asio::bind_immediate_executor(ctx.get_executor(), [&](std::error_code, std::size_t) { ++calls; }));
    BOOST_TEST(calls == 1);
    ctx.run();
    BOOST_TEST(calls == 2);
}

// Deferred: nothing happens until the operation is launched; then the usual rules apply.
STEWARD_CORO_TEST(deferred_operations_start_when_launched) {
    ring_ready ring(ctx);
    fd_balance fds;
    pipe_pair p = make_pipe();
    asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
    auto op = sio::async_write_message(pipe, asio::buffer(message, message_size), asio::deferred);
    BOOST_TEST(bytes_in(p.read_end.get()) == 0);
    const std::size_t n = co_await std::move(op)(asio::use_awaitable);
    BOOST_TEST(n == message_size);
    BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(message_size));

    auto op2 = sio::async_write_message(pipe, asio::buffer(message, message_size), asio::deferred);
    BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(message_size));
    auto [ec, n2] = co_await std::move(op2)(asio::as_tuple(asio::deferred));
    BOOST_TEST(!ec);
    BOOST_TEST(n2 == message_size);
    BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(2 * message_size));

    // use_awaitable is lazy too: the awaitable does nothing until it is awaited.
    auto lazy = sio::async_write_message(pipe, asio::buffer(message, message_size), asio::use_awaitable);
    BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(2 * message_size));
    BOOST_TEST(co_await std::move(lazy) == message_size);
    BOOST_TEST(bytes_in(p.read_end.get()) == static_cast<int>(3 * message_size));
}

namespace {

// Runs @p fn on a thread with a small stack: unbounded recursion would overflow it quickly.
template <typename Fn>
void run_on_small_stack(Fn fn, std::size_t stack_bytes) {
    struct ctx_t {
        Fn* fn;
        std::exception_ptr error;
    } c{&fn, nullptr};
    pthread_attr_t attr;
    BOOST_REQUIRE(::pthread_attr_init(&attr) == 0);
    BOOST_REQUIRE(::pthread_attr_setstacksize(&attr, stack_bytes) == 0);
    pthread_t th;
    // No Boost.Test call on this thread while the other one runs (its log is not thread-safe).
    const int created = ::pthread_create(
        &th, &attr,
        [](void* arg) -> void* {
            auto* shared = static_cast<ctx_t*>(arg);
            try {
                (*shared->fn)();
            } catch (...) {
                shared->error = std::current_exception();
            }
            return nullptr;
        },
        &c);
    if (created == 0) ::pthread_join(th, nullptr);
    ::pthread_attr_destroy(&attr);
    BOOST_REQUIRE(created == 0);
    if (c.error) std::rethrow_exception(c.error);
}

// Stack depth seen at each iteration, as the spread of a local's address.
struct stack_spread {
    std::uintptr_t lowest = UINTPTR_MAX;
    std::uintptr_t highest = 0;
    void sample() {
        volatile char here = 0;
        const auto at = reinterpret_cast<std::uintptr_t>(&here);
        lowest = std::min(lowest, at);
        highest = std::max(highest, at);
    }
    [[nodiscard]] std::uintptr_t bytes() const { return highest - lowest; }
};

// Generous for ASan's bigger frames; recursion over a million completions would need hundreds of
// megabytes, and even 1000 nested completions would exceed it.
constexpr std::size_t small_stack = 1 << 20;
constexpr std::uintptr_t max_spread = 64 * 1024;

}  // namespace

// A million co_awaits that each complete at once, on a 1 MiB stack: the stack stays flat.
BOOST_AUTO_TEST_CASE(a_million_immediate_co_awaits_do_not_grow_the_stack,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    fd_balance fds;
    constexpr std::size_t iterations = 1000000;
    constexpr std::size_t real_writes = 20000;  // with a system call each; the rest fail their checks
    stack_spread spread;
    std::size_t completed = 0;
    std::size_t written = 0;
    run_on_small_stack(
        [&] {
            asio::io_context ctx(1);
            pipe_pair p = make_pipe();
            asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
            const std::string too_long(sio::max_message_size + 1, 'x');
            bool executor_ran = false;
            asio::co_spawn(
                ctx,
                [&]() -> asio::awaitable<void> {
                    asio::post(ctx, [&] { executor_ran = true; });
                    for (std::size_t i = 0; i < iterations; ++i) {
                        spread.sample();
                        if (i < real_writes) {
                            written += co_await sio::async_write_message(
                                pipe, asio::buffer(message, message_size), asio::use_awaitable);
                            if (i % 1000 == 999) {
                                std::vector<char> sink(1000 * message_size);
                                BOOST_REQUIRE(::read(p.read_end.get(), sink.data(), sink.size()) ==
                                              static_cast<ssize_t>(sink.size()));
                            }
                        } else {
                            auto [ec, n] = co_await sio::async_write_message(
                                pipe, asio::buffer(too_long), asio::as_tuple(asio::use_awaitable));
                            if (ec != steward::errc::message_too_long || n != 0) co_return;
                        }
                        ++completed;
                    }
                    // The whole loop ran before the handler posted at its start: no round trips.
                    BOOST_TEST(!executor_ran);
                },
                asio::detached);
            ctx.run();
        },
        small_stack);
    BOOST_TEST(completed == iterations);
    BOOST_TEST(written == real_writes * message_size);
    BOOST_TEST_MESSAGE("stack spread over the loop: " << spread.bytes() << " bytes");
    BOOST_TEST(spread.bytes() < max_spread);
}

// The callback form: a chain where each immediate completion starts the next operation goes
// through the executor each time (default immediate executor), so it cannot recurse either.
BOOST_AUTO_TEST_CASE(a_callback_chain_of_immediate_completions_does_not_recurse,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    fd_balance fds;
    constexpr std::size_t iterations = 100000;
    stack_spread spread;
    std::size_t completed = 0;
    run_on_small_stack(
        [&] {
            asio::io_context ctx(1);
            pipe_pair p = make_pipe();
            asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
            const std::string too_long(sio::max_message_size + 1, 'x');
            std::function<void(std::error_code, std::size_t)> next = [&](std::error_code ec, std::size_t) {
                spread.sample();
                if (completed != 0 && ec != steward::errc::message_too_long) return;
                if (++completed > iterations) return;
                sio::async_write_message(pipe, asio::buffer(too_long), next);
            };
            next({}, 0);
            ctx.run();
        },
        small_stack);
    BOOST_TEST(completed == iterations + 1);
    BOOST_TEST(spread.bytes() < max_spread);
}

// Operations that have to wait are still cancellable through the token's slot, and one that
// completes at once leaves no handler behind in the slot.
STEWARD_CORO_TEST(cancellation_still_works_and_immediate_completions_leave_the_slot_empty) {
    ring_ready ring(ctx);
    fd_balance fds;
    {
        // A receive with nothing to read waits; emitting the signal ends it, nothing consumed.
        auto [a, b] = make_socketpair();
        stream_socket receiver = adopt(ctx, std::move(a));
        asio::cancellation_signal signal;
        asio::steady_timer timer(ctx, std::chrono::milliseconds(10));
        timer.async_wait([&](std::error_code) { signal.emit(asio::cancellation_type::total); });
        char c = 0;
        auto [ec, n, got] = co_await sio::async_recv_fds(
            receiver, asio::buffer(&c, 1),
            asio::bind_cancellation_slot(signal.slot(), asio::as_tuple(asio::use_awaitable)));
        BOOST_TEST((ec == asio::error::operation_aborted));
        BOOST_TEST(n == 0u);
        BOOST_TEST(got.empty());
        BOOST_TEST(::send(b.get(), "z", 1, 0) == 1);
        auto [n2, got2] = co_await sio::async_recv_fds(receiver, asio::buffer(&c, 1), asio::use_awaitable);
        BOOST_TEST(n2 == 1u);
        BOOST_TEST(c == 'z');
    }
    {
        // A write to a full pipe waits; cancelling it writes nothing.
        pipe_pair p = make_pipe();
        fill_pipe(p.write_end.get());
        const int queued = bytes_in(p.read_end.get());
        asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
        asio::cancellation_signal signal;
        asio::steady_timer timer(ctx, std::chrono::milliseconds(10));
        timer.async_wait([&](std::error_code) { signal.emit(asio::cancellation_type::terminal); });
        auto [ec, n] = co_await sio::async_write_message(
            pipe, asio::buffer(message, message_size),
            asio::bind_cancellation_slot(signal.slot(), asio::as_tuple(asio::use_awaitable)));
        BOOST_TEST((ec == asio::error::operation_aborted));
        BOOST_TEST(n == 0u);
        BOOST_TEST(bytes_in(p.read_end.get()) == queued);
    }
    {
        // Immediate completion with a bound slot, callback and coroutine forms.
        auto [a, b] = make_socketpair();
        stream_socket sender = adopt(ctx, std::move(a));
        asio::cancellation_signal signal;
        std::error_code got_ec = asio::error::would_block;
        sio::async_send_fds(sender, {}, asio::buffer("q", 1),
                            asio::bind_cancellation_slot(
                                signal.slot(), [&](std::error_code ec, std::size_t) { got_ec = ec; }));
        BOOST_TEST(!signal.slot().has_handler());
        co_await asio::post(ctx, asio::use_awaitable);
        BOOST_TEST(!got_ec);
        auto [ec, n] = co_await sio::async_send_fds(
            sender, {}, asio::buffer("r", 1),
            asio::bind_cancellation_slot(signal.slot(), asio::as_tuple(asio::use_awaitable)));
        BOOST_TEST(!ec);
        BOOST_TEST(n == 1u);
        BOOST_TEST(!signal.slot().has_handler());
        signal.emit(asio::cancellation_type::terminal);  // nobody listens: harmless
        BOOST_TEST(drain(b.get()) == "qr");
    }
}
