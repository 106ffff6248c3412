// Tracker benchmarks: the client's registration rate, the daemon's ingest rate, its memory per
// tracked name and its cleanup rate at end of input, each against its floor or CPython.
//
// scenario register_serial      one REGISTER/UNREGISTER message per call, the next call after the
//                               previous one completed
//   steward  one coroutine awaiting each steward::tracker::async_register/async_unregister, with
//            tracker_options::sigpipe_ignored (this process ignores SIGPIPE, as the floor's does)
//   steward_guarded  the same with default options: SIGPIPE blocked around each write (two more
//            system calls per message)
//   floor    one blocking write() per message into the pipe of a steward-tracker daemon
//   same_syscalls  the five system calls the client made per message before direct writes
//            (waitid, sigmask, sigpending, pwritev2, sigmask), blocking, no library
//   asio_only  one coroutine co_awaiting a coroutine that returns at once per message: the asio
//            part of the steward variant alone (no tracker, no I/O)
// scenario register_concurrent  many registrations in flight at once
//   steward  1000 coroutines on one tracker, each awaiting its own calls (group commit)
//   floor    blocking write()s of 4096-byte batches of whole messages into the daemon's pipe
//   asio_only  the same 1000 coroutines awaiting operations completed in place by one posted flush
//            per round: the asio part of the steward variant alone (no tracker, no I/O)
// scenario daemon_ingest        bytes written straight into the daemon's pipe (REGISTER/UNREGISTER
//                               pairs, names cycling through a window of 4096), timed from the
//                               first byte to the daemon's exit after end of input
//   steward  steward-tracker --fd 3
//   cpython  python3 bench/python/tracker_daemon.py 3 (multiprocessing.resource_tracker.main)
// scenario daemon_memory        growth of the daemon's VmHWM after N distinct REGISTERs (1M)
//   steward / cpython as above; value = bytes per name (the name is 13 bytes)
// scenario cleanup              N (20,000) real POSIX shm segments registered, then end of input:
//                               time from closing the pipe to the daemon's exit (all unlinked)
//   steward / cpython as above
//
// The CPython registration rates (its resource_tracker.register API) come from
// bench/python/tracker_register.py, run directly by bench/run.

#include "bench_common.hpp"

#include <steward/resource_type.hpp>

#if defined(STEWARD_BENCH_HAVE_TRACKER_CLIENT)
#include <steward/tracker.hpp>
#endif

#include <asio/any_completion_handler.hpp>
#include <asio/as_tuple.hpp>
#include <asio/async_result.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include <csignal>
#include <optional>
#include <string_view>

namespace {

std::string tracker_exe(const bench::args& a) {
    return a.get("tracker-exe", bench::env_or("STEWARD_TRACKER_EXE", STEWARD_BENCH_TRACKER_EXE));
}
std::string python_exe(const bench::args& a) {
    return a.get("python", "python3");
}

// "/psm_" + 8 hex digits: 13 bytes, the shape of CPython's SharedMemory names.
std::size_t make_name(char* out, std::size_t i) {
    return static_cast<std::size_t>(std::snprintf(out, 32, "/psm_%08zx", i));
}

std::string message(bool register_it, std::size_t i) {
    char name[32];
    const std::size_t len = make_name(name, i);
    std::string m = register_it ? "REGISTER:" : "UNREGISTER:";
    m.append(name, len);
    m += ":shared_memory\n";
    return m;
}

// A daemon (steward's or CPython's) reading the read end of a fresh pipe as its descriptor 3.
class daemon_process {
public:
    daemon_process(const bench::args& a, const std::string& which, bool quiet = true) {
        int p[2];
        bench::check(::pipe2(p, O_CLOEXEC) == 0, "pipe2");
        // Out of the way of descriptor 3, so the spawn's dup2 always makes a fresh, inheritable copy.
        const int read_end = ::fcntl(p[0], F_DUPFD_CLOEXEC, 10);
        ::close(p[0]);
        write_end_ = p[1];
        std::vector<std::string> argv;
        if (which == "steward")
            argv = {tracker_exe(a), "--fd", "3"};
        else
            argv = {python_exe(a), std::string(STEWARD_BENCH_PYTHON_DIR) + "/tracker_daemon.py", "3"};
        if (argv[0].find('/') == std::string::npos) argv[0] = find_in_path(argv[0]);
        pid_ = bench::spawn_with_fd3(argv, read_end, quiet);
        ::close(read_end);
        // Ready once it has read a probe (CPython's interpreter takes a while to start).
        bench::write_all(write_end_, "PROBE:0:noop\n", 13);
        if (!bench::wait_reader_idle(write_end_, pid_)) throw std::runtime_error("daemon did not start");
    }
    daemon_process(const daemon_process&) = delete;
    daemon_process& operator=(const daemon_process&) = delete;
    ~daemon_process() {
        if (write_end_ >= 0) ::close(write_end_);
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            try {
                bench::wait_child(pid_);
            } catch (const std::exception&) {  // already reaped: nothing left to do
            }
        }
    }

    [[nodiscard]] int write_end() const { return write_end_; }
    [[nodiscard]] pid_t pid() const { return pid_; }

    // Closes the pipe (end of input) and returns the daemon's exit status.
    int finish() {
        ::close(write_end_);
        write_end_ = -1;
        const int status = bench::wait_child(pid_);
        pid_ = -1;
        return status;
    }

private:
    static std::string find_in_path(const std::string& name) {
        const std::string path = bench::env_or("PATH", "/usr/bin:/bin");
        std::size_t start = 0;
        while (start <= path.size()) {
            const std::size_t end = std::min(path.find(':', start), path.size());
            std::string candidate = path.substr(start, end - start) + "/" + name;
            if (::access(candidate.c_str(), X_OK) == 0) return candidate;
            start = end + 1;
        }
        return name;
    }

    int write_end_ = -1;
    pid_t pid_ = -1;
};

// One message per call with the five system calls steward::tracker makes for it when calls do not
// overlap: waitid(P_PIDFD, WNOHANG) on the daemon (is it alive?), SIGPIPE blocked, pending signals
// read, the RWF_NOWAIT write, the mask restored. Blocking, no library: what the serial scenario
// would cost if the client's coroutine and completion machinery were free.
int register_same_syscalls(const bench::args& a) {
    daemon_process d(a, "steward");
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, d.pid(), 0));
    bench::check(pidfd >= 0, "pidfd_open");
    std::vector<std::string> msgs;
    msgs.reserve(a.n);
    for (std::size_t i = 0; i < a.n; ++i) msgs.push_back(message(i % 2 == 0, i / 2));
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    const auto t0 = bench::clock::now();
    for (const auto& m : msgs) {
        siginfo_t info{};
        bench::check(::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &info,
                              WEXITED | WNOHANG) == 0 &&
                         info.si_pid == 0,
                     "waitid: daemon gone");
        sigset_t old_mask, pending;
        ::pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask);
        ::sigpending(&pending);
        iovec iov{const_cast<char*>(m.data()), m.size()};
        ssize_t w;
        while ((w = ::pwritev2(d.write_end(), &iov, 1, -1, RWF_NOWAIT)) < 0 && errno == EAGAIN) {
            pollfd pfd{d.write_end(), POLLOUT, 0};
            ::poll(&pfd, 1, -1);
        }
        ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
        bench::check(w == static_cast<ssize_t>(m.size()), "pwritev2");
    }
    const double s = bench::seconds_since(t0);
    ::close(pidfd);
    const int status = d.finish();
    bench::result r(a, "msg/s", true);
    r.value(static_cast<double>(a.n) / s);
    r.count(a.n);
    r.seconds(s);
    r.extra("daemon_exit_status", status);
    r.print();
    return status == 0 ? 0 : 1;
}

// The coroutine machinery of the steward variants alone, with the same shape and no tracker: no
// name, encoding, bookkeeping or I/O. serial: each call co_awaits a coroutine that returns at once
// (the direct path's shape). concurrent: each call co_awaits an operation whose handler is queued
// and completed in place by one posted flush per round, as a group commit completes its callers.
// What steward adds to the floor's system calls can be no less than this.
int register_asio_only(const bench::args& a, std::size_t coroutines) {
    asio::io_context ctx(1);
    using handler = asio::any_completion_handler<void(std::error_code)>;
    std::vector<handler> queued;
    std::vector<handler> completing;
    bool flush_posted = false;
    auto flush = [&] {
        flush_posted = false;
        completing.swap(queued);
        for (auto& h : completing) std::move(h)(std::error_code{});
        completing.clear();
    };
    auto queued_op = [&](auto token) {
        return asio::async_initiate<decltype(token), void(std::error_code)>(
            [&](auto h) {
                queued.emplace_back(std::move(h));
                if (!flush_posted) {
                    flush_posted = true;
                    asio::post(ctx, [&] { flush(); });
                }
            },
            token);
    };
    auto immediate = []() -> asio::awaitable<void> { co_return; };
    double seconds = 0;
    std::size_t done = 0;
    std::exception_ptr error;
    const std::size_t per = a.n / coroutines;
    const auto t0 = bench::clock::now();
    for (std::size_t c = 0; c < coroutines; ++c) {
        asio::co_spawn(
            ctx,
            [&]() -> asio::awaitable<void> {
                for (std::size_t i = 0; i + 1 < per; i += 2) {
                    if (coroutines == 1) {
                        co_await immediate();
                        co_await immediate();
                    } else {
                        co_await queued_op(asio::use_awaitable);
                        co_await queued_op(asio::use_awaitable);
                    }
                }
                if (++done == coroutines) seconds = bench::seconds_since(t0);
            },
            [&](const std::exception_ptr& e) {
                if (e && !error) error = e;
            });
    }
    ctx.run();
    if (error) std::rethrow_exception(error);
    const std::size_t total = (per / 2) * 2 * coroutines;
    bench::result r(a, "msg/s", true);
    r.value(static_cast<double>(total) / seconds);
    r.count(total);
    r.seconds(seconds);
    r.extra("coroutines", static_cast<double>(coroutines));
    r.print();
    return 0;
}

int register_floor(const bench::args& a, bool batched) {
    daemon_process d(a, "steward");
    // Messages built before the clock starts (one buffer, offsets per write); the floor measures
    // the writes alone.
    std::string all;
    std::vector<std::size_t> ends;  // end offset of each write
    for (std::size_t i = 0; i < a.n; ++i) {
        const std::string m = message(i % 2 == 0, i / 2);
        if (batched && !ends.empty() &&
            all.size() + m.size() - (ends.size() > 1 ? ends[ends.size() - 2] : 0) <= 4096)
            ends.back() += m.size();
        else
            ends.push_back(all.size() + m.size());
        all += m;
    }
    const auto t0 = bench::clock::now();
    std::size_t start = 0;
    for (const std::size_t end : ends) {
        bench::check(
            ::write(d.write_end(), all.data() + start, end - start) == static_cast<ssize_t>(end - start),
            "write");
        start = end;
    }
    const double s = bench::seconds_since(t0);
    const int status = d.finish();
    bench::result r(a, "msg/s", true);
    r.value(static_cast<double>(a.n) / s);
    r.count(a.n);
    r.seconds(s);
    r.extra("daemon_exit_status", status);
    r.extra("writes", static_cast<double>(ends.size()));
    r.print();
    return status == 0 ? 0 : 1;
}

#if defined(STEWARD_BENCH_HAVE_TRACKER_CLIENT)
int register_steward(const bench::args& a, std::size_t coroutines, bool sigpipe_ignored) {
    asio::io_context ctx(1);
    steward::tracker_options options;
    options.executable = tracker_exe(a);
    options.sigpipe_ignored = sigpipe_ignored;
    steward::tracker t(ctx.get_executor(), options);
    double seconds = 0;
    std::exception_ptr error;
    std::optional<int> status;
    std::size_t done = 0;
    // Names formatted before the clock starts, as the floor and the CPython script do, and laid out
    // in the order they are used (the coroutines take turns: pair k of coroutine c is name
    // k * coroutines + c), as the floor's buffer is: a thousand scattered read streams would
    // otherwise measure the cache misses of this program's own array.
    std::vector<std::string> names(a.n / 2 + coroutines);
    for (std::size_t i = 0; i < names.size(); ++i) {
        char name[32];
        names[i].assign(name, make_name(name, i));
    }
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            co_await t.async_ensure_running(asio::use_awaitable);
            const std::size_t per = a.n / coroutines;
            const auto t0 = bench::clock::now();
            for (std::size_t c = 0; c < coroutines; ++c) {
                // per and t0 by value: this coroutine ends before the ones it spawns.
                asio::co_spawn(
                    ctx,
                    [&, c, per, t0]() -> asio::awaitable<void> {
                        for (std::size_t i = 0; i + 1 < per; i += 2) {
                            const std::string_view nm = names[(i / 2) * coroutines + c];
                            co_await t.async_register(nm, steward::resource_type::shared_memory,
                                                      asio::use_awaitable);
                            co_await t.async_unregister(nm, steward::resource_type::shared_memory,
                                                        asio::use_awaitable);
                        }
                        if (++done == coroutines) {
                            seconds = bench::seconds_since(t0);
                            auto [ec, st] = co_await t.async_stop(std::chrono::seconds(30),
                                                                  asio::as_tuple(asio::use_awaitable));
                            if (!ec) status = st;
                        }
                    },
                    [&](const std::exception_ptr& e) {
                        if (e && !error) error = e;
                    });
            }
        },
        [&](const std::exception_ptr& e) {
            if (e && !error) error = e;
        });
    ctx.run();
    if (error) std::rethrow_exception(error);
    const std::size_t total = (a.n / coroutines / 2) * 2 * coroutines;
    bench::result r(a, "msg/s", true);
    r.value(static_cast<double>(total) / seconds);
    r.count(total);
    r.seconds(seconds);
    r.extra("coroutines", static_cast<double>(coroutines));
    r.extra("sigpipe_ignored", sigpipe_ignored ? 1 : 0);
    if (status) r.extra("daemon_exit_status", *status);
    r.print();
    return 0;
}
#endif

int daemon_ingest(const bench::args& a) {
    // One chunk of whole REGISTER/UNREGISTER pairs (~1 MiB), written again and again.
    std::string chunk;
    std::size_t chunk_msgs = 0;
    for (std::size_t i = 0; chunk.size() < (1u << 20); ++i) {
        chunk += message(true, i % 4096);
        chunk += message(false, i % 4096);
        chunk_msgs += 2;
    }
    const std::size_t rounds = std::max<std::size_t>(1, a.n / std::max<std::size_t>(1, chunk_msgs));
    daemon_process d(a, a.variant);
    const auto t0 = bench::clock::now();
    for (std::size_t i = 0; i < rounds; ++i) bench::write_all(d.write_end(), chunk.data(), chunk.size());
    const int status = d.finish();
    const double s = bench::seconds_since(t0);
    bench::result r(a, "msg/s", true);
    r.value(static_cast<double>(rounds * chunk_msgs) / s);
    r.count(rounds * chunk_msgs);
    r.seconds(s);
    r.extra("daemon_exit_status", status);
    r.print();
    return 0;
}

int daemon_memory(const bench::args& a) {
    daemon_process d(a, a.variant);
    const long before = bench::proc_status_kib(d.pid(), "VmHWM");
    std::string batch;
    std::size_t name_bytes = 0;
    for (std::size_t i = 0; i < a.n; ++i) {
        const std::string m = message(true, i);
        name_bytes += m.size() - std::strlen("REGISTER::shared_memory\n");
        if (batch.size() + m.size() > (1u << 16)) {
            bench::write_all(d.write_end(), batch.data(), batch.size());
            batch.clear();
        }
        batch += m;
    }
    bench::write_all(d.write_end(), batch.data(), batch.size());
    if (!bench::wait_reader_idle(d.write_end(), d.pid(), std::chrono::seconds(120)))
        throw std::runtime_error("daemon did not settle");
    const long after = bench::proc_status_kib(d.pid(), "VmHWM");
    const double per_name = static_cast<double>(after - before) * 1024.0 / static_cast<double>(a.n);
    const double avg_name = static_cast<double>(name_bytes) / static_cast<double>(a.n);
    bench::result r(a, "B/name", false);
    r.value(per_name);
    r.count(a.n);
    r.extra("name_bytes", avg_name);
    r.extra("overhead_per_name", per_name - avg_name);
    r.extra("vmhwm_before_kib", static_cast<double>(before));
    r.extra("vmhwm_after_kib", static_cast<double>(after));
    r.print();
    return 0;  // the daemon is killed: every name is fictitious, there is nothing to clean
}

int cleanup(const bench::args& a) {
    std::vector<std::string> names;
    names.reserve(a.n);
    for (std::size_t i = 0; i < a.n; ++i) {
        names.push_back("/stwbench_" + std::to_string(::getpid()) + "_" + std::to_string(i));
        const int fd = ::shm_open(names.back().c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        bench::check(fd >= 0, "shm_open");
        ::close(fd);
    }
    double s = 0;
    int status = -1;
    {
        daemon_process d(a, a.variant);
        std::string batch;
        for (const auto& n : names) {
            const std::string m = "REGISTER:" + n + ":shared_memory\n";
            if (batch.size() + m.size() > 4096) {
                bench::write_all(d.write_end(), batch.data(), batch.size());
                batch.clear();
            }
            batch += m;
        }
        bench::write_all(d.write_end(), batch.data(), batch.size());
        if (!bench::wait_reader_idle(d.write_end(), d.pid(), std::chrono::seconds(120)))
            throw std::runtime_error("daemon did not settle");
        const auto t0 = bench::clock::now();
        status = d.finish();
        s = bench::seconds_since(t0);
    }
    std::size_t left = 0;
    for (const auto& n : names) {
        if (::shm_unlink(n.c_str()) == 0) ++left;
    }
    bench::result r(a, "names/s", true);
    r.value(static_cast<double>(a.n - left) / s);
    r.count(a.n - left);
    r.seconds(s);
    r.extra("left_behind", static_cast<double>(left));
    r.extra("daemon_exit_status", status);
    r.print();
    return left == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    bench::args a = bench::parse_args(argc, argv, 0);
    (void)std::signal(SIGPIPE, SIG_IGN);
    try {
        const std::string& s = a.scenario;
        const std::string& v = a.variant;
        if (s == "register_serial" || s == "register_concurrent") {
            if (a.n == 0) a.n = 1000000;
            const bool concurrent = s == "register_concurrent";
            if (v == "floor") return register_floor(a, concurrent);
            if (v == "same_syscalls" && !concurrent) return register_same_syscalls(a);
            if (v == "asio_only")
                return register_asio_only(a, concurrent ? a.get_size("coroutines", 1000) : 1);
            if (v == "steward" || v == "steward_guarded") {
#if defined(STEWARD_BENCH_HAVE_TRACKER_CLIENT)
                return register_steward(a, concurrent ? a.get_size("coroutines", 1000) : 1, v == "steward");
#else
                return bench::not_measured(a, "steward::tracker client not in the tree yet");
#endif
            }
        } else if (s == "daemon_ingest") {
            if (a.n == 0) a.n = 4000000;
            if (v == "steward" || v == "cpython") return daemon_ingest(a);
        } else if (s == "daemon_memory") {
            if (a.n == 0) a.n = 1000000;
            if (v == "steward" || v == "cpython") return daemon_memory(a);
        } else if (s == "cleanup") {
            if (a.n == 0) a.n = 20000;
            if (v == "steward" || v == "cpython") return cleanup(a);
        }
        return bench::failed(a, "unknown scenario or variant");
    } catch (const std::exception& e) {
        return bench::failed(a, e.what());
    }
}
