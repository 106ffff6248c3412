// steward-tracker: the resource tracker daemon (see docs/tracker.md).
#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
    if (argc == 2 && std::strcmp(argv[1], "--version") == 0) {
        std::printf("steward-tracker %s\n", STEWARD_VERSION);
        return 0;
    }
    std::fprintf(stderr, "usage: steward-tracker --fd N\n");
    return 64;
}
