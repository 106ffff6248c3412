// steward-tracker: the resource tracker daemon (see docs/tracker.md). Serves the pipe read end
// inherited as fd N until every writer is gone, then removes what is still registered.
#include "tracker/daemon.hpp"

#include <steward/unique_fd.hpp>

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <string_view>

namespace {

constexpr int exit_usage = 64;  // EX_USAGE: distinct from the tracker's own statuses 0-3

constexpr const char* usage_text =
    "usage: steward-tracker --fd N [--no-io-uring]\n"
    "\n"
    "Resource tracker daemon: reads REGISTER/UNREGISTER/PROBE messages (CPython's colon or JSON\n"
    "format) from the pipe read end inherited as descriptor N. When every writer has closed the\n"
    "pipe, removes everything still registered (POSIX shared memory, named semaphores, files,\n"
    "directory trees) and reports the leaks on stderr.\n"
    "\n"
    "  --fd N          the descriptor to read (required)\n"
    "  --no-io-uring   read with blocking read() instead of the io_uring executor\n"
    "  --help          this text\n"
    "  --version       the version\n"
    "\n"
    "Exit status: 0 nothing leaked and no bad input; 1 leaks found and all removed;\n"
    "2 a removal failed; 3 malformed input was seen (2 beats 3 beats 1); 64 usage error.\n"
    "SIGINT, SIGTERM, SIGHUP and SIGPIPE are ignored.\n";

int usage_error(const char* what) {
    std::fprintf(stderr, "steward-tracker: %s\n%s", what, usage_text);
    return exit_usage;
}

}  // namespace

int main(int argc, char** argv) {
    int fd = -1;
    bool io_uring = true;
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::fputs(usage_text, stdout);
            return 0;
        }
        if (arg == "--version") {
            std::printf("steward-tracker %s\n", STEWARD_VERSION);
            return 0;
        }
        if (arg == "--no-io-uring") {
            io_uring = false;
            continue;
        }
        std::string_view value;
        if (arg == "--fd" && i + 1 < argc) {
            value = argv[++i];
        } else if (arg.starts_with("--fd=")) {
            value = arg.substr(5);
        } else {
            return usage_error(arg == "--fd" ? "--fd needs a value" : "unknown argument");
        }
        const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), fd);
        if (ec != std::errc{} || end != value.data() + value.size() || fd < 0)
            return usage_error("--fd needs a non-negative integer");
    }
    if (fd < 0) return usage_error("--fd N is required");
    const int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0) {
        std::fprintf(stderr, "steward-tracker: --fd %d: %s\n", fd, std::strerror(errno));
        return exit_usage;
    }
    // Not inherited by anything this process might start.
    ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
    // Nothing but stdio and the pipe is needed. A stray inherited descriptor would stay open for the
    // daemon's whole life: a write end of its own pipe would keep it from ever seeing EOF, and
    // someone else's pipe or socket would never see its peer go away.
    if (fd > 3) ::close_range(3, static_cast<unsigned>(fd) - 1, 0);
    if (fd >= 3)
        ::close_range(static_cast<unsigned>(fd) + 1, ~0u, 0);
    else
        ::close_range(3, ~0u, 0);

    // Survive ^C, "kill" of the process group and a closed terminal: the tracker must outlive its
    // family to clean up after it. The spawner blocks SIGINT/SIGTERM so that they cannot arrive
    // before these dispositions are in place; only then are they unblocked.
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    for (const int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) ::sigaction(sig, &ignore, nullptr);
    sigset_t unblock;
    sigemptyset(&unblock);
    sigaddset(&unblock, SIGINT);
    sigaddset(&unblock, SIGTERM);
    ::sigprocmask(SIG_UNBLOCK, &unblock, nullptr);

    return steward::detail::tracking::run_daemon(steward::unique_fd{fd}, io_uring);
}
