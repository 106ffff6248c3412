// Memory and ingest speed of the tracker daemon's registry.
//
// 1. Memory: inserts N names (default 1,000,000, like "/psm_<hex>") into the registry and reports
//    the growth of the process's peak resident set (VmHWM in /proc/self/status) per name, next to
//    the registry's own accounting, against the target of <= 64 bytes per name plus the name.
//    Baseline in the same run: the same names in a std::unordered_set<std::string> (what a naive
//    daemon would use), measured in a forked child so the two peaks do not mix.
// 2. Ingest: feeds M messages (default 10,000,000: REGISTER/UNREGISTER pairs) through the daemon
//    core in 64 KiB chunks, as the daemon reads them, and reports messages per second.
//
// usage: tracker_registry_memory_bench [names] [messages]

#include "tracker/daemon.hpp"
#include "tracker/registry.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <unordered_set>

namespace {

long vm_hwm_kib() {
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
        if (line.rfind("VmHWM:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
    return -1;
}

int make_name(char* buf, std::size_t i) {
    return std::snprintf(buf, 32, "/psm_%08zx", i * 2654435761u % 4294967291u);
}

// Runs f in a forked child and returns the child's VmHWM growth in KiB (through the exit pipe).
template <typename F>
long peak_growth_in_child(F f) {
    int p[2];
    if (::pipe(p) != 0) return -1;
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::close(p[0]);
        const long before = vm_hwm_kib();
        f();
        const long growth = vm_hwm_kib() - before;
        (void)!::write(p[1], &growth, sizeof growth);
        ::_exit(0);
    }
    ::close(p[1]);
    long growth = -1;
    (void)!::read(p[0], &growth, sizeof growth);
    ::close(p[0]);
    ::waitpid(pid, nullptr, 0);
    return growth;
}

}  // namespace

int main(int argc, char** argv) {
    const std::size_t names = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1000000;
    const std::size_t messages = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 10000000;

    std::size_t name_bytes = 0;
    char buf[32];
    for (std::size_t i = 0; i < names; ++i) name_bytes += static_cast<std::size_t>(make_name(buf, i));

    std::size_t accounted = 0;
    const long steward_kib = peak_growth_in_child([&] {
        steward::detail::tracking::registry r;
        char b[32];
        for (std::size_t i = 0; i < names; ++i) {
            const int n = make_name(b, i);
            r.insert(steward::resource_type::shared_memory, std::string_view(b, static_cast<std::size_t>(n)));
        }
        accounted = r.memory_bytes();
        std::printf("registry accounting: %.1f bytes per name beyond the name itself\n",
                    (static_cast<double>(r.memory_bytes()) - static_cast<double>(name_bytes)) /
                        static_cast<double>(names));
        std::fflush(stdout);
    });
    const long naive_kib = peak_growth_in_child([&] {
        std::unordered_set<std::string> s;
        char b[32];
        for (std::size_t i = 0; i < names; ++i) s.emplace(b, static_cast<std::size_t>(make_name(b, i)));
    });
    const double per_name = static_cast<double>(steward_kib) * 1024.0 / static_cast<double>(names);
    const double naive_per_name = static_cast<double>(naive_kib) * 1024.0 / static_cast<double>(names);
    const double avg_name = static_cast<double>(name_bytes) / static_cast<double>(names);
    std::printf("names: %zu (average %.1f bytes)\n", names, avg_name);
    std::printf("steward registry: VmHWM +%ld KiB = %.1f bytes per name = name + %.1f (target <= 64)\n",
                steward_kib, per_name, per_name - avg_name);
    std::printf("unordered_set<std::string>: VmHWM +%ld KiB = %.1f bytes per name (ratio %.2fx)\n", naive_kib,
                naive_per_name, naive_per_name / per_name);

    // Ingest: REGISTER/UNREGISTER pairs, names cycling through a window so the table stays warm.
    std::string stream;
    stream.reserve(64 * 1024 * 1024);
    std::size_t produced = 0;
    const int fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    steward::detail::tracking::daemon_core core(fd);
    const auto start = std::chrono::steady_clock::now();
    double build_seconds = 0;
    while (produced < messages) {
        const auto b0 = std::chrono::steady_clock::now();
        stream.clear();
        while (stream.size() < 60 * 1024 * 1024 && produced < messages) {
            const int n = make_name(buf, produced);
            stream += "REGISTER:";
            stream.append(buf, static_cast<std::size_t>(n));
            stream += ":shared_memory\nUNREGISTER:";
            stream.append(buf, static_cast<std::size_t>(n));
            stream += ":shared_memory\n";
            produced += 2;
        }
        build_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - b0).count();
        for (std::size_t off = 0; off < stream.size(); off += 65536) {
            core.ingest(std::string_view(stream).substr(off, 65536));
            core.end_of_batch(false);  // full reads: the daemon is under load
        }
    }
    const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double seconds = total - build_seconds;
    std::printf("ingest: %zu messages in %.3f s = %.1f M messages/s (malformed %llu, still tracked %zu)\n",
                produced, seconds, static_cast<double>(produced) / seconds / 1e6,
                static_cast<unsigned long long>(core.malformed()), core.tracked().size());
    (void)accounted;
    ::close(fd);
    return 0;
}
