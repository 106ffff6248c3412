// steward: command-line front end (demo, share, fetch); see `steward --help`.
#include "cli/commands.hpp"

#include <cstdio>
#include <cstring>
#include <exception>
#include <span>
#include <string_view>

namespace {

constexpr const char* usage =
    "usage: steward <command> [args]\n"
    "commands:\n"
    "  demo                 a short narrated run of what steward does\n"
    "  share [--authkey HEX] [--ttl SECONDS] [--fd N]... [PATH]...\n"
    "                       share files/fds; prints ADDRESS KEY_DECIMAL SHARE_ID_TEXT per share\n"
    "  fetch [--authkey HEX] [--cat] [--cpython ADDRESS KEY]... [SHARE_ID_TEXT]...\n"
    "                       fetch shares; prints fd=N type=TYPE target=TARGET per descriptor\n"
    "  (steward share --help / steward fetch --help: options, STEWARD_AUTHKEY, exit statuses)\n"
    "  --version            print the version\n"
    "  --help               this text\n";

}  // namespace

int main(int argc, char** argv) {
    std::span<char*> args(argv, static_cast<std::size_t>(argc));
    if (args.size() < 2) {
        std::fputs(usage, stderr);
        return 64;
    }
    const std::string_view command = args[1];
    try {
        if (command == "--help" || command == "-h") {
            std::fputs(usage, stdout);
            return 0;
        }
        if (command == "--version") {
            std::printf("steward %s\n", STEWARD_VERSION);
            return 0;
        }
        if (command == "demo") return steward::cli::run_demo(args.subspan(2));
        if (command == "share") return steward::cli::run_share(args.subspan(2));
        if (command == "fetch") return steward::cli::run_fetch(args.subspan(2));
        if (command == "__demo-sharer-worker") return steward::cli::run_demo_sharer_worker(args.subspan(2));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "steward %s: %s\n", args[1], e.what());
        return 1;
    }
    std::fprintf(stderr, "steward: unknown command '%s'\n%s", args[1], usage);
    return 64;
}
