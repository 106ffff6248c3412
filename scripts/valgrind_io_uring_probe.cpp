// Does this valgrind let another thread run while one thread waits in io_uring_enter?
// scripts/run valgrind runs it under valgrind first: valgrind 3.19 (Debian 12) keeps its global
// lock during io_uring_enter, so the writer thread below never runs and the wait never ends. A
// program whose wake-ups cross threads through the ring (the sharer suites: a fetch in the main
// thread, the server on its own thread) then hangs under memcheck without any fault of its own.
// Exit 0: the wait was woken by the other thread. Under a valgrind that blocks, the caller's
// timeout kills it.
#include <liburing.h>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

int main() {
    io_uring ring{};
    if (io_uring_queue_init(4, &ring, 0) != 0) return 2;
    int pipe_fds[2];
    if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return 2;
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    io_uring_prep_poll_add(sqe, pipe_fds[0], POLLIN);
    if (io_uring_submit(&ring) != 1) return 2;
    std::thread writer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        if (::write(pipe_fds[1], "x", 1) != 1) std::_Exit(2);
    });
    io_uring_cqe* cqe = nullptr;
    const int rc = io_uring_wait_cqe(&ring, &cqe);
    writer.join();
    const bool woken = rc == 0 && (cqe->res & POLLIN);
    std::puts(woken ? "io_uring wait woken by another thread" : "io_uring wait failed");
    return woken ? 0 : 1;
}
