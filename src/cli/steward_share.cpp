// `steward share`: put files or inherited descriptors into a steward::sharer, print one line per
// share, serve until everything was fetched, the ttl passed, or a signal arrives.
#include "cli/cli_args.hpp"
#include "cli/commands.hpp"

#include <steward/error.hpp>
#include <steward/sharer.hpp>
#include <steward/unique_fd.hpp>

#include <asio/io_context.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace steward::cli {
namespace {

constexpr const char* share_usage =
    "usage: steward share [--authkey HEX] [--ttl SECONDS] [--fd N]... [--] [PATH]...\n"
    "Shares each PATH (opened read-only) and each inherited descriptor N, one share each, and\n"
    "prints one line per share, in argument order:\n"
    "    ADDRESS KEY_DECIMAL SHARE_ID_TEXT\n"
    "(the sharer's socket path, the key as CPython prints it, the text `steward fetch` takes).\n"
    "Then serves until every share was fetched once.\n"
    "  --authkey HEX   the family key (64 hex digits); default: $STEWARD_AUTHKEY. Without either a\n"
    "                  random key is used and printed on stderr: a fetching process must use the\n"
    "                  same key (export STEWARD_AUTHKEY=HEX, or steward fetch --authkey HEX).\n"
    "                  Prefer the environment: a command line is visible to every local user.\n"
    "  --ttl SECONDS   unfetched shares expire after this long (decimals allowed)\n"
    "  --fd N          share this process's descriptor N (may be repeated)\n"
    "exit status: 0 every share was fetched; 1 the ttl passed first (the rest were closed);\n"
    "             2 an error (nothing is served when a PATH or N cannot be used); 64 bad usage;\n"
    "             128+signal after SIGINT (130), SIGTERM (143) or SIGHUP (129): unfetched shares\n"
    "             are closed and the socket and its directory removed.\n";

constexpr int exit_error = 2;

int usage_error(const std::string& why) {
    std::fprintf(stderr, "steward share: %s\n%s", why.c_str(), share_usage);
    return exit_usage;
}

struct source {
    std::string path;  // empty for an inherited descriptor
    int inherited_fd = -1;
};

}  // namespace

int run_share(std::span<char*> args) {
    std::optional<std::string> key_hex;
    std::optional<double> ttl_seconds;
    std::vector<source> sources;
    bool options_done = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view arg = args[i];
        if (options_done || arg.empty() || arg[0] != '-' || arg == "-") {
            sources.push_back({std::string(arg), -1});
            continue;
        }
        if (arg == "--") {
            options_done = true;
            continue;
        }
        if (arg == "--help" || arg == "-h") {
            std::fputs(share_usage, stdout);
            return 0;
        }
        // --name VALUE or --name=VALUE
        std::string_view name = arg;
        std::optional<std::string> value;
        if (const auto eq = arg.find('='); eq != std::string_view::npos) {
            name = arg.substr(0, eq);
            value = std::string(arg.substr(eq + 1));
        }
        if (name != "--authkey" && name != "--ttl" && name != "--fd")
            return usage_error("unknown option '" + std::string(arg) + "'");
        if (!value) {
            if (i + 1 >= args.size()) return usage_error(std::string(name) + " needs a value");
            value = args[++i];
        }
        if (name == "--authkey") {
            key_hex = *value;
        } else if (name == "--ttl") {
            ttl_seconds = parse_seconds(*value);
            if (!ttl_seconds)
                return usage_error("--ttl: '" + *value + "' is not a positive number of seconds");
        } else {
            const std::optional<int> fd = parse_fd_number(*value);
            if (!fd) return usage_error("--fd: '" + *value + "' is not a descriptor number");
            sources.push_back({{}, *fd});
        }
    }
    if (sources.empty()) return usage_error("nothing to share: give a PATH or --fd N");

    bool key_from_environment = false;
    authkey key;
    try {
        key = choose_authkey(key_hex, &key_from_environment);
    } catch (const std::system_error&) {
        if (key_hex) return usage_error("--authkey: expected 64 hex digits");
        std::fputs("steward share: STEWARD_AUTHKEY is set but is not 64 hex digits\n", stderr);
        return exit_error;
    }

    // Open and check everything before the first share starts the listener: a bad argument leaves
    // nothing served and nothing on disk.
    std::vector<unique_fd> opened;
    std::vector<int> to_share;
    for (const source& s : sources) {
        if (s.inherited_fd >= 0) {
            if (::fcntl(s.inherited_fd, F_GETFD) < 0) {
                std::fprintf(stderr, "steward share: --fd %d: %s\n", s.inherited_fd, std::strerror(errno));
                return exit_error;
            }
            to_share.push_back(s.inherited_fd);
            continue;
        }
        unique_fd fd(::open(s.path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
        if (!fd) {
            std::fprintf(stderr, "steward share: cannot open '%s': %s\n", s.path.c_str(),
                         std::strerror(errno));
            return exit_error;
        }
        to_share.push_back(fd.get());
        opened.push_back(std::move(fd));
    }

    // A reader that goes away must not kill us with SIGPIPE before the socket is removed.
    std::signal(SIGPIPE, SIG_IGN);

    asio::io_context ctx(1);
    // Installed before the listener exists, so a signal at any later point takes the clean path.
    asio::signal_set signals(ctx, SIGINT, SIGTERM, SIGHUP);
    sharer_options options;
    options.key = key;
    sharer server(ctx.get_executor(), std::move(options));

    share_options per_share;
    std::optional<std::chrono::steady_clock::duration> ttl;
    if (ttl_seconds) {
        ttl = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(*ttl_seconds));
        per_share.ttl = ttl;
    }

    std::vector<share_id> ids;
    for (std::size_t i = 0; i < to_share.size(); ++i) {
        std::error_code ec;
        share_id id = server.share(to_share[i], ec, per_share);
        if (ec) {
            const source& s = sources[i];
            const std::string what =
                s.inherited_fd >= 0 ? "--fd " + std::to_string(s.inherited_fd) : "'" + s.path + "'";
            std::fprintf(stderr, "steward share: sharing %s failed: %s\n", what.c_str(),
                         ec.message().c_str());
            server.stop(std::chrono::seconds(0));
            return exit_error;
        }
        ids.push_back(std::move(id));
    }
    opened.clear();  // the sharer holds its own duplicates

    if (!key_from_environment) {
        std::fprintf(stderr,
                     "steward share: STEWARD_AUTHKEY is not set; fetch with this run's key:\n"
                     "  export STEWARD_AUTHKEY=%s\n",
                     key.to_hex().c_str());
    }
    for (const share_id& id : ids)
        std::printf("%s %s %s\n", id.address().c_str(), id.key().to_decimal().c_str(), id.format().c_str());
    if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
        std::fprintf(stderr, "steward share: writing the share lines failed: %s\n", std::strerror(errno));
        server.stop(std::chrono::seconds(0));
        return exit_error;
    }

    asio::steady_timer ttl_timer(ctx);
    bool stopping = false;
    int signal_number = 0;
    auto finish = [&](int signo) {
        if (stopping) return;
        stopping = true;
        signal_number = signo;
        signals.cancel();
        ttl_timer.cancel();
        // A signal asks for a prompt end; otherwise give a transfer in flight time to be confirmed.
        const auto grace = signo != 0 ? std::chrono::milliseconds(500) : std::chrono::milliseconds(2000);
        server.async_stop(grace, [](std::error_code) {});
    };
    server.async_wait_empty([&](std::error_code ec) {
        if (!ec) finish(0);
    });
    if (ttl) {
        ttl_timer.expires_after(*ttl);
        ttl_timer.async_wait([&](std::error_code ec) {
            if (!ec) finish(0);
        });
    }
    signals.async_wait([&](std::error_code ec, int signo) {
        if (!ec) finish(signo);
    });
    ctx.run();

    const sharer_stats stats = server.stats();
    const std::size_t unfetched = ids.size() - std::min<std::size_t>(ids.size(), stats.delivered);
    if (signal_number != 0) {
        std::fprintf(stderr,
                     "steward share: %s: stopped; %zu of %zu shares were not fetched and are closed\n",
                     ::strsignal(signal_number), unfetched, ids.size());
        return 128 + signal_number;
    }
    if (unfetched != 0) {
        std::fprintf(stderr, "steward share: ttl passed; %zu of %zu shares were not fetched and are closed\n",
                     unfetched, ids.size());
        return 1;
    }
    return 0;
}

}  // namespace steward::cli
