// `steward fetch`: receive the descriptors of shares (steward's native protocol, or CPython's
// resource_sharer with --cpython), describe each one, optionally copy its contents to stdout.
#include "cli/cli_args.hpp"
#include "cli/commands.hpp"

#include <steward/cpython_fetch.hpp>
#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/share_id.hpp>
#include <steward/unique_fd.hpp>

#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace steward::cli {
namespace {

constexpr const char* fetch_usage =
    "usage: steward fetch [--authkey HEX] [--cat] [--cpython ADDRESS KEY]... [SHARE_ID_TEXT]...\n"
    "Fetches each share (in argument order) and prints, for every descriptor received,\n"
    "    fd=N type=TYPE target=TARGET\n"
    "TYPE is file, dir, socket, pipe, memfd or other; TARGET is the /proc/self/fd link and is the\n"
    "rest of the line (it may contain spaces).\n"
    "  --authkey HEX          the sharer's family key (64 hex digits); default: $STEWARD_AUTHKEY.\n"
    "                         Only a process with the sharer's key is served.\n"
    "  --cat                  copy each descriptor's contents to stdout (a file or memfd from\n"
    "                         offset 0, a pipe or socket until end of file); the fd= lines then go\n"
    "                         to stderr, so stdout holds the contents only\n"
    "  --cpython ADDRESS KEY  fetch from CPython's multiprocessing.resource_sharer: DupFd(fd)._id\n"
    "                         is (ADDRESS, KEY); the key is that process's\n"
    "                         multiprocessing.current_process().authkey\n"
    "exit status: 0 every share was fetched (and copied); 1 some fetch or copy failed (the reason\n"
    "             is on stderr; the other shares are still fetched); 64 bad usage.\n";

constexpr int exit_failed = 1;

int usage_error(const std::string& why) {
    std::fprintf(stderr, "steward fetch: %s\n%s", why.c_str(), fetch_usage);
    return exit_usage;
}

struct request {
    std::string label;  // how errors name it
    std::optional<share_id> native;
    std::optional<cpython_ident> cpython;
};

bool write_all(int fd, const char* data, std::size_t size) {
    while (size > 0) {
        const ssize_t n = ::write(fd, data, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        data += n;
        size -= static_cast<std::size_t>(n);
    }
    return true;
}

// Copies @p fd to stdout; returns an empty string or the reason it failed. A file is read with
// pread from offset 0 (its offset may be anywhere, and is shared with the sender); a stream until
// end of file. A received descriptor may carry O_NONBLOCK from its sender: EAGAIN is waited out.
std::string copy_to_stdout(int fd, const fd_description& what) {
    if (what.type == "dir") return "cannot --cat a directory";
    const bool seekable = what.type == "file" || what.type == "memfd";
    std::vector<char> buffer(std::size_t{64} * 1024);
    off_t offset = 0;
    for (;;) {
        const ssize_t n = seekable ? ::pread(fd, buffer.data(), buffer.size(), offset)
                                   : ::read(fd, buffer.data(), buffer.size());
        if (n == 0) return {};
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                pollfd p{fd, POLLIN, 0};
                ::poll(&p, 1, -1);
                continue;
            }
            return std::string("read failed: ") + std::strerror(errno);
        }
        offset += n;
        if (!write_all(STDOUT_FILENO, buffer.data(), static_cast<std::size_t>(n)))
            return std::string("writing to stdout failed: ") + std::strerror(errno);
    }
}

std::string explain(const std::error_code& ec, bool key_from_environment, const std::string& address) {
    std::string text = ec.message();
    if (ec == std::errc::no_such_file_or_directory || ec == std::errc::connection_refused)
        text += " (no sharer is listening at " + address + ": it has exited, or the id is wrong)";
    if (ec == errc::authentication_failed && !key_from_environment)
        text += " (STEWARD_AUTHKEY is not set and no --authkey was given: use the sharer's key)";
    return text;
}

}  // namespace

int run_fetch(std::span<char*> args) {
    std::optional<std::string> key_hex;
    bool cat = false;
    std::vector<request> requests;
    bool options_done = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view arg = args[i];
        if (options_done || arg.empty() || arg[0] != '-') {
            std::error_code ec;
            share_id id = share_id::parse(arg, ec);
            if (ec)
                return usage_error("'" + std::string(arg) + "' is not a share id (steward1:<32 hex>@<path>)");
            requests.push_back({std::string(arg), std::move(id), std::nullopt});
            continue;
        }
        if (arg == "--") {
            options_done = true;
        } else if (arg == "--help" || arg == "-h") {
            std::fputs(fetch_usage, stdout);
            return 0;
        } else if (arg == "--cat") {
            cat = true;
        } else if (arg == "--authkey") {
            if (i + 1 >= args.size()) return usage_error("--authkey needs a value");
            key_hex = args[++i];
        } else if (arg.starts_with("--authkey=")) {
            key_hex = std::string(arg.substr(10));
        } else if (arg == "--cpython") {
            if (i + 2 >= args.size()) return usage_error("--cpython needs ADDRESS and KEY");
            cpython_ident ident{args[i + 1], args[i + 2]};
            i += 2;
            // Checked here so a typo is a usage error, not a failed connection.
            std::error_code ec;
            (void)share_id::from_cpython(ident, ec);
            if (ec)
                return usage_error("--cpython '" + ident.address + "' '" + ident.key +
                                   "': need an absolute socket path and a decimal key below 2^128");
            requests.push_back(
                {"(" + ident.address + ", " + ident.key + ")", std::nullopt, std::move(ident)});
        } else {
            return usage_error("unknown option '" + std::string(arg) + "'");
        }
    }
    if (requests.empty())
        return usage_error("nothing to fetch: give a SHARE_ID_TEXT or --cpython ADDRESS KEY");

    bool key_from_environment = false;
    authkey key;
    try {
        key = choose_authkey(key_hex, &key_from_environment);
    } catch (const std::system_error&) {
        if (key_hex) return usage_error("--authkey: expected 64 hex digits");
        std::fputs("steward fetch: STEWARD_AUTHKEY is set but is not 64 hex digits\n", stderr);
        return exit_failed;
    }

    std::signal(SIGPIPE, SIG_IGN);  // a closed stdout is reported as a write error
    FILE* info = cat ? stderr : stdout;
    int status = 0;

    // One io_context for all of them: fetches from the same sharer share one authenticated
    // connection. Sequential, so the output follows the argument order.
    asio::io_context ctx(1);
    std::exception_ptr failure;
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            const auto ex = co_await asio::this_coro::executor;
            for (const request& r : requests) {
                std::error_code ec;
                std::vector<unique_fd> fds;
                if (r.native) {
                    fetch_options options;
                    options.key = key;
                    std::tie(ec, fds) =
                        co_await async_fetch(ex, *r.native, asio::as_tuple(asio::use_awaitable), options);
                } else {
                    std::tie(ec, fds) = co_await async_fetch_cpython(ex, *r.cpython, key,
                                                                     asio::as_tuple(asio::use_awaitable));
                }
                if (ec) {
                    std::fprintf(
                        stderr, "steward fetch: %s: %s\n", r.label.c_str(),
                        explain(ec, key_from_environment, r.native ? r.native->address() : r.cpython->address)
                            .c_str());
                    status = exit_failed;
                    continue;
                }
                for (const unique_fd& fd : fds) {
                    const fd_description d = describe_fd(fd.get());
                    std::fprintf(info, "fd=%d type=%s target=%s\n", fd.get(), d.type.c_str(),
                                 d.target.c_str());
                    std::fflush(info);
                    if (!cat) continue;
                    if (const std::string why = copy_to_stdout(fd.get(), d); !why.empty()) {
                        std::fprintf(stderr, "steward fetch: %s: fd=%d: %s\n", r.label.c_str(), fd.get(),
                                     why.c_str());
                        status = exit_failed;
                    }
                }
            }
        },
        [&](std::exception_ptr e) { failure = std::move(e); });
    ctx.run();
    if (failure) std::rethrow_exception(failure);
    if (std::fflush(stdout) != 0) {
        std::fprintf(stderr, "steward fetch: writing to stdout failed: %s\n", std::strerror(errno));
        status = exit_failed;
    }
    return status;
}

}  // namespace steward::cli
