#define BOOST_TEST_MODULE io_write_message
#include "support/test_support.hpp"

#include <steward/error.hpp>
#include <steward/io/async_write_message.hpp>
#include <steward/unique_fd.hpp>

#include <asio/as_tuple.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/deferred.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <csignal>

#include <array>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using steward::unique_fd;
namespace sio = steward::io;

// Every test leaves the process with the descriptors it started with.
struct fd_balance {
    int before = steward::test::open_fd_count();
    ~fd_balance() { BOOST_TEST(steward::test::open_fd_count() == before); }
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

int bytes_in(int read_fd) {
    int n = -1;
    BOOST_REQUIRE(::ioctl(read_fd, FIONREAD, &n) == 0);
    return n;
}

// Fills the pipe with whole pages until the kernel refuses more without blocking; returns the bytes.
std::size_t fill_pipe(int write_fd) {
    std::array<char, 4096> page{};
    page.fill('F');
    std::size_t total = 0;
    for (;;) {
        iovec iov{page.data(), page.size()};
        const ssize_t n = ::pwritev2(write_fd, &iov, 1, -1, RWF_NOWAIT);
        if (n < 0) {
            BOOST_REQUIRE(errno == EAGAIN);
            return total;
        }
        total += static_cast<std::size_t>(n);
    }
}

std::string read_exactly(int fd, std::size_t n) {
    std::string out(n, '\0');
    std::size_t got = 0;
    while (got < n) {
        const ssize_t r = ::read(fd, out.data() + got, n - got);
        BOOST_REQUIRE(r > 0);
        got += static_cast<std::size_t>(r);
    }
    return out;
}

bool has_nonblock(int fd) {
    return (::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
}

// Restores the RWF_NOWAIT path even when a test fails half way.
struct nowait_mode {
    explicit nowait_mode(bool fallback) { sio::detail::force_nowait_fallback_for_tests(fallback); }
    ~nowait_mode() { sio::detail::force_nowait_fallback_for_tests(false); }
};

// ---- the self-checking line format of the many-writers test -----------------------------------
// "w<id> s<seq> n<length> c<fnv32 of payload> <payload>\n", total length given by the writer.
std::uint32_t fnv1a(std::string_view s) {
    std::uint32_t h = 2166136261u;
    for (unsigned char c : s) h = (h ^ c) * 16777619u;
    return h;
}

std::string make_line(int id, int seq, std::size_t length) {
    std::string prefix =
        "w" + std::to_string(id) + " s" + std::to_string(seq) + " n" + std::to_string(length) + " c";
    const std::size_t header = prefix.size() + 8 + 1;  // checksum as 8 hex digits, then a space
    const std::size_t payload_len = length - header - 1;
    std::string payload(payload_len, ' ');
    for (std::size_t i = 0; i < payload_len; ++i)
        payload[i] = static_cast<char>(
            'a' + (static_cast<std::size_t>(id) * 7 + static_cast<std::size_t>(seq) + i) % 26);
    char sum[9];
    (void)std::snprintf(sum, sizeof sum, "%08x", fnv1a(payload));
    return prefix + sum + " " + payload + "\n";
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(write_message, fd_balance)

BOOST_AUTO_TEST_CASE(message_of_513_bytes_is_refused_and_nothing_is_written,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    asio::io_context ctx;
    auto [read_end, write_end] = make_pipe();
    asio::posix::stream_descriptor pipe(ctx, ::dup(write_end.get()));
    const std::string big(513, 'x');
    std::error_code result;
    std::size_t written = 99;
    bool done = false;
    sio::async_write_message(pipe, asio::buffer(big), [&](std::error_code ec, std::size_t n) {
        result = ec;
        written = n;
        done = true;
    });
    BOOST_TEST(!done);  // never completed from inside the initiating call
    ctx.run();
    BOOST_TEST(done);
    BOOST_TEST((result == steward::errc::message_too_long));
    BOOST_TEST(written == 0u);
    BOOST_TEST(bytes_in(read_end.get()) == 0);

    // 512 is the largest accepted.
    const std::string max(512, 'y');
    ctx.restart();
    sio::async_write_message(pipe, asio::buffer(max), [&](std::error_code ec, std::size_t n) {
        result = ec;
        written = n;
    });
    ctx.run();
    BOOST_TEST(!result);
    BOOST_TEST(written == 512u);
    BOOST_TEST(read_exactly(read_end.get(), 512) == max);
}

STEWARD_CORO_TEST(not_a_pipe_is_refused_with_nothing_written) {
    int sv[2];
    BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    unique_fd peer{sv[1]};
    asio::posix::stream_descriptor sock(ctx, sv[0]);
    auto [ec, n] = co_await sio::async_write_message(sock, asio::buffer("hello\n", 6),
                                                     asio::as_tuple(asio::use_awaitable));
    BOOST_TEST((ec == steward::errc::not_a_pipe));
    BOOST_TEST(n == 0u);
    int pending = -1;
    BOOST_TEST(::ioctl(peer.get(), FIONREAD, &pending) == 0);
    BOOST_TEST(pending == 0);
}

// 8 processes x 10,000 messages of random lengths into one pipe: every line intact, each exactly
// once, and in each writer's order.
namespace {

void eight_writers(bool fallback) {
    nowait_mode mode(fallback);  // inherited by the forked writers
    constexpr int writers = 8;
    constexpr int per_writer = 10000;
    auto [read_end, write_end] = make_pipe();
    // Two page slots only: writers find the pipe full all the time, so waits and retries race.
    BOOST_REQUIRE(::fcntl(write_end.get(), F_SETPIPE_SZ, 8192) >= 8192);
    std::vector<pid_t> children;
    for (int id = 0; id < writers; ++id) {
        const pid_t pid = ::fork();
        BOOST_REQUIRE(pid >= 0);
        if (pid == 0) {
            ::close(read_end.get());
            int status = 0;
            {
                asio::io_context child_ctx;
                asio::posix::stream_descriptor pipe(child_ctx, ::dup(write_end.get()));
                std::mt19937 rng(static_cast<unsigned>(id) * 7919u + 1u);
                std::uniform_int_distribution<std::size_t> length(40, sio::max_message_size);
                int seq = 0;
                std::string line;
                std::function<void()> next = [&] {
                    if (seq == per_writer) return;
                    line = make_line(id, seq, length(rng));
                    sio::async_write_message(pipe, asio::buffer(line),
                                             [&](std::error_code ec, std::size_t n) {
                                                 if (ec || n != line.size()) {
                                                     status = 3;
                                                     return;
                                                 }
                                                 ++seq;
                                                 next();
                                             });
                };
                next();
                child_ctx.run();
                if (seq != per_writer && status == 0) status = 4;
            }
            ::_exit(status);
        }
        children.push_back(pid);
    }
    write_end.reset();  // EOF once every child is done

    std::vector<int> next_seq(writers, 0);
    int bad_lines = 0;
    std::string buffer;
    std::array<char, 65536> chunk{};
    for (;;) {
        const ssize_t r = ::read(read_end.get(), chunk.data(), chunk.size());
        BOOST_REQUIRE(r >= 0);
        if (r == 0) break;
        buffer.append(chunk.data(), static_cast<std::size_t>(r));
        std::size_t start = 0;
        for (std::size_t nl; (nl = buffer.find('\n', start)) != std::string::npos; start = nl + 1) {
            const std::string_view line(buffer.data() + start, nl - start + 1);
            int id = -1, seq = -1;
            std::size_t length = 0;
            unsigned sum = 0;
            int consumed = 0;
            const std::string copy(line);
            if (std::sscanf(copy.c_str(), "w%d s%d n%zu c%8x %n", &id, &seq, &length, &sum, &consumed) != 4 ||
                id < 0 || id >= writers || length != line.size() || copy != make_line(id, seq, length) ||
                seq != next_seq[static_cast<std::size_t>(id)]) {
                if (++bad_lines < 5) BOOST_ERROR("bad or out-of-order line: " << copy.substr(0, 80));
                continue;
            }
            ++next_seq[static_cast<std::size_t>(id)];
        }
        buffer.erase(0, start);
    }
    BOOST_TEST(bad_lines == 0);
    BOOST_TEST(buffer.empty());  // no torn tail
    for (int id = 0; id < writers; ++id) BOOST_TEST(next_seq[static_cast<std::size_t>(id)] == per_writer);
    for (pid_t pid : children) {
        int status = 0;
        BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
        BOOST_TEST(WIFEXITED(status));
        BOOST_TEST(WEXITSTATUS(status) == 0);
    }
}

}  // namespace

BOOST_AUTO_TEST_CASE(eight_writer_processes_never_interleave,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    eight_writers(false);
}

BOOST_AUTO_TEST_CASE(eight_writer_processes_never_interleave_through_proc_fallback,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    eight_writers(true);
}

namespace {

// A full pipe parks the write on the executor: nothing runs (no retry loop), nothing is written,
// and the shared description stays blocking; once the reader drains a page it completes whole.
void full_pipe_waits_then_completes(bool fallback) {
    nowait_mode mode(fallback);
    asio::io_context ctx;
    auto [read_end, write_end] = make_pipe();
    const std::size_t filled = fill_pipe(write_end.get());
    BOOST_REQUIRE(filled > 0);
    asio::posix::stream_descriptor pipe(ctx, ::dup(write_end.get()));
    const std::string message = "REGISTER:/psm_waiting:shared_memory\n";
    std::error_code result = asio::error::would_block;
    std::size_t written = 0;
    bool done = false;
    sio::async_write_message(pipe, asio::buffer(message), [&](std::error_code ec, std::size_t n) {
        result = ec;
        written = n;
        done = true;
    });
    ctx.poll();  // submits the readiness wait
    for (int i = 0; i < 200; ++i) {
        // A busy loop (retry by re-posting) would run handlers here; a parked wait runs none.
        BOOST_REQUIRE_EQUAL(ctx.poll(), 0u);
        BOOST_REQUIRE(!done);
    }
    BOOST_TEST(static_cast<std::size_t>(bytes_in(read_end.get())) == filled);  // no partial write
    BOOST_TEST(!has_nonblock(write_end.get()));
    BOOST_TEST(!has_nonblock(read_end.get()));

    // Drain one whole page: one slot free, the write fits.
    (void)read_exactly(read_end.get(), 4096);
    ctx.run_for(std::chrono::seconds(30));
    BOOST_REQUIRE(done);
    BOOST_TEST(!result);
    BOOST_TEST(written == message.size());
    const std::string rest = read_exactly(read_end.get(), filled - 4096 + message.size());
    BOOST_TEST(rest.substr(filled - 4096) == message);
    BOOST_TEST(rest.find_first_not_of('F') == filled - 4096);
    BOOST_TEST(bytes_in(read_end.get()) == 0);
    BOOST_TEST(!has_nonblock(write_end.get()));
}

}  // namespace

BOOST_AUTO_TEST_CASE(full_pipe_waits_without_busy_loop_then_completes,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    full_pipe_waits_then_completes(false);
}

BOOST_AUTO_TEST_CASE(full_pipe_waits_then_completes_through_proc_fallback,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    full_pipe_waits_then_completes(true);
}

STEWARD_CORO_TEST(batch_goes_out_in_one_write_and_limits_are_checked) {
    auto [read_end, write_end] = make_pipe();
    asio::posix::stream_descriptor pipe(ctx, ::dup(write_end.get()));

    std::vector<std::string> messages;
    messages.reserve(10);
    for (int i = 0; i < 10; ++i)
        messages.push_back("REGISTER:/psm_" + std::to_string(i) + ":shared_memory\n");
    std::vector<asio::const_buffer> buffers;
    buffers.reserve(messages.size());
    std::size_t total = 0;
    for (auto& m : messages) {
        buffers.emplace_back(asio::buffer(m));
        total += m.size();
    }
    // deferred: the operation runs when awaited.
    auto op = sio::async_write_messages(pipe, buffers, asio::deferred);
    BOOST_TEST(bytes_in(read_end.get()) == 0);
    const std::size_t n = co_await std::move(op)(asio::use_awaitable);
    BOOST_TEST(n == total);
    std::string expected;
    for (auto& m : messages) expected += m;
    BOOST_TEST(read_exactly(read_end.get(), total) == expected);

    // 8 x 512 = 4096: exactly PIPE_BUF is fine.
    const std::string m512(512, 'z');
    std::vector<asio::const_buffer> full(8, asio::buffer(m512));
    auto [ec_full, n_full] =
        co_await sio::async_write_messages(pipe, full, asio::as_tuple(asio::use_awaitable));
    BOOST_TEST(!ec_full);
    BOOST_TEST(n_full == 4096u);
    BOOST_TEST(read_exactly(read_end.get(), 4096) == std::string(4096, 'z'));

    // One byte more than PIPE_BUF: refused whole.
    const std::string one = "!";
    full.push_back(asio::buffer(one));
    auto [ec_big, n_big] =
        co_await sio::async_write_messages(pipe, full, asio::as_tuple(asio::use_awaitable));
    BOOST_TEST((ec_big == steward::errc::batch_too_large));
    BOOST_TEST(n_big == 0u);
    BOOST_TEST(bytes_in(read_end.get()) == 0);

    // A message over 512 inside a small batch: refused whole.
    const std::string m513(513, 'q');
    std::vector<asio::const_buffer> bad{asio::buffer(one), asio::buffer(m513)};
    auto [ec_bad, n_bad] = co_await sio::async_write_messages(pipe, bad, asio::as_tuple(asio::use_awaitable));
    BOOST_TEST((ec_bad == steward::errc::message_too_long));
    BOOST_TEST(n_bad == 0u);
    BOOST_TEST(bytes_in(read_end.get()) == 0);

    // Empty batch: nothing to do.
    auto [ec_empty, n_empty] = co_await sio::async_write_messages(pipe, std::span<const asio::const_buffer>{},
                                                                  asio::as_tuple(asio::use_awaitable));
    BOOST_TEST(!ec_empty);
    BOOST_TEST(n_empty == 0u);
}

namespace {

sigset_t current_mask() {
    sigset_t mask;
    ::sigemptyset(&mask);
    ::pthread_sigmask(SIG_SETMASK, nullptr, &mask);
    return mask;
}

bool sigpipe_blocked() {
    const sigset_t mask = current_mask();
    return ::sigismember(&mask, SIGPIPE) == 1;
}

bool sigpipe_pending() {
    sigset_t pending;
    ::sigemptyset(&pending);
    ::sigpending(&pending);
    return ::sigismember(&pending, SIGPIPE) == 1;
}

asio::awaitable<void> broken_pipe_case(asio::io_context& ctx, bool fallback) {
    nowait_mode mode(fallback);
    // SIGPIPE at its default disposition: if it were delivered, the test process would die.
    struct sigaction old_action {};
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGPIPE, &dfl, &old_action);

    auto [read_end, write_end] = make_pipe();
    asio::posix::stream_descriptor pipe(ctx, ::dup(write_end.get()));
    read_end.reset();
    const sigset_t before = current_mask();
    auto [ec, n] = co_await sio::async_write_message(pipe, asio::buffer("UNREGISTER:/x:noop\n", 19),
                                                     asio::as_tuple(asio::use_awaitable));
    const sigset_t after = current_mask();
    BOOST_TEST((ec == std::errc::broken_pipe));
    BOOST_TEST(n == 0u);
    BOOST_TEST(::sigismember(&after, SIGPIPE) == ::sigismember(&before, SIGPIPE));
    BOOST_TEST(!sigpipe_pending());
    ::sigaction(SIGPIPE, &old_action, nullptr);
}

}  // namespace

STEWARD_CORO_TEST(write_without_reader_is_broken_pipe_and_the_process_survives) {
    co_await broken_pipe_case(ctx, false);
    co_await broken_pipe_case(ctx, true);
}

// The reader goes away while the write waits for room: the wait ends and the write reports EPIPE.
STEWARD_CORO_TEST(reader_closing_during_the_wait_ends_it_with_broken_pipe) {
    pipe_pair p = make_pipe();  // not a structured binding: clang 14 cannot capture those
    (void)fill_pipe(p.write_end.get());
    asio::posix::stream_descriptor pipe(ctx, ::dup(p.write_end.get()));
    asio::steady_timer timer(ctx, std::chrono::milliseconds(20));
    timer.async_wait([&](std::error_code) { p.read_end.reset(); });
    auto [ec, n] = co_await sio::async_write_message(pipe, asio::buffer("PROBE:0:noop\n", 13),
                                                     asio::as_tuple(asio::use_awaitable));
    BOOST_TEST((ec == std::errc::broken_pipe));
    BOOST_TEST(n == 0u);
    BOOST_TEST(!sigpipe_pending());
}

BOOST_AUTO_TEST_CASE(cancelling_a_waiting_write_writes_nothing,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    asio::io_context ctx;
    auto [read_end, write_end] = make_pipe();
    const std::size_t filled = fill_pipe(write_end.get());
    asio::posix::stream_descriptor pipe(ctx, ::dup(write_end.get()));
    asio::cancellation_signal cancel;
    std::error_code result;
    bool done = false;
    sio::async_write_message(
        pipe, asio::buffer("REGISTER:/c:noop\n", 17),
        asio::bind_cancellation_slot(cancel.slot(), [&](std::error_code ec, std::size_t) {
            result = ec;
            done = true;
        }));
    ctx.poll();
    BOOST_REQUIRE(!done);
    cancel.emit(asio::cancellation_type::partial);
    ctx.run_for(std::chrono::seconds(30));
    BOOST_REQUIRE(done);
    BOOST_TEST((result == asio::error::operation_aborted));
    BOOST_TEST(static_cast<std::size_t>(bytes_in(read_end.get())) == filled);

    // The pipe is still usable afterwards.
    (void)read_exactly(read_end.get(), filled);
    ctx.restart();
    std::size_t written = 0;
    sio::async_write_message(pipe, asio::buffer("PROBE:1:noop\n", 13),
                             [&](std::error_code ec, std::size_t n) {
                                 result = ec;
                                 written = n;
                             });
    ctx.run();
    BOOST_TEST(!result);
    BOOST_TEST(read_exactly(read_end.get(), written) == "PROBE:1:noop\n");
}

// The SIGPIPE guard when the caller already blocks SIGPIPE: the mask is left as it was, the write's
// own SIGPIPE is consumed, and a SIGPIPE that was pending before stays pending (it is somebody
// else's and standard signals do not queue, so consuming "ours" would lose it).
BOOST_AUTO_TEST_CASE(sigpipe_guard_with_sigpipe_already_blocked) {
    sigset_t pipe_set;
    ::sigemptyset(&pipe_set);
    ::sigaddset(&pipe_set, SIGPIPE);
    sigset_t saved;
    BOOST_REQUIRE(::pthread_sigmask(SIG_BLOCK, &pipe_set, &saved) == 0);
    auto consume_pending = [&] {
        const timespec zero{};
        return ::sigtimedwait(&pipe_set, nullptr, &zero) == SIGPIPE;
    };
    while (consume_pending()) {
    }

    for (const bool fallback : {false, true}) {
        nowait_mode mode(fallback);
        {
            auto [read_end, write_end] = make_pipe();
            read_end.reset();
            std::error_code ec;
            const std::size_t n = sio::detail::write_whole(write_end.get(), "PROBE:0:noop\n", 13, ec);
            BOOST_TEST((ec == std::errc::broken_pipe));
            BOOST_TEST(n == 0u);
            BOOST_TEST(sigpipe_blocked());
            BOOST_TEST(!sigpipe_pending());
        }
        {
            // Somebody else's SIGPIPE, pending for this thread before the write.
            BOOST_REQUIRE(::pthread_kill(::pthread_self(), SIGPIPE) == 0);
            BOOST_REQUIRE(sigpipe_pending());
            auto [read_end, write_end] = make_pipe();
            read_end.reset();
            std::error_code ec;
            (void)sio::detail::write_whole(write_end.get(), "PROBE:0:noop\n", 13, ec);
            BOOST_TEST((ec == std::errc::broken_pipe));
            BOOST_TEST(sigpipe_blocked());
            BOOST_TEST(sigpipe_pending());
            BOOST_TEST(consume_pending());
            BOOST_TEST(!sigpipe_pending());
        }
    }
    ::pthread_sigmask(SIG_SETMASK, &saved, nullptr);
}

// The usual case (SIGPIPE not blocked, default disposition): a successful write and a broken one
// both leave the thread's mask exactly as it was.
BOOST_AUTO_TEST_CASE(sigpipe_guard_restores_an_unblocked_mask) {
    struct sigaction old_action {};
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGPIPE, &dfl, &old_action);
    sigset_t pipe_set;
    ::sigemptyset(&pipe_set);
    ::sigaddset(&pipe_set, SIGPIPE);
    sigset_t saved;
    BOOST_REQUIRE(::pthread_sigmask(SIG_UNBLOCK, &pipe_set, &saved) == 0);
    {
        auto [read_end, write_end] = make_pipe();
        std::error_code ec;
        BOOST_TEST(sio::detail::write_whole(write_end.get(), "PROBE:0:noop\n", 13, ec) == 13u);
        BOOST_TEST(!ec);
        BOOST_TEST(!sigpipe_blocked());
        read_end.reset();
        (void)sio::detail::write_whole(write_end.get(), "PROBE:0:noop\n", 13, ec);
        BOOST_TEST((ec == std::errc::broken_pipe));
        BOOST_TEST(!sigpipe_blocked());
        BOOST_TEST(!sigpipe_pending());
    }
    ::pthread_sigmask(SIG_SETMASK, &saved, nullptr);
    ::sigaction(SIGPIPE, &old_action, nullptr);
}

BOOST_AUTO_TEST_SUITE_END()
