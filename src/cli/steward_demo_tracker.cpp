// The tracker chapter of `steward demo`: a family of processes creates shared memory and a
// semaphore through steward::tracker and is killed with SIGKILL; the daemon cleans up after it.
//
// Roles: this (top) process only observes. It forks a "family leader" that starts the tracker,
// creates resources and forks a worker that registers its own. The leader kills the worker with -9,
// then the top kills the leader with -9. The daemon's stderr comes back through a pipe so the demo
// can show its report; the top is a child subreaper so it can collect the daemon's exit status.
#include "cli/commands.hpp"

#include <steward/named_semaphore.hpp>
#include <steward/shared_memory.hpp>
#include <steward/tracker.hpp>
#include <steward/unique_fd.hpp>

#include <asio/io_context.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace steward::cli {
namespace {

std::vector<std::string> demo_entries(const std::string& stem) {
    std::vector<std::string> out;
    if (DIR* d = ::opendir("/dev/shm")) {
        while (auto* e = ::readdir(d))
            if (std::strstr(e->d_name, stem.c_str())) out.emplace_back(e->d_name);
        ::closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
}

void print_entries(const char* when, const std::vector<std::string>& entries) {
    std::printf("/dev/shm %s: %s", when, entries.empty() ? "(none of ours)" : "");
    for (std::size_t i = 0; i < entries.size(); ++i) std::printf("%s%s", i ? " " : "", entries[i].c_str());
    std::printf("\n");
    (void)std::fflush(stdout);
}

// The family leader. Sends the daemon's pid on @p ready once everything exists, then waits to be
// killed.
[[noreturn]] void family_leader(const std::string& stem, int ready) {
    try {
        asio::io_context ctx;
        tracker t(ctx.get_executor());
        t.ensure_running();
        std::printf("leader %d: tracker daemon started (pid %d)\n", static_cast<int>(::getpid()),
                    t.daemon_pid());
        auto a = shared_memory::create(t, stem + "_leader_a", 1 << 16);
        auto b = shared_memory::create(t, stem + "_leader_b", 4096);
        auto sem = named_semaphore::create(t, stem + "_leader_sem", 0);
        std::printf("leader: created %s, %s and semaphore %s (each registered before it existed)\n",
                    a.name().c_str(), b.name().c_str(), sem.name().c_str());
        (void)std::fflush(stdout);
        int worker_ready[2];
        if (::pipe2(worker_ready, O_CLOEXEC) != 0) ::_exit(20);
        const pid_t worker = ::fork();
        if (worker == 0) {
            auto w = shared_memory::create(t, stem + "_worker", 4096);
            std::printf("worker %d: created %s through the inherited tracker\n", static_cast<int>(::getpid()),
                        w.name().c_str());
            (void)std::fflush(stdout);
            (void)::write(worker_ready[1], "R", 1);
            for (;;) ::pause();
        }
        char c;
        (void)::read(worker_ready[0], &c, 1);
        ::kill(worker, SIGKILL);
        ::waitpid(worker, nullptr, 0);
        std::printf("leader: killed the worker with SIGKILL (its segment stays registered)\n");
        (void)std::fflush(stdout);
        const int daemon = t.daemon_pid();
        (void)::write(ready, &daemon, sizeof daemon);
        for (;;) ::pause();
    } catch (const std::exception& e) {
        std::printf("leader: %s\n", e.what());
        (void)std::fflush(stdout);
        ::_exit(21);
    }
}

}  // namespace

int demo_tracker_chapter() {
    std::printf("== 3. the tracker ==\n");
    (void)std::fflush(stdout);
    const std::string stem = "steward_demo_" + std::to_string(::getpid());
    int err_pipe[2], ready_pipe[2];
    if (::pipe2(err_pipe, O_CLOEXEC) != 0 || ::pipe2(ready_pipe, O_CLOEXEC) != 0) {
        std::perror("pipe2");
        return 1;
    }
    unique_fd err_read(err_pipe[0]), err_write(err_pipe[1]);
    unique_fd ready_read(ready_pipe[0]), ready_write(ready_pipe[1]);
    ::prctl(PR_SET_CHILD_SUBREAPER, 1);  // the daemon comes back to us when the leader dies

    const pid_t leader = ::fork();
    if (leader < 0) {
        std::perror("fork");
        return 1;
    }
    if (leader == 0) {
        ::dup2(err_write.get(), 2);  // the daemon inherits this stderr: its report comes to the top
        family_leader(stem, ready_write.get());
    }
    err_write.reset();
    ready_write.reset();

    int daemon = -1;
    pollfd p{ready_read.get(), POLLIN, 0};
    if (::poll(&p, 1, 20000) != 1 || ::read(ready_read.get(), &daemon, sizeof daemon) != sizeof daemon) {
        std::printf("the family leader did not get ready\n");
        ::kill(leader, SIGKILL);
        ::waitpid(leader, nullptr, 0);
        return 1;
    }
    print_entries("before", demo_entries(stem));
    std::printf("top: killing the family leader %d with SIGKILL; no destructor, no atexit runs\n",
                static_cast<int>(leader));
    (void)std::fflush(stdout);
    ::kill(leader, SIGKILL);
    ::waitpid(leader, nullptr, 0);

    // The daemon saw the end of input when the last write end closed; its report arrives on the
    // pipe, which reaches EOF when it exits.
    std::string report;
    for (;;) {
        pollfd rp{err_read.get(), POLLIN, 0};
        if (::poll(&rp, 1, 20000) != 1) break;
        char buf[4096];
        const auto n = ::read(err_read.get(), buf, sizeof buf);
        if (n <= 0) break;
        report.append(buf, static_cast<std::size_t>(n));
    }
    int status = -1;
    for (int i = 0; i < 500; ++i) {
        int ws = 0;
        const pid_t got = ::waitpid(daemon, &ws, WNOHANG);
        if (got == daemon) {
            status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
            break;
        }
        ::usleep(10000);
    }
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
    std::size_t start = 0;
    while (start < report.size()) {
        auto nl = report.find('\n', start);
        if (nl == std::string::npos) nl = report.size();
        std::printf("  daemon| %s\n", report.substr(start, nl - start).c_str());
        start = nl + 1;
    }
    std::printf("daemon exit status: %d (1 = leaks found and all cleaned)\n", status);
    const auto after = demo_entries(stem);
    print_entries("after", after);
    if (!after.empty() || status != 1) {
        std::printf("tracker chapter FAILED: something was left behind\n");
        for (const auto& e : after) ::unlink(("/dev/shm/" + e).c_str());
        return 1;
    }
    std::printf("nothing leaked: every registered object was removed once the family was gone.\n");
    (void)std::fflush(stdout);
    return 0;
}

}  // namespace steward::cli
