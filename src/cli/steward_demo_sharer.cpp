// `steward demo`, the sharer chapter: the demo process shares a memfd and a listening TCP socket
// under one id, starts a worker (this executable again, hidden subcommand) that fetches both,
// reads the memfd and answers one request on the socket; a second fetch of the id is refused.
#include "cli/cli_args.hpp"
#include "cli/commands.hpp"

#include <steward/authkey.hpp>
#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/io/async_spawn.hpp>
#include <steward/share_id.hpp>
#include <steward/sharer.hpp>
#include <steward/unique_fd.hpp>

#include <asio/as_tuple.hpp>
#include <asio/buffer.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <system_error>
#include <vector>

namespace steward::cli {
namespace {

constexpr const char* worker_command = "__demo-sharer-worker";
constexpr std::string_view memfd_text = "notes in a memfd: 42 widgets, 7 gadgets";
// The whole chapter (spawn, fetch, request, second fetch, stop) normally takes milliseconds.
constexpr auto chapter_deadline = std::chrono::seconds(20);

void say(const std::string& text) {
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);
}

std::system_error sys_error(const char* what) {
    return {errno_code(errno), what};
}

std::string read_whole(int fd) {
    std::string out;
    char buffer[4096];
    off_t offset = 0;
    for (;;) {
        const ssize_t n = ::pread(fd, buffer, sizeof buffer, offset);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw sys_error("reading the memfd");
        if (n == 0) return out;
        out.append(buffer, static_cast<std::size_t>(n));
        offset += n;
    }
}

std::string self_executable() {
    char buffer[4096];
    const ssize_t n = ::readlink("/proc/self/exe", buffer, sizeof buffer);
    if (n <= 0 || static_cast<std::size_t>(n) == sizeof buffer) throw sys_error("readlink /proc/self/exe");
    return {buffer, static_cast<std::size_t>(n)};
}

// The parent's side, on one io_context that also runs the sharer.
asio::awaitable<bool> sharer_story(asio::io_context& ctx) {
    const auto ex = ctx.get_executor();

    unique_fd memfd(::memfd_create("steward-demo-notes", MFD_CLOEXEC));
    if (!memfd) throw sys_error("memfd_create");
    if (::write(memfd.get(), memfd_text.data(), memfd_text.size()) != static_cast<ssize_t>(memfd_text.size()))
        throw sys_error("writing the memfd");

    unique_fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!listener) throw sys_error("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listener.get(), 4) != 0 ||
        ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
        throw sys_error("listening on 127.0.0.1");
    const unsigned short port = ntohs(addr.sin_port);

    sharer server(ex);
    const std::array<int, 2> both{memfd.get(), listener.get()};
    const share_id id = server.share(both);
    say("parent: shared a memfd and a socket listening on 127.0.0.1:" + std::to_string(port) +
        " as ONE share:\n  " + id.format());
    memfd.reset();  // from here on only the sharer's duplicates exist
    listener.reset();
    say("parent: closed its own copies; the sharer holds them until one process fetches the id.");

    // The worker authenticates with the family key: hand it over in the environment.
    io::spawn_options spawn_opts;
    spawn_opts.environment.push_back("STEWARD_AUTHKEY=" + authkey::family().to_hex());
    io::child_process worker = io::spawn(ex, {self_executable(), worker_command, id.format()}, spawn_opts);
    say("parent: started worker pid " + std::to_string(worker.pid()) +
        " with that id (and STEWARD_AUTHKEY).");

    // Bound everything: a worker that never answers must fail the chapter, not hang it.
    asio::ip::tcp::socket client(ctx);
    asio::steady_timer deadline(ctx, chapter_deadline);
    bool timed_out = false;
    deadline.async_wait([&](std::error_code ec) {
        if (ec) return;
        timed_out = true;
        std::error_code ignored;
        client.close(ignored);
        worker.kill(ignored);
    });
    // A worker that fails early (say, its fetch is refused) ends the wait for its answer at once.
    worker.async_wait([&](std::error_code ec, io::exit_status st) {
        if (ec || st.success()) return;
        std::error_code ignored;
        client.close(ignored);
    });

    // The connection waits in the listen backlog until the worker, now owning the listener, accepts.
    const std::string request = "which notes did you get?\n";
    std::string reply;
    auto [cec] = co_await client.async_connect({asio::ip::address_v4::loopback(), port},
                                               asio::as_tuple(asio::use_awaitable));
    if (!cec) {
        co_await asio::async_write(client, asio::buffer(request), asio::as_tuple(asio::use_awaitable));
        std::error_code ignored;
        client.shutdown(asio::ip::tcp::socket::shutdown_send, ignored);
        auto [rec, n] = co_await asio::async_read(client, asio::dynamic_buffer(reply),
                                                  asio::as_tuple(asio::use_awaitable));
        (void)rec;  // eof ends the reply
        (void)n;
    }
    while (!reply.empty() && reply.back() == '\n') reply.pop_back();
    say("parent: asked on 127.0.0.1:" + std::to_string(port) + ", the worker answered: \"" + reply + "\"");

    auto [wec, status] = co_await worker.async_wait(asio::as_tuple(asio::use_awaitable));
    // The worker's receipt reaches the server through the socket: wait until it was processed.
    if (!wec && status.success() && !timed_out) {
        using namespace asio::experimental::awaitable_operators;
        co_await (server.async_wait_empty(asio::as_tuple(asio::use_awaitable)) ||
                  deadline.async_wait(asio::as_tuple(asio::use_awaitable)));
    }
    deadline.cancel();
    bool ok = true;
    auto check = [&](bool good, const std::string& what) {
        if (!good) {
            std::printf("FAILED: %s\n", what.c_str());
            ok = false;
        }
    };
    check(!timed_out, "the worker did not finish within the deadline");
    check(!wec && status.success(), "worker " + (wec ? wec.message() : status.to_string()));
    check(reply.find(memfd_text) != std::string::npos, "the reply does not quote the memfd");
    const sharer_stats after_worker = server.stats();
    check(after_worker.delivered == 1 && server.pending() == 0, "the share was not delivered exactly once");

    auto [fec, fds] = co_await async_fetch(ex, id, asio::as_tuple(asio::use_awaitable));
    say("parent: fetching the same id again: " + (fec ? "refused: " + fec.message() : "got it?!"));
    check(fec == errc::share_not_available && fds.empty(), "the second fetch was not refused");

    const std::string address = server.address();
    const std::string dir = address.substr(0, address.rfind('/'));
    co_await server.async_stop(std::chrono::seconds(1), asio::use_awaitable);
    struct stat st {};
    const bool dir_gone = ::stat(dir.c_str(), &st) != 0 && errno == ENOENT;
    check(dir_gone, "the socket directory " + dir + " is still there after stop");
    if (dir_gone) say("parent: stopped the sharer; its socket and directory are gone.");
    co_return ok;
}

}  // namespace

int run_demo_sharer_chapter(int number) {
    say("== " + std::to_string(number) + ". the sharer: a memfd and a listening socket for a worker ==");
    asio::io_context ctx(1);
    bool ok = false;
    bool finished = false;
    asio::co_spawn(ctx, sharer_story(ctx), [&](const std::exception_ptr& e, bool result) {
        finished = true;
        ok = result;
        if (e) {
            try {
                std::rethrow_exception(e);
            } catch (const std::exception& what) {
                std::printf("FAILED: %s\n", what.what());
            }
        }
    });
    ctx.run_for(chapter_deadline + std::chrono::seconds(5));
    if (!finished) std::printf("FAILED: the sharer chapter did not finish\n");
    if (!finished || !ok) {
        std::fflush(stdout);
        return 1;
    }
    say("one share, one fetch, one worker: the descriptors crossed exactly once.");
    return 0;
}

// The worker: fetch the share (memfd + listener), read the memfd, answer one request.
int run_demo_sharer_worker(std::span<char*> args) {
    if (args.size() != 1) {
        std::fprintf(stderr, "usage: steward %s SHARE_ID_TEXT (used by steward demo)\n", worker_command);
        return exit_usage;
    }
    const share_id id = share_id::parse(args[0]);
    std::vector<unique_fd> fds = fetch(id);
    if (fds.size() != 2) {
        std::fprintf(stderr, "worker: expected 2 descriptors, got %zu\n", fds.size());
        return 1;
    }
    for (const unique_fd& fd : fds) {
        const fd_description d = describe_fd(fd.get());
        say("  worker: received fd=" + std::to_string(fd.get()) + " type=" + d.type + " target=" + d.target);
    }
    const std::string notes = read_whole(fds[0].get());
    say("  worker: the memfd says \"" + notes + "\"");

    pollfd p{fds[1].get(), POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(chapter_deadline).count()));
    if (ready <= 0) {
        std::fprintf(stderr, "worker: nobody connected\n");
        return 1;
    }
    unique_fd conn(::accept4(fds[1].get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) throw sys_error("accept4");
    std::string request;
    char buffer[512];
    while (request.find('\n') == std::string::npos) {
        const ssize_t n = ::read(conn.get(), buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        request.append(buffer, static_cast<std::size_t>(n));
    }
    while (!request.empty() && request.back() == '\n') request.pop_back();
    say("  worker: accepted a connection on the shared listener; request: \"" + request + "\"");
    const std::string reply = "worker " + std::to_string(::getpid()) + " read: " + notes + "\n";
    for (std::size_t done = 0; done < reply.size();) {
        const ssize_t n = ::send(conn.get(), reply.data() + done, reply.size() - done, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw sys_error("send");
        done += static_cast<std::size_t>(n);
    }
    return 0;
}

}  // namespace steward::cli
