// Cost of co_await-ing a steward operation that completes at once, against a liburing NOP round
// trip (the cheapest thing a ring can do: one io_uring_enter that submits and reaps).
//
// scenario coawait_send:  co_await io::async_send_fds(socket, {}, 1 byte) on a socketpair whose
//                         peer is drained every 128 sends (one recv takes them all)
// scenario coawait_send_fd: the same with one descriptor attached to every byte (SCM_RIGHTS); the
//                         peer's drain receives and closes them (variants steward, nop, raw, post)
// scenario coawait_write: co_await io::async_write_message(pipe, 40-byte message) on a pipe whose
//                         read end is drained every 1000 writes
// variants:
//   steward  the co_await (one coroutine on an io_context with steward's io_uring backend)
//   nop      liburing: get_sqe + prep_nop + submit_and_wait(1) + cqe_seen
//   raw      the same syscall the operation makes (sendmsg / write), blocking, no library
//   post     co_await asio::post(use_awaitable): the executor round trip alone
//   callback the same operation with a plain callback that starts the next one; Asio's contract
//            for non-awaitable tokens sends an immediate completion through a post (the
//            handler's default immediate executor), so this shows that path
//   same_syscalls (coawait_write only) the four system calls async_write_message makes per
//            message (fstat, rt_sigprocmask x2, pwritev2), blocking, no library
// value: nanoseconds per operation. steward - raw is the library's own cost per operation.

#include "bench_common.hpp"

#include <steward/io/async_send_fds.hpp>
#include <steward/io/async_write_message.hpp>
#include <steward/io_uring_check.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>

#include <liburing.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <csignal>
#include <cstring>
#include <functional>
#include <span>

namespace {

constexpr std::size_t send_drain_every = 128;
constexpr std::size_t write_drain_every = 1000;
constexpr char message[] = "REGISTER:/psm_0123456789:shared_memory\n";  // 39 bytes + NUL
constexpr std::size_t message_size = sizeof message - 1;

void drain(int fd) {
    static char sink[1 << 16];
    while (::recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0) {
    }
}

// Receives everything queued, closing the descriptors that came with it (one recvmsg per batch:
// a stream socket never returns bytes of two descriptor batches in one call).
void drain_with_fds(int fd) {
    alignas(cmsghdr) static char control[CMSG_SPACE(253 * sizeof(int))];
    static char sink[1 << 16];
    for (;;) {
        iovec iov{sink, sizeof sink};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        if (::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC) <= 0) return;
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int received = -1;
                std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof received);
                ::close(received);
            }
        }
    }
}

void drain_pipe(int fd) {
    static char sink[1 << 16];
    const int queued = bench::pipe_bytes_queued(fd);
    if (queued > 0) bench::read_all(fd, sink, static_cast<std::size_t>(queued));
}

double run_nop(std::size_t n) {
    io_uring ring{};
    if (const int rc = ::io_uring_queue_init(64, &ring, 0); rc < 0) {
        errno = -rc;
        bench::die("io_uring_queue_init");
    }
    auto once = [&] {
        io_uring_sqe* sqe = ::io_uring_get_sqe(&ring);
        ::io_uring_prep_nop(sqe);
        ::io_uring_submit_and_wait(&ring, 1);
        io_uring_cqe* cqe = nullptr;
        ::io_uring_peek_cqe(&ring, &cqe);
        ::io_uring_cqe_seen(&ring, cqe);
    };
    for (std::size_t i = 0; i < 1000; ++i) once();
    const auto t0 = bench::clock::now();
    for (std::size_t i = 0; i < n; ++i) once();
    const double s = bench::seconds_since(t0);
    ::io_uring_queue_exit(&ring);
    return s;
}

// @p carried: -1 sends the byte alone, otherwise that descriptor rides along (SCM_RIGHTS).
double run_raw_send(std::size_t n, int carried = -1) {
    int sv[2];
    bench::check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    char byte = 'x';
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    auto once = [&](std::size_t i) {
        iovec iov{&byte, 1};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (carried >= 0) {
            msg.msg_control = control;
            msg.msg_controllen = sizeof control;
            cmsghdr* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            std::memcpy(CMSG_DATA(c), &carried, sizeof carried);
        }
        bench::check(::sendmsg(sv[0], &msg, MSG_NOSIGNAL) == 1, "sendmsg");
        if (i % send_drain_every == send_drain_every - 1) carried >= 0 ? drain_with_fds(sv[1]) : drain(sv[1]);
    };
    for (std::size_t i = 0; i < 1024; ++i) once(i);
    const auto t0 = bench::clock::now();
    for (std::size_t i = 0; i < n; ++i) once(i);
    const double s = bench::seconds_since(t0);
    ::close(sv[0]);
    ::close(sv[1]);
    return s;
}

double run_raw_write(std::size_t n) {
    int p[2];
    bench::check(::pipe2(p, O_CLOEXEC) == 0, "pipe2");
    auto once = [&](std::size_t i) {
        bench::check(::write(p[1], message, message_size) == static_cast<ssize_t>(message_size), "write");
        if (i % write_drain_every == write_drain_every - 1) drain_pipe(p[0]);
    };
    for (std::size_t i = 0; i < 1000; ++i) once(i);
    const auto t0 = bench::clock::now();
    for (std::size_t i = 0; i < n; ++i) once(i);
    const double s = bench::seconds_since(t0);
    ::close(p[0]);
    ::close(p[1]);
    return s;
}

// The four system calls io::async_write_message makes per message (the pipe check, SIGPIPE blocked,
// the RWF_NOWAIT write, the mask restored), blocking and without a library: what the operation
// would cost if its plumbing were free.
double run_same_syscalls_write(std::size_t n) {
    int p[2];
    bench::check(::pipe2(p, O_CLOEXEC) == 0, "pipe2");
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    auto once = [&](std::size_t i) {
        struct stat st {};
        bench::check(::fstat(p[1], &st) == 0 && S_ISFIFO(st.st_mode), "fstat");
        sigset_t old_mask;
        ::pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask);
        iovec iov{const_cast<char*>(message), message_size};
        const ssize_t w = ::pwritev2(p[1], &iov, 1, -1, RWF_NOWAIT);
        ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
        bench::check(w == static_cast<ssize_t>(message_size), "pwritev2");
        if (i % write_drain_every == write_drain_every - 1) drain_pipe(p[0]);
    };
    for (std::size_t i = 0; i < 1000; ++i) once(i);
    const auto t0 = bench::clock::now();
    for (std::size_t i = 0; i < n; ++i) once(i);
    const double s = bench::seconds_since(t0);
    ::close(p[0]);
    ::close(p[1]);
    return s;
}

// Callback chain: each completion starts the next operation. With the default immediate executor
// every completion is posted, so the chain never recurses.
template <typename Start>
double run_callback_chain(asio::io_context& ctx, std::size_t warmup, std::size_t n, Start start) {
    std::size_t remaining = warmup + n;
    bench::clock::time_point t0{};
    double seconds = 0;
    std::error_code failure;
    std::function<void(std::error_code, std::size_t)> next;
    next = [&](std::error_code ec, std::size_t) {
        if (ec) {
            failure = ec;
            return;
        }
        if (remaining == n) t0 = bench::clock::now();
        if (remaining == 0) {
            seconds = bench::seconds_since(t0);
            return;
        }
        --remaining;
        start(remaining, next);
    };
    asio::post(ctx, [&] { next({}, 0); });
    ctx.run();
    if (failure) throw std::system_error(failure);
    return seconds;
}

double run_callback_send(std::size_t n) {
    int sv[2];
    bench::check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    asio::io_context ctx(1);
    asio::local::stream_protocol::socket sock(ctx, asio::local::stream_protocol(), sv[0]);
    char byte = 'x';
    const double s = run_callback_chain(ctx, 1024, n, [&](std::size_t i, auto& next) {
        if (i % send_drain_every == 0) drain(sv[1]);
        steward::io::async_send_fds(sock, {}, asio::buffer(&byte, 1),
                                    [&next](std::error_code ec, std::size_t k) { next(ec, k); });
    });
    ::close(sv[1]);
    return s;
}

double run_callback_write(std::size_t n) {
    int p[2];
    bench::check(::pipe2(p, O_CLOEXEC) == 0, "pipe2");
    asio::io_context ctx(1);
    asio::posix::stream_descriptor pipe(ctx, p[1]);
    const double s = run_callback_chain(ctx, 1000, n, [&](std::size_t i, auto& next) {
        if (i % write_drain_every == 0) drain_pipe(p[0]);
        steward::io::async_write_message(pipe, asio::buffer(message, message_size),
                                         [&next](std::error_code ec, std::size_t k) { next(ec, k); });
    });
    ::close(p[0]);
    return s;
}

double run_steward_send(std::size_t n, int carried = -1) {
    int sv[2];
    bench::check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    asio::io_context ctx(1);
    asio::local::stream_protocol::socket sock(ctx, asio::local::stream_protocol(), sv[0]);
    double seconds = 0;
    std::exception_ptr error;
    const std::span<const int> fds =
        carried >= 0 ? std::span<const int>(&carried, 1) : std::span<const int>();
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            char byte = 'x';
            auto loop = [&](std::size_t count) -> asio::awaitable<void> {
                for (std::size_t i = 0; i < count; ++i) {
                    co_await steward::io::async_send_fds(sock, fds, asio::buffer(&byte, 1),
                                                         asio::use_awaitable);
                    if (i % send_drain_every == send_drain_every - 1)
                        carried >= 0 ? drain_with_fds(sv[1]) : drain(sv[1]);
                }
            };
            co_await loop(1024);
            const auto t0 = bench::clock::now();
            co_await loop(n);
            seconds = bench::seconds_since(t0);
        },
        [&](const std::exception_ptr& e) { error = e; });
    ctx.run();
    ::close(sv[1]);
    if (error) std::rethrow_exception(error);
    return seconds;
}

double run_steward_write(std::size_t n) {
    int p[2];
    bench::check(::pipe2(p, O_CLOEXEC) == 0, "pipe2");
    asio::io_context ctx(1);
    asio::posix::stream_descriptor pipe(ctx, p[1]);
    double seconds = 0;
    std::exception_ptr error;
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            auto loop = [&](std::size_t count) -> asio::awaitable<void> {
                for (std::size_t i = 0; i < count; ++i) {
                    co_await steward::io::async_write_message(pipe, asio::buffer(message, message_size),
                                                              asio::use_awaitable);
                    if (i % write_drain_every == write_drain_every - 1) drain_pipe(p[0]);
                }
            };
            co_await loop(1000);
            const auto t0 = bench::clock::now();
            co_await loop(n);
            seconds = bench::seconds_since(t0);
        },
        [&](const std::exception_ptr& e) { error = e; });
    ctx.run();
    ::close(p[0]);
    if (error) std::rethrow_exception(error);
    return seconds;
}

double run_post(std::size_t n) {
    asio::io_context ctx(1);
    double seconds = 0;
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            for (std::size_t i = 0; i < 1000; ++i) co_await asio::post(ctx, asio::use_awaitable);
            const auto t0 = bench::clock::now();
            for (std::size_t i = 0; i < n; ++i) co_await asio::post(ctx, asio::use_awaitable);
            seconds = bench::seconds_since(t0);
        },
        asio::detached);
    ctx.run();
    return seconds;
}

}  // namespace

int main(int argc, char** argv) {
    const bench::args a = bench::parse_args(argc, argv, 1000000);
    try {
        std::error_code ec;
        std::string why;
        steward::check_io_uring(ec, &why);
        if (ec) return bench::not_measured(a, "io_uring unavailable: " + why);

        double seconds = 0;
        const bool send_fd = a.scenario == "coawait_send_fd";
        const bool send = a.scenario == "coawait_send" || send_fd;
        if (!send && a.scenario != "coawait_write") return bench::failed(a, "unknown scenario");
        // The descriptor coawait_send_fd passes with every byte: one end of a pipe, kept open.
        int carried_pipe[2] = {-1, -1};
        if (send_fd) bench::check(::pipe2(carried_pipe, O_CLOEXEC) == 0, "pipe2");
        const int carried = carried_pipe[0];
        if (a.variant == "nop")
            seconds = run_nop(a.n);
        else if (a.variant == "raw")
            seconds = send ? run_raw_send(a.n, carried) : run_raw_write(a.n);
        else if (a.variant == "steward")
            seconds = send ? run_steward_send(a.n, carried) : run_steward_write(a.n);
        else if (a.variant == "same_syscalls" && !send)
            seconds = run_same_syscalls_write(a.n);
        else if (a.variant == "post")
            seconds = run_post(a.n);
        else if (a.variant == "callback" && !send_fd)
            seconds = send ? run_callback_send(a.n) : run_callback_write(a.n);
        else
            return bench::failed(a, "unknown variant");
        bench::result r(a, "ns/op", false);
        r.value(seconds * 1e9 / static_cast<double>(a.n));
        r.count(a.n);
        r.seconds(seconds);
        r.print();
        return 0;
    } catch (const std::exception& e) {
        return bench::failed(a, e.what());
    }
}
