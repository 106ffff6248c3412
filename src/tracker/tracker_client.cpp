// steward::tracker: spawning the daemon, group commit of messages, relaunch after a death, stop.
//
// Concurrency model. One mutex guards all state. Writing is a "role" held by at most one thread at a
// time (role_): the holder takes the oldest batch, drops the mutex only for the one non-blocking
// write, and takes the mutex back to complete the batch. The role is never held while waiting: an
// asynchronous writer that finds the pipe full releases it and waits for room on the executor; a
// blocking caller holds it across poll(). So writes go out strictly in queue order (messages of one
// caller keep their order) with one write outstanding at a time, and a blocking call made on the
// executor's own thread never waits for something only that thread could do.
//
// Group commit. A call encodes its message straight into the batch being filled (4096 bytes, whole
// messages only) and, unless a writer is already active or scheduled, posts one flush. Everything
// that arrives before the flush runs shares its writes. Batches and their handler vectors are
// recycled, so a message costs no allocation of its own beyond what the completion handler needs.
//
// Code layout. The functions every message passes through are [[gnu::hot]]: the linker places them
// side by side, so after each write's system call (which on a VM leaves the caches and TLB cold) the
// path back to the caller touches a few pages of code instead of one per function.
//
// Registrations this process made (and has not unregistered) are remembered from the moment the call
// is accepted. When a daemon is relaunched after a death, that set is written first as REGISTER
// lines, and the bytes of every batch still queued are dropped (their effect is already in the set; replaying
// an UNREGISTER the new daemon never saw would only produce a warning). Their callers complete once the set
// has been written.
#include <steward/tracker.hpp>

#include "tracker/client_pipe_write.hpp"
#include "tracker/codec.hpp"
#include "tracker/registry.hpp"
#include "tracker/registry_change_log.hpp"

#include <steward/io/async_spawn.hpp>
#include <steward/io/async_write_message.hpp>
#include <steward/io/backend_probe.hpp>
#include <steward/io/child_process.hpp>
#include <steward/io/process_generation.hpp>
#include <steward/io_uring_check.hpp>
#include <steward/unique_fd.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/append.hpp>
#include <asio/associated_executor.hpp>
#include <asio/bind_executor.hpp>
#include <asio/dispatch.hpp>
#include <asio/error.hpp>
#include <asio/io_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#ifndef STEWARD_INSTALLED_TRACKER
#define STEWARD_INSTALLED_TRACKER ""
#endif
#ifndef STEWARD_BUILD_TREE_TRACKER
#define STEWARD_BUILD_TREE_TRACKER ""
#endif

namespace steward {
namespace detail {

// Handlers the completion loops running on this thread have yet to resume. A caller resumed by
// such a loop while others wait their turn joins a batch instead of writing directly: the others
// are about to call too (group commit); the last one (a lone caller, e.g. every call of a serial
// loop) may write directly. Per thread because a loop resumes its callers on its own thread.
constinit thread_local std::size_t tracker_completions_pending = 0;

namespace {

using handler_type = asio::any_completion_handler<void(std::error_code)>;

// A waiting caller. direct: its associated executor is the tracker's own (decided at initiation,
// where the handler's type is still known), so a drain running on that executor may resume it in
// place.
struct waiting {
    handler_type handler;
    bool direct = false;
};
using stop_handler_type = asio::any_completion_handler<void(std::error_code, std::optional<int>)>;

constexpr std::size_t batch_capacity = io::max_atomic_write;
constexpr int daemon_fd = 3;

struct sync_waiter {
    sync_waiter* next = nullptr;
    std::error_code ec;
    bool done = false;
};

struct batch {
    batch* next = nullptr;
    std::size_t size = 0;
    std::vector<waiting> handlers;
    sync_waiter* waiters = nullptr;
    std::array<char, batch_capacity> bytes;
};

std::optional<int> status_code(const io::exit_status& st) {
    if (st.exited()) return st.code();
    if (st.killed()) return 128 + st.signal();
    return std::nullopt;
}

}  // namespace

class tracker_impl : public std::enable_shared_from_this<tracker_impl> {
public:
    tracker_impl(asio::any_io_executor ex, tracker_options options)
        : ex_(std::move(ex)), options_(std::move(options)), registered_(std::in_place) {
        // Compared on every call: a forked child notices without a getpid() system call per message.
        generation_ = io::process_generation();
    }

    ~tracker_impl() {
        for (batch* b = free_; b;) delete std::exchange(b, b->next);
        for (batch* b = head_; b;) delete std::exchange(b, b->next);
        delete inflight_;
    }

    const asio::any_io_executor& executor() const noexcept { return ex_; }

    // ---- entry points -----------------------------------------------------------------------

    [[gnu::hot]] void async_message(bool reg, std::string_view name, resource_type type, handler_type handler,
                                    bool direct) {
        // A plain name is encoded straight into the batch, others through encode() first.
        const std::size_t plain_size = tracking::plain_message_size(reg, type, name);
        encoded msg;
        if (plain_size == 0) {
            if (auto ec = encode_general(reg, name, type, msg)) {
                post_completion(std::move(handler), ec);
                return;
            }
        }
        std::unique_lock lk(m_);
        check_fork_locked();
        batch& b = room_locked(plain_size != 0 ? plain_size : msg.size);
        char* const line = b.bytes.data() + b.size;
        if (plain_size != 0) {
            remember_locked(reg, type, tracking::write_plain_message(reg, type, name, line));
            b.size += plain_size;
        } else {
            std::memcpy(line, msg.bytes.data(), msg.size);
            remember_locked(reg, type, msg.canonical);
            b.size += msg.size;
        }
        b.handlers.push_back({std::move(handler), direct});
        schedule_flush_locked();
    }

    // The direct path: when nothing is queued, being written or about to be completed, the caller
    // writes its own message at once (one system call) instead of queueing it for a flush.
    // Returns direct_outcome::queue (nothing changed; use the queue) unless the message was
    // written or refused; @p ec is the call's result then.
    [[gnu::hot]] tracker::direct_outcome try_direct(bool reg, std::string_view name, resource_type type,
                                                    std::error_code& ec) {
        ec.clear();
        // Resumed by a completion loop with others still to resume: the queue, without the lock.
        if (tracker_completions_pending != 0) return tracker::direct_outcome::queue;
        std::unique_lock lk(m_);
        check_fork_locked();
        // Checked before encoding: under load (the common "not allowed") the queue encodes anyway.
        if (!direct_allowed_locked()) return tracker::direct_outcome::queue;
        // Encoded and written with the lock held (unlike a drain's write): nothing else is active
        // when direct writes are allowed, and the write never blocks, so a concurrent caller waits
        // at most one system call, and one lock round trip per message is saved.
        encoded msg;
        if ((ec = encode(reg, name, type, msg))) return tracker::direct_outcome::done;
        int err = 0;
        const auto res = direct_fd_ ? tracking::pipe_write_nonblocking(direct_fd_.get(), msg.bytes.data(),
                                                                       msg.size, skip_sigpipe_guard_, err)
                                    : tracking::pipe_write_nowait(write_fd_.get(), msg.bytes.data(), msg.size,
                                                                  skip_sigpipe_guard_, err);
        auto outcome = tracker::direct_outcome::queue;
        switch (res) {
            case tracking::pipe_write_result::written:
                remember_locked(reg, type, msg.canonical);
                outcome = tracker::direct_outcome::done;
                // Completing in place never lets the executor run anything else: every so often the
                // caller yields once, so a loop of calls cannot starve the other work of its thread.
                if (++inline_streak_ >= max_inline_streak) {
                    inline_streak_ = 0;
                    ++yielding_;
                    outcome = tracker::direct_outcome::done_yield;
                }
                break;
            case tracking::pipe_write_result::no_reader:
                mark_dead_locked();
                break;  // queued: the drain starts a new daemon, which learns the message with the set
            case tracking::pipe_write_result::unsupported:
                direct_unsupported_ = true;
                break;
            case tracking::pipe_write_result::would_block:
                break;  // queued: the drain waits for room
            case tracking::pipe_write_result::error:
                ec = errno_code(err);
                outcome = tracker::direct_outcome::done;
                break;
        }
        return outcome;
    }

    [[gnu::hot]] void end_yield() {
        std::lock_guard lk(m_);
        if (yielding_) --yielding_;
    }

    void async_barrier(handler_type handler) {
        std::unique_lock lk(m_);
        check_fork_locked();
        room_locked(0).handlers.push_back({std::move(handler), false});
        schedule_flush_locked();
    }

    [[gnu::hot]] std::error_code sync_message(bool reg, std::string_view name, resource_type type) {
        std::error_code direct_ec;
        switch (try_direct(reg, name, type, direct_ec)) {
            case tracker::direct_outcome::done:
                return direct_ec;
            case tracker::direct_outcome::done_yield:
                end_yield();  // a blocking call returns to its caller: nothing to yield to
                return direct_ec;
            case tracker::direct_outcome::queue:
                break;
        }
        encoded msg;
        if (auto ec = encode(reg, name, type, msg)) return ec;
        std::unique_lock lk(m_);
        check_fork_locked();
        remember_locked(reg, type, msg.canonical);
        batch& b = room_locked(msg.size);
        std::memcpy(b.bytes.data() + b.size, msg.bytes.data(), msg.size);
        b.size += msg.size;
        return wait_sync_locked(lk, b);
    }

    std::error_code sync_barrier() {
        std::unique_lock lk(m_);
        check_fork_locked();
        return wait_sync_locked(lk, room_locked(0));
    }

    void async_stop(std::chrono::milliseconds timeout, stop_handler_type handler) {
        std::unique_lock lk(m_);
        check_fork_locked();
        if (state_ == state::idle) {
            io::child_process child = std::move(stopping_);
            lk.unlock();
            finish_stop(std::move(child), timeout, std::move(handler));
            return;
        }
        // Messages accepted before the stop are written before the write end is closed.
        auto self = shared_from_this();
        room_locked(0).handlers.push_back(
            {handler_type([self, timeout, h = std::move(handler)](std::error_code) mutable {
                 self->close_for_stop(timeout, std::move(h));
             }),
             false});
        schedule_flush_locked();
    }

    int fd() {
        std::lock_guard lk(m_);
        check_fork_locked();
        return write_fd_.get();
    }

    bool is_registered(std::string_view name, resource_type type) {
        encoded msg;
        if (name.size() >= tracking::max_message_size ||
            tracking::client_canonical_name(type, name, msg.canonical_buf.data(), msg.canonical))
            return false;
        std::lock_guard lk(m_);
        check_fork_locked();
        return registered_locked().find(type, msg.canonical) != tracking::registry::no_handle;
    }

    int daemon_pid() {
        std::lock_guard lk(m_);
        check_fork_locked();
        return owns_daemon_ ? daemon_.pid() : -1;
    }

    std::string last_error_detail() {
        std::lock_guard lk(m_);
        return last_error_;
    }

    void adopt_fd(unique_fd fd) {
        std::lock_guard lk(m_);
        set_write_end_locked(std::move(fd));
        state_ = state::running;
        owns_daemon_ = false;
        skip_sigpipe_guard_ = options_.sigpipe_ignored && tracking::sigpipe_ignored();
    }

    void export_environment() {
        std::lock_guard lk(m_);
        check_fork_locked();
        const int fd = write_fd_.get();
        if (fd < 0)
            throw std::system_error(make_error_code(errc::tracker_not_running),
                                    "tracker::export_environment");
        if (::fcntl(fd, F_SETFD, 0) != 0)
            throw std::system_error(errno_code(errno), "tracker::export_environment");
        const std::string value = std::to_string(fd);
        if (::setenv(tracker::environment_variable, value.c_str(), 1) != 0)
            throw std::system_error(errno_code(errno), "tracker::export_environment: setenv");
    }

private:
    enum class state { idle, running, dead };

    static constexpr unsigned max_inline_streak = 64;

    // Direct writes only while nothing else is in flight: otherwise the message joins the batch
    // being filled (group commit), and writes keep their order.
    bool direct_allowed_locked() const noexcept {
        return state_ == state::running && !role_ && !head_ && !inflight_ && !flush_posted_ &&
               !waiting_room_ && tracker_completions_pending == 0 && yielding_ == 0 && sync_waiting_ == 0 &&
               !direct_unsupported_ && write_fd_.get() >= 0;
    }

    // The pipe's write end, and the private non-blocking description of it that direct writes use:
    // a plain write(2) there costs less than pwritev2(RWF_NOWAIT) on the shared blocking one, and
    // is all or nothing as well (at most PIPE_BUF bytes). The private one is another writer of the
    // pipe, so both go together. Without /proc: direct writes use RWF_NOWAIT on the shared one.
    void set_write_end_locked(unique_fd fd) {
        direct_fd_.reset();
        write_fd_ = std::move(fd);
        if (write_fd_) {
            std::error_code ec;
            direct_fd_ = io::detail::open_private_write_end(write_fd_.get(), ec);
        }
    }

    void mark_dead_locked() {
        state_ = state::dead;
        dead_status_ = "its pipe has no reader";
        if (owns_daemon_ && daemon_.valid()) {
            std::error_code wait_ec;
            if (auto st = daemon_.try_wait(wait_ec)) dead_status_ = st->to_string();
        }
    }

    struct encoded {
        std::array<char, tracking::max_message_size> bytes;
        std::size_t size = 0;
        std::array<char, tracking::max_message_size + 2> canonical_buf;
        std::string_view canonical;
    };

    static std::error_code encode(bool reg, std::string_view name, resource_type type, encoded& out) {
        // Most names take the inline encoder: after every write's system call, the code and tables
        // of the general one would have to be fetched again.
        if (const std::size_t plain_size = tracking::plain_message_size(reg, type, name)) {
            out.canonical = tracking::write_plain_message(reg, type, name, out.bytes.data());
            out.size = plain_size;
            return {};
        }
        return encode_general(reg, name, type, out);
    }

    // For a name plain_message_size() declined.
    static std::error_code encode_general(bool reg, std::string_view name, resource_type type, encoded& out) {
        // A name this long cannot fit a 512-byte line in either format.
        if (name.size() >= tracking::max_message_size) return errc::message_too_long;
        if (auto ec = tracking::client_canonical_name(type, name, out.canonical_buf.data(), out.canonical))
            return ec;
        return tracking::encode_into(reg, type, out.canonical, out.bytes.data(), out.size);
    }

    // ---- queue ------------------------------------------------------------------------------

    batch* new_batch_locked() {
        batch* b = free_;
        if (b) {
            free_ = b->next;
            b->next = nullptr;
        } else {
            b = new batch;
        }
        return b;
    }

    void recycle_locked(batch* b) {
        b->size = 0;
        b->handlers.clear();
        b->waiters = nullptr;
        b->next = free_;
        free_ = b;
    }

    // The batch being filled, with room for @p size more bytes.
    batch& room_locked(std::size_t size) {
        if (!tail_ || tail_->size + size > batch_capacity) {
            batch* b = new_batch_locked();
            if (tail_)
                tail_->next = b;
            else
                head_ = b;
            tail_ = b;
        }
        return *tail_;
    }

    batch* pop_head_locked() {
        batch* b = head_;
        head_ = b->next;
        if (!head_) tail_ = nullptr;
        b->next = nullptr;
        return b;
    }

    // The daemon's own compact set (names in arenas, one table word per name): no allocation per
    // message, a short-name hash, and churn (register then unregister) compacted away in bulk. A
    // change is recorded first and applied in bulk with many others (registry_change_log): the set is
    // only read when a daemon is relaunched and by is_registered(), which apply the record first.
    void remember_locked(bool reg, resource_type type, std::string_view name) {
        changes_.record(*registered_, reg, type, name);
    }

    tracking::registry& registered_locked() {
        changes_.apply(*registered_);
        return *registered_;
    }

    void forget_all_locked() {
        changes_.clear();
        registered_.emplace();
    }

    void schedule_flush_locked() {
        if (role_ || flush_posted_ || waiting_room_) return;
        flush_posted_ = true;
        asio::post(ex_, [self = shared_from_this()] { self->flush(); });
    }

    [[gnu::hot]] void flush() {
        std::unique_lock lk(m_);
        flush_posted_ = false;
        if (!role_) drain_locked(lk, nullptr);
    }

    std::error_code wait_sync_locked(std::unique_lock<std::mutex>& lk, batch& b) {
        sync_waiter mine;
        mine.next = b.waiters;
        b.waiters = &mine;
        ++sync_waiting_;
        while (!mine.done) {
            if (!role_)
                drain_locked(lk, &mine);
            else
                cv_.wait(lk);
        }
        --sync_waiting_;
        return mine.ec;
    }

    void release_role_locked() {
        role_ = false;
        if (sync_waiting_) cv_.notify_all();
    }

    // Writes queued batches in order. @p mine: a blocking caller, which waits for room with poll()
    // and returns once its own message is written; nullptr: the executor, which waits for room
    // asynchronously and yields after a few batches so other work on the executor runs too.
    [[gnu::hot]] void drain_locked(std::unique_lock<std::mutex>& lk, sync_waiter* mine) {
        role_ = true;
        int batches = 0;
        std::vector<waiting> done;
        done.reserve(256);  // swapped into the batches, whose vectors keep their capacity when recycled
        // A blocking caller leaves as soon as its own message is written; whatever it leaves behind
        // (messages queued while it held the role, whose callers therefore posted no flush) goes to
        // the executor.
        auto hand_over = [&] {
            if (!role_ && (head_ || inflight_)) schedule_flush_locked();
        };
        for (;;) {
            check_fork_locked();
            if (!inflight_) {
                if (!head_) break;
                inflight_ = pop_head_locked();
            }
            // No waitid() per batch: only the daemon holds the read end, so a write after its
            // death fails with EPIPE, which relaunches it below.
            if (state_ != state::running) {
                if (auto ec = start_daemon_locked()) {
                    // Nothing queued since the last start reached a daemon: forget those names, or
                    // a later relaunch would register names whose registration failed.
                    if (state_ == state::idle) forget_all_locked();
                    fail_all_locked(ec, done);
                }
                if (!done.empty()) {
                    release_role_locked();
                    complete_all(lk, done, mine != nullptr);
                    if ((mine && mine->done) || role_) {
                        hand_over();
                        return;
                    }
                    role_ = true;
                }
                continue;
            }
            batch* b = inflight_;
            // The descriptors stay open while the role is held (close_for_stop() waits for it).
            const int fd = write_fd_.get();
            const int private_fd = direct_fd_.get();
            const bool skip_guard = skip_sigpipe_guard_;
            std::error_code ec;
            if (b->size != 0) {
                lk.unlock();
                ec = write_batch(fd, private_fd, skip_guard, b->bytes.data(), b->size);
                lk.lock();
            }
            if (ec == asio::error::would_block) {
                if (mine) {
                    lk.unlock();
                    pollfd p{fd, POLLOUT, 0};
                    (void)::poll(&p, 1, -1);
                    lk.lock();
                    continue;
                }
                start_room_wait_locked();
                release_role_locked();
                return;
            }
            if (ec == std::errc::broken_pipe) {
                mark_dead_locked();
                continue;
            }
            inflight_ = nullptr;
            take_locked(b, ec, done);
            recycle_locked(b);
            release_role_locked();
            complete_all(lk, done, mine != nullptr);
            if (mine && mine->done) {
                hand_over();
                return;
            }
            if (role_) return;  // another thread took over while the lock was released
            if (!mine && ++batches >= 16) {
                schedule_flush_locked();
                return;
            }
            role_ = true;
        }
        release_role_locked();
    }

    // One batch (at most PIPE_BUF bytes: all or nothing). Through the private non-blocking
    // description when there is one: a plain write(2), with no signal-mask calls around it when the
    // process ignores SIGPIPE. Otherwise io::detail::write_whole() (RWF_NOWAIT, SIGPIPE guarded).
    [[gnu::hot]] static std::error_code write_batch(int fd, int private_fd, bool skip_guard, const char* data,
                                                    std::size_t size) {
        std::error_code ec;
        if (private_fd < 0) {
            io::detail::write_whole(fd, data, size, ec);
            return ec;
        }
        int err = 0;
        switch (tracking::pipe_write_nonblocking(private_fd, data, size, skip_guard, err)) {
            case tracking::pipe_write_result::written:
                break;
            case tracking::pipe_write_result::would_block:
                ec = asio::error::would_block;
                break;
            case tracking::pipe_write_result::no_reader:
                ec = std::make_error_code(std::errc::broken_pipe);
                break;
            case tracking::pipe_write_result::unsupported:  // RWF_NOWAIT only; a plain write never says so
            case tracking::pipe_write_result::error:
                ec = errno_code(err);
                break;
        }
        return ec;
    }

    void take_locked(batch* b, std::error_code ec, std::vector<waiting>& done) {
        done.swap(b->handlers);
        for (sync_waiter* w = b->waiters; w; w = w->next) {
            w->ec = ec;
            w->done = true;
        }
        b->waiters = nullptr;
        last_ec_ = ec;
    }

    // Completes @p done with last_ec_ (set by take_locked/fail_all_locked) outside the lock.
    [[gnu::hot]] void complete_all(std::unique_lock<std::mutex>& lk, std::vector<waiting>& done,
                                   bool post_only) {
        const std::error_code ec = last_ec_;
        if (done.empty()) return;
        // Callers resumed here that call again join a batch instead of writing directly while
        // others are still to be resumed by this loop: those are about to call too (group commit).
        // The last one (a lone caller: every call of a serial loop) may write directly.
        struct restore {
            std::size_t outer = tracker_completions_pending;     // a handler may block and drain: loops nest
            ~restore() { tracker_completions_pending = outer; }  // also when a handler throws
        } pending;
        std::size_t left = done.size();
        lk.unlock();
        // The common case, a coroutine on the io_context this drain runs on, is resumed directly:
        // exactly what dispatch() would do, without its type-erased executor round trips. Blocking
        // callers' drains (post_only) never run handlers in place: they may hold locks of their own.
        using ctx_executor = asio::io_context::executor_type;
        const ctx_executor* here = post_only ? nullptr : ex_.target<ctx_executor>();
        if (here && !here->running_in_this_thread()) here = nullptr;
        for (auto& w : done) {
            tracker_completions_pending = pending.outer + --left;
            if (here && w.direct)
                std::move(w.handler)(ec);
            else if (post_only)
                asio::post(ex_, asio::append(std::move(w.handler), ec));
            else
                asio::dispatch(ex_, asio::append(std::move(w.handler), ec));
        }
        done.clear();
        lk.lock();
    }

    void fail_all_locked(std::error_code ec, std::vector<waiting>& done) {
        auto fail = [&](batch* b) {
            for (auto& h : b->handlers) done.push_back(std::move(h));
            for (sync_waiter* w = b->waiters; w; w = w->next) {
                w->ec = ec;
                w->done = true;
            }
            recycle_locked(b);
        };
        if (inflight_) fail(std::exchange(inflight_, nullptr));
        while (head_) fail(pop_head_locked());
        last_ec_ = ec;
    }

    void start_room_wait_locked() {
        if (!waiter_) {
            std::error_code ec;
#if defined(ASIO_HAS_IO_URING_AS_DEFAULT)
            // POLL_ADD leaves the shared description's flags alone.
            int dup = ::fcntl(write_fd_.get(), F_DUPFD_CLOEXEC, 3);
            unique_fd fd(dup);
            if (dup < 0) ec = errno_code(errno);
#else
            // Reactor backends set O_NONBLOCK on what they wait on: wait on a private description.
            unique_fd fd = io::detail::open_private_write_end(write_fd_.get(), ec);
#endif
            if (ec) {
                // Cannot wait on the executor: fall back to a short timer-free retry via post.
                flush_posted_ = true;
                asio::post(ex_, [self = shared_from_this()] { self->flush(); });
                return;
            }
            waiter_ = std::make_unique<asio::posix::stream_descriptor>(ex_, fd.release());
        }
        waiting_room_ = true;
        waiter_->async_wait(asio::posix::descriptor_base::wait_write,
                            [self = shared_from_this()](std::error_code) {
                                std::unique_lock lk(self->m_);
                                self->waiting_room_ = false;
                                if (!self->role_) self->drain_locked(lk, nullptr);
                            });
    }

    // ---- daemon -----------------------------------------------------------------------------

    std::string find_executable_locked(std::error_code& ec) {
        std::vector<std::string> candidates;
        if (!options_.executable.empty()) {
            candidates.push_back(options_.executable);
        } else {
            if (const char* env = std::getenv("STEWARD_TRACKER_EXE"); env && *env)
                candidates.emplace_back(env);
            if (*STEWARD_INSTALLED_TRACKER) candidates.emplace_back(STEWARD_INSTALLED_TRACKER);
            if (*STEWARD_BUILD_TREE_TRACKER) candidates.emplace_back(STEWARD_BUILD_TREE_TRACKER);
        }
        std::string tried;
        for (const auto& c : candidates) {
            struct stat st {};
            int err = 0;
            if (::stat(c.c_str(), &st) != 0 || (S_ISREG(st.st_mode) && ::access(c.c_str(), X_OK) != 0))
                err = errno;
            else if (!S_ISREG(st.st_mode))
                err = EISDIR;
            if (err == 0) return c;
            if (!tried.empty()) tried += ", ";
            tried += c + " (" + std::strerror(err) + ")";
        }
        ec = errc::executable_not_found;
        last_error_ = "steward-tracker not found; tried: " +
                      (tried.empty() ? std::string("no candidate path") : tried) +
                      ". Set tracker_options::executable or STEWARD_TRACKER_EXE.";
        return {};
    }

    std::error_code start_daemon_locked() {
        std::error_code ec = io::io_uring_status();  // cached: a probe per process, not per start
        if (ec) {
            check_io_uring(ec, &last_error_);  // the full explanation, for last_error_detail()
            return ec;
        }
        const std::string exe = find_executable_locked(ec);
        if (ec) return ec;
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) {
            ec = errno_code(errno);
            last_error_ = "pipe2: " + ec.message();
            return ec;
        }
        unique_fd read_end(fds[0]);
        unique_fd write_end(fds[1]);
        io::spawn_options opts;
        opts.blocked_signals = {SIGINT, SIGTERM};
        opts.fds.push_back({read_end.get(), daemon_fd});
        io::child_process child = io::spawn(ex_, {exe, "--fd", std::to_string(daemon_fd)}, opts, ec);
        read_end.reset();  // only the daemon may hold the read end, or it never sees end of input
        if (ec) {
            last_error_ = "cannot start " + exe + ": " + ec.message();
            return ec;
        }
        const bool relaunch = state_ == state::dead;
        if (relaunch && !warned_) {
            warned_ = true;
            (void)std::fprintf(stderr,
                               "steward: the tracker daemon is gone (%s); started a new one (pid %d) and "
                               "re-registered %zu names of this process\n",
                               dead_status_.c_str(), static_cast<int>(child.pid()),
                               registered_locked().size());
        }
        if (owns_daemon_ && daemon_.valid()) {
            std::error_code ignore;
            (void)daemon_.try_wait(ignore);  // reap the old one if it has exited
        }
        waiter_.reset();
        waiting_room_ = false;
        skip_sigpipe_guard_ = options_.sigpipe_ignored && tracking::sigpipe_ignored();
        set_write_end_locked(std::move(write_end));
        daemon_ = std::move(child);
        owns_daemon_ = true;
        state_ = state::running;
        last_error_.clear();

        if (!relaunch) return {};  // a first start: the queue holds every message, in order
        // A relaunch: the new daemon first learns every registration of this process; queued bytes
        // are dropped (their effect is in the set), their callers complete after the set is written.
        if (inflight_) {
            inflight_->next = head_;
            head_ = inflight_;
            if (!tail_) tail_ = inflight_;
            inflight_ = nullptr;
        }
        for (batch* b = head_; b; b = b->next) b->size = 0;
        batch* first = nullptr;
        batch* last = nullptr;
        std::array<char, tracking::max_message_size> line;
        const tracking::registry& set = registered_locked();
        set.for_each([&](tracking::registry::handle h) {
            std::size_t n = 0;
            if (tracking::encode_into(true, set.type(h), set.name(h), line.data(), n)) return;
            if (!last || last->size + n > batch_capacity) {
                batch* b = new_batch_locked();
                if (last)
                    last->next = b;
                else
                    first = b;
                last = b;
            }
            std::memcpy(last->bytes.data() + last->size, line.data(), n);
            last->size += n;
        });
        if (first) {
            last->next = head_;
            if (!tail_) tail_ = last;
            head_ = first;
        }
        return {};
    }

    void check_fork_locked() {
        const std::uint64_t gen = io::process_generation();
        if (gen == generation_) return;
        generation_ = gen;
        // A forked child: the daemon is the parent's child (never wait on it or signal it); the
        // parent's registrations are the parent's business; queued messages are the parent's too
        // (it writes them); no thread of the parent exists here to finish a write or a wait.
        if (daemon_.valid()) {
            // Leak the handle rather than touch the parent's process or io_uring from here; its
            // descriptor is closed by the exec or exit of this child.
            (void)new io::child_process(std::move(daemon_));
        }
        if (stopping_.valid()) (void)new io::child_process(std::move(stopping_));
        if (waiter_) {
            // Close this process's copy of the descriptor without going through the parent's ring.
            const int fd = waiter_->native_handle();
            (void)waiter_.release();
            ::close(fd);
        }
        owns_daemon_ = false;
        forget_all_locked();
        if (inflight_) {
            inflight_->next = head_;
            head_ = inflight_;
            if (!tail_) tail_ = inflight_;
            inflight_ = nullptr;
        }
        for (batch* b = head_; b; b = b->next) b->size = 0;
        role_ = false;
        flush_posted_ = false;
        waiting_room_ = false;
        sync_waiting_ = 0;
        yielding_ = 0;
    }

    // ---- stop -------------------------------------------------------------------------------

    void close_for_stop(std::chrono::milliseconds timeout, stop_handler_type handler) {
        std::unique_lock lk(m_);
        if (role_) {
            // A writer is between its write and its bookkeeping: close once it is done.
            lk.unlock();
            asio::post(ex_, [self = shared_from_this(), timeout, h = std::move(handler)]() mutable {
                self->close_for_stop(timeout, std::move(h));
            });
            return;
        }
        check_fork_locked();
        waiter_.reset();
        set_write_end_locked({});
        state_ = state::idle;
        forget_all_locked();
        io::child_process child;
        if (owns_daemon_) child = std::move(daemon_);
        owns_daemon_ = false;
        lk.unlock();
        finish_stop(std::move(child), timeout, std::move(handler));
    }

    struct stop_op {
        stop_op(const asio::any_io_executor& ex, io::child_process c, stop_handler_type h)
            : strand(asio::make_strand(ex)), timer(ex), child(std::move(c)), handler(std::move(h)) {}
        asio::strand<asio::any_io_executor> strand;
        asio::steady_timer timer;
        io::child_process child;
        stop_handler_type handler;
        bool done = false;
    };

    void finish_stop(io::child_process child, std::chrono::milliseconds timeout, stop_handler_type handler) {
        if (!child.valid()) {
            asio::post(ex_, asio::append(std::move(handler), std::error_code{}, std::optional<int>{}));
            return;
        }
        auto op = std::make_shared<stop_op>(ex_, std::move(child), std::move(handler));
        auto self = shared_from_this();
        op->timer.expires_after(timeout);
        op->timer.async_wait(asio::bind_executor(op->strand, [op, self](std::error_code ec) {
            if (ec == asio::error::operation_aborted || op->done) return;
            op->done = true;
            op->child.cancel();
            {
                std::lock_guard lk(self->m_);
                self->stopping_ = std::move(op->child);  // a later async_stop waits again
            }
            auto h = std::move(op->handler);
            asio::post(self->ex_,
                       asio::append(std::move(h), make_error_code(errc::timed_out), std::optional<int>{}));
        }));
        op->child.async_wait(
            asio::bind_executor(op->strand, [op, self](std::error_code ec, io::exit_status st) {
                if (op->done) return;
                op->done = true;
                op->timer.cancel();
                {
                    io::child_process reaped = std::move(op->child);
                }  // its pidfd goes now, not with the timer's handler
                auto h = std::move(op->handler);
                asio::post(self->ex_,
                           asio::append(std::move(h), ec, ec ? std::optional<int>{} : status_code(st)));
            }));
    }

    void post_completion(handler_type handler, std::error_code ec) {
        asio::post(ex_, asio::append(std::move(handler), ec));
    }

    asio::any_io_executor ex_;
    tracker_options options_;

    std::mutex m_;
    std::condition_variable cv_;
    bool role_ = false;
    bool flush_posted_ = false;
    bool waiting_room_ = false;
    std::size_t sync_waiting_ = 0;
    std::size_t yielding_ = 0;  // direct callers between done_yield and end_yield()
    unsigned inline_streak_ = 0;
    bool direct_unsupported_ = false;
    bool skip_sigpipe_guard_ = false;  // tracker_options::sigpipe_ignored, confirmed at start
    std::error_code last_ec_;

    batch* head_ = nullptr;
    batch* tail_ = nullptr;
    batch* inflight_ = nullptr;
    batch* free_ = nullptr;

    state state_ = state::idle;
    unique_fd write_fd_;
    unique_fd direct_fd_;  // see set_write_end_locked()
    std::unique_ptr<asio::posix::stream_descriptor> waiter_;
    io::child_process daemon_;
    io::child_process stopping_;
    bool owns_daemon_ = false;
    bool warned_ = false;
    std::string dead_status_;
    std::string last_error_;
    std::uint64_t generation_ = 0;  // io::process_generation() of the process that owns this state

    std::optional<tracking::registry> registered_;  // optional: registry has no clear()
    tracking::registry_change_log changes_;         // not yet applied to registered_
};

}  // namespace detail

// ---- public wrapper ---------------------------------------------------------------------------

tracker::tracker(executor_type ex, tracker_options options)
    : ex_(ex), impl_(std::make_shared<detail::tracker_impl>(std::move(ex), std::move(options))) {}

tracker::tracker(tracker&&) noexcept = default;
tracker& tracker::operator=(tracker&&) noexcept = default;
tracker::~tracker() = default;

tracker tracker::from_environment(executor_type ex) {
    std::error_code ec;
    tracker t = from_environment(std::move(ex), ec);
    if (ec) throw std::system_error(ec, std::string("tracker::from_environment: ") + environment_variable);
    return t;
}

tracker tracker::from_environment(executor_type ex, std::error_code& ec) {
    ec.clear();
    tracker t(std::move(ex));
    const char* value = std::getenv(environment_variable);
    int fd = -1;
    if (!value || !*value) {
        ec = std::make_error_code(std::errc::invalid_argument);
        return t;
    }
    const char* end = value + std::strlen(value);
    auto [ptr, perr] = std::from_chars(value, end, fd);
    if (perr != std::errc() || ptr != end || fd < 0) {
        ec = std::make_error_code(std::errc::invalid_argument);
        return t;
    }
    const int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0) {
        ec = std::make_error_code(std::errc::bad_file_descriptor);
        return t;
    }
    if (auto pe = io::detail::check_pipe(fd)) {
        ec = pe;
        return t;
    }
    if ((fl & O_ACCMODE) != O_WRONLY) {
        ec = errc::not_a_pipe;
        return t;
    }
    (void)::fcntl(fd, F_SETFD, FD_CLOEXEC);
    ::unsetenv(environment_variable);
    t.impl_->adopt_fd(unique_fd(fd));
    return t;
}

tracker::executor_type tracker::get_executor() const noexcept {
    return impl_->executor();
}

void tracker::initiate_ensure_running(asio::any_completion_handler<void(std::error_code)> handler) {
    impl_->async_barrier(std::move(handler));
}

[[gnu::hot]] void tracker::initiate_message(bool register_it, std::string_view name, resource_type type,
                                            bool direct,
                                            asio::any_completion_handler<void(std::error_code)> handler) {
    impl_->async_message(register_it, name, type, std::move(handler), direct);
}

[[gnu::hot]] tracker::direct_outcome tracker::try_direct(bool register_it, std::string_view name,
                                                         resource_type type, std::error_code& ec) {
    return impl_->try_direct(register_it, name, type, ec);
}

[[gnu::hot]] void tracker::end_yield() {
    impl_->end_yield();
}

void tracker::initiate_stop(std::chrono::milliseconds timeout,
                            asio::any_completion_handler<void(std::error_code, std::optional<int>)> handler) {
    impl_->async_stop(timeout, std::move(handler));
}

namespace {
[[noreturn]] void throw_with_detail(const std::error_code& ec, const char* what, const std::string& detail) {
    std::string msg(what);
    if (!detail.empty()) msg += ": " + detail;
    throw std::system_error(ec, msg);
}
}  // namespace

void tracker::ensure_running(std::error_code& ec) {
    ec = impl_->sync_barrier();
}
void tracker::ensure_running() {
    std::error_code ec;
    ensure_running(ec);
    if (ec) throw_with_detail(ec, "tracker::ensure_running", last_error_detail());
}

[[gnu::hot]] void tracker::register_resource(std::string_view name, resource_type type, std::error_code& ec) {
    ec = impl_->sync_message(true, name, type);
}
[[gnu::hot]] void tracker::register_resource(std::string_view name, resource_type type) {
    std::error_code ec;
    register_resource(name, type, ec);
    if (ec) throw_with_detail(ec, "tracker::register_resource", last_error_detail());
}
[[gnu::hot]] void tracker::unregister_resource(std::string_view name, resource_type type,
                                               std::error_code& ec) {
    ec = impl_->sync_message(false, name, type);
}
[[gnu::hot]] void tracker::unregister_resource(std::string_view name, resource_type type) {
    std::error_code ec;
    unregister_resource(name, type, ec);
    if (ec) throw_with_detail(ec, "tracker::unregister_resource", last_error_detail());
}

int tracker::fd() const noexcept {
    return impl_ ? impl_->fd() : -1;
}
std::string tracker::environment_entry(int child_fd) {
    return std::string(environment_variable) + "=" + std::to_string(child_fd);
}
void tracker::export_environment() {
    ensure_running();
    impl_->export_environment();
}
bool tracker::is_registered(std::string_view name, resource_type type) const {
    return impl_ && impl_->is_registered(name, type);
}
int tracker::daemon_pid() const noexcept {
    return impl_ ? impl_->daemon_pid() : -1;
}
std::string tracker::last_error_detail() const {
    return impl_ ? impl_->last_error_detail() : std::string();
}

}  // namespace steward
