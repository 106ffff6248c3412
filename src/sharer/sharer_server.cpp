#include <steward/io/backend_probe.hpp>
#include <steward/io/process_generation.hpp>
#include <steward/sharer.hpp>

#include <steward/error.hpp>
#include <steward/io_uring_check.hpp>
#include <steward/unique_fd.hpp>

#include "sharer/framing.hpp"
#include "sharer/handshake_driver.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/pickle.hpp"
#include "sharer/quick_connect.hpp"
#include "sharer/sharer_handshake.hpp"
#include "sharer/sharer_wire.hpp"

#include <asio/append.hpp>
#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/dispatch.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <memory>
#include <future>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <variant>

namespace steward::detail {
namespace {

using clock = std::chrono::steady_clock;
using strand_type = asio::strand<asio::any_io_executor>;
using acceptor_type = asio::local::stream_protocol::acceptor;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t max_sun_path = sizeof(sockaddr_un::sun_path) - 1;
// Connections accepted per readiness wake of the listener (see accept_loop).
constexpr std::size_t accept_batch = 256;

struct share_entry {
    std::vector<unique_fd> fds;
    std::optional<clock::time_point> expiry;
    std::optional<pid_t> pid;
};

struct taken_share {
    std::uint64_t request_id = 0;
    share_key key;
    share_entry entry;
};

// Completes @p handler with @p ec through @p ex (the handler's own associated executor is honoured
// by post); without any executor (a sharer that never ran) it is called directly.
void complete_later(const asio::any_io_executor& ex, sharer_stop_handler handler, std::error_code ec) {
    if (ex)
        asio::post(ex, asio::append(std::move(handler), ec));
    else
        std::move(handler)(ec);
}

std::vector<int> raw_fds(const std::vector<unique_fd>& fds) {
    std::vector<int> out;
    out.reserve(fds.size());
    for (const auto& f : fds) out.push_back(f.get());
    return out;
}

}  // namespace

struct sharer_connection {
    explicit sharer_connection(const strand_type& strand) : socket(strand), idle_timer(strand) {}
    local_socket socket;
    asio::steady_timer idle_timer;
    int fd = -1;  // the number, for fork handling (the socket object itself is not touched then)
    std::uint64_t generation = 0;
    pid_t peer_pid = 0;
    clock::time_point last_activity = clock::now();
    clock::time_point accepted_at = clock::now();
    // While in the handshake (not yet authenticated, no quick connect): its place in
    // sharer_impl::handshaking_, the eviction order. Past the handshake it is never evicted.
    bool in_handshake = false;
    std::list<std::shared_ptr<sharer_connection>>::iterator handshake_pos;
    std::deque<taken_share> unconfirmed;  // delivered, not yet confirmed; ordered by request id
    bool idle_closed = false;
    bool idle_armed = false;  // the idle timer runs (it re-arms itself until the connection ends)
};

class sharer_impl : public std::enable_shared_from_this<sharer_impl> {
public:
    sharer_impl(std::optional<asio::any_io_executor> executor, sharer_options options)
        : options_(std::move(options)), key_(options_.key ? *options_.key : authkey::family()) {
        options_.key.reset();  // one copy of the secret is enough
        if (executor) {
            user_executor_ = *executor;
            strand_.emplace(asio::make_strand(*executor));
        }
        fork_registry::add(this);
    }

    ~sharer_impl() {
        fork_registry::remove(this);
        if (!background_thread_) return;
        // Normally join_background() ran already; this covers a sharer whose last reference went
        // away on its own server thread (a handler destroyed it), which cannot join itself.
        work_guard_.reset();
        if (background_thread_id_ == std::this_thread::get_id()) {
            background_thread_->detach();
            // Its objects (and the context, still running this handler) are abandoned.
            (void)background_ctx_.release();
            (void)acceptor_.release();
            (void)sweep_timer_.release();
            forget_handshaking_locked();
            new std::unordered_set<std::shared_ptr<sharer_connection>>(std::move(connections_));
            new std::optional<strand_type>(std::move(strand_));
            return;
        }
        background_ctx_->stop();
        background_thread_->join();
        acceptor_.reset();
        sweep_timer_.reset();
        forget_handshaking_locked();
        connections_.clear();
        strand_.reset();
    }

    // fork() while another thread holds mutex_ would leave it locked forever in the child: every
    // sharer's mutex is taken around fork (pthread_atfork) so the child inherits it unlocked.
    class fork_registry {
    public:
        static void add(sharer_impl* s) {
            instance();
            std::lock_guard lock(mutex());
            set().insert(s);
        }
        static void remove(sharer_impl* s) {
            std::lock_guard lock(mutex());
            set().erase(s);
        }

    private:
        static std::mutex& mutex() {
            static std::mutex m;
            return m;
        }
        static std::unordered_set<sharer_impl*>& set() {
            static auto* s = new std::unordered_set<sharer_impl*>;  // never destroyed: used at exit
            return *s;
        }
        static void prepare() {
            mutex().lock();
            for (auto* s : set()) s->mutex_.lock();
        }
        static void release() {
            for (auto* s : set()) s->mutex_.unlock();
            mutex().unlock();
        }
        static bool instance() {
            static const bool registered = (::pthread_atfork(&prepare, &release, &release), true);
            return registered;
        }
    };

    // ---- public API helpers (any thread) ----

    void start_background() {
        std::lock_guard lock(mutex_);
        check_fork_locked();
        start_background_locked();
    }

    asio::any_io_executor executor() const {
        std::lock_guard lock(mutex_);
        if (!strand_) return {};
        return *strand_;
    }

    share_id share(std::span<const int> fds, const share_options& opts, std::error_code& ec) noexcept {
        ec.clear();
        if (fds.empty()) {
            ec = std::make_error_code(std::errc::invalid_argument);
            return {};
        }
        try {
            // Duplicate first (outside the lock): bad descriptors fail before anything changes.
            share_entry entry;
            entry.fds.reserve(fds.size());
            for (int fd : fds) {
                unique_fd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
                if (!copy) {
                    ec = errno_code(errno);
                    return {};
                }
                entry.fds.push_back(std::move(copy));
            }
            if (opts.ttl) entry.expiry = clock::now() + *opts.ttl;
            entry.pid = opts.allowed_pid;
            const share_key key = share_key::generate();

            std::lock_guard lock(mutex_);
            check_fork_locked();
            if (stopped_) {
                ec = std::make_error_code(std::errc::operation_not_permitted);
                return {};
            }
            if (cache_.size() + in_transfer_.size() >= options_.max_pending_shares) {
                ec = errc::too_many_shares;
                return {};
            }
            if (!strand_) {
                if (user_executor_) {
                    strand_.emplace(asio::make_strand(*user_executor_));
                } else if (background_wanted_) {
                    start_background_locked();
                } else {
                    ec = std::make_error_code(std::errc::operation_not_permitted);
                    return {};
                }
            }
            if (path_.empty()) {
                ec = start_listener_locked();
                if (ec) return {};
            }
            share_id id = share_id::make(path_, key, ec);
            if (ec) return {};
            const auto expiry = entry.expiry;
            cache_.emplace(key, std::move(entry));
            if (expiry) {
                asio::post(*strand_, [self = shared_from_this(), gen = generation_, t = *expiry] {
                    self->arm_sweep(gen, t);
                });
            }
            return id;
        } catch (const std::system_error& e) {
            ec = e.code();
        } catch (const std::bad_alloc&) {
            ec = std::make_error_code(std::errc::not_enough_memory);
        } catch (...) {
            ec = std::make_error_code(std::errc::io_error);
        }
        return {};
    }

    bool revoke(const share_id& id) noexcept {
        std::vector<unique_fd> doomed;
        std::vector<sharer_stop_handler> waiters;
        {
            std::lock_guard lock(mutex_);
            check_fork_locked();
            if (id.address() != path_ || path_.empty()) return false;
            if (auto it = in_transfer_.find(id.key()); it != in_transfer_.end()) {
                it->second = true;  // closed instead of put back if the transfer fails
                return false;
            }
            auto it = cache_.find(id.key());
            if (it == cache_.end()) return false;
            doomed = std::move(it->second.fds);
            cache_.erase(it);
            ++stats_.revoked;
            waiters = take_empty_waiters_locked();
        }
        notify_empty(std::move(waiters), {});
        return true;
    }

    std::size_t pending() noexcept {
        std::vector<sharer_stop_handler> waiters;
        std::size_t n = 0;
        {
            std::lock_guard lock(mutex_);
            check_fork_locked();
            sweep_locked(clock::now());
            n = pending_locked();
            waiters = take_empty_waiters_locked();
        }
        notify_empty(std::move(waiters), {});
        return n;
    }

    sharer_stats stats() noexcept {
        std::lock_guard lock(mutex_);
        check_fork_locked();
        sharer_stats s = stats_;
        s.connections_open = connections_.size();
        s.pending = pending_locked();
        return s;
    }

    std::string address() {
        std::lock_guard lock(mutex_);
        check_fork_locked();
        return path_;
    }

    void wait_empty(sharer_stop_handler handler) {
        std::vector<sharer_stop_handler> ready;
        std::error_code result;
        {
            std::lock_guard lock(mutex_);
            check_fork_locked();
            sweep_locked(clock::now());
            if (stopped_ && pending_locked() != 0) {
                result = asio::error::operation_aborted;
                ready.push_back(std::move(handler));
            } else {
                empty_waiters_.push_back(std::move(handler));
                ready = take_empty_waiters_locked();
            }
        }
        notify_empty(std::move(ready), result);
    }

    void start_stop(clock::duration timeout, sharer_stop_handler handler) {
        std::optional<strand_type> strand;
        {
            std::lock_guard lock(mutex_);
            check_fork_locked();
            strand = strand_;
        }
        if (!strand) {
            // Never started: nothing runs anywhere, clean up here.
            close_everything_now();
            complete_later(user_executor_ ? *user_executor_ : asio::any_io_executor{}, std::move(handler),
                           {});
            return;
        }
        auto self = shared_from_this();
        asio::co_spawn(*strand, stop_coro(self, timeout),
                       [h = std::move(handler), s = *strand](std::exception_ptr) mutable {
                           complete_later(s, std::move(h), {});
                       });
    }

    void stop_blocking(clock::duration timeout) noexcept {
        try {
            bool background = false;
            bool in_server_thread = false;
            {
                std::lock_guard lock(mutex_);
                check_fork_locked();
                background = background_ctx_ != nullptr;
                if (background) {
                    in_server_thread = background_thread_id_ == std::this_thread::get_id();
                } else if (user_executor_) {
                    if (auto* io = user_executor_->target<asio::io_context::executor_type>())
                        in_server_thread = io->running_in_this_thread();
                }
                if (!strand_) {
                    // Never started: nothing runs anywhere.
                    in_server_thread = true;
                }
            }
            if (in_server_thread || !background) {
                // With the application's executor, or on the server's own thread, waiting here could
                // block the very thread that has to do the work: release what can be released now
                // (cache, socket file) and let the executor close its objects when it next runs.
                const bool started = [&] {
                    std::lock_guard lock(mutex_);
                    return strand_.has_value();
                }();
                close_everything_now();
                if (started) start_stop(clock::duration::zero(), [](std::error_code) {});
                return;
            }
            auto done = std::make_shared<std::promise<void>>();
            auto future = done->get_future();
            start_stop(timeout, [done](std::error_code) { done->set_value(); });
            if (future.wait_for(timeout + std::chrono::seconds(2)) != std::future_status::ready)
                close_everything_now();
            join_background();
        } catch (...) {
            close_everything_now();
        }
    }

    // Joins the background thread after everything was stopped; destroys the private io_context
    // (with any coroutine frame left on it) before returning.
    void join_background() {
        std::unique_ptr<asio::io_context> ctx;
        std::unique_ptr<std::thread> thread;
        std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> guard;
        {
            std::lock_guard lock(mutex_);
            ctx = std::move(background_ctx_);
            thread = std::move(background_thread_);
            guard = std::move(work_guard_);
            strand_.reset();
        }
        guard.reset();
        if (ctx) ctx->stop();
        if (thread && thread->joinable()) thread->join();
        // Asio objects that live on the private io_context go before it does.
        std::unique_ptr<acceptor_type> acceptor;
        std::unordered_set<std::shared_ptr<sharer_connection>> conns;
        std::unique_ptr<asio::steady_timer> timer;
        {
            std::lock_guard lock(mutex_);
            acceptor = std::move(acceptor_);
            conns.swap(connections_);
            forget_handshaking_locked();
            timer = std::move(sweep_timer_);
        }
        acceptor.reset();
        conns.clear();
        timer.reset();
        ctx.reset();
    }

    void destroy() noexcept {
        {
            std::lock_guard lock(mutex_);
            check_fork_locked();
        }
        stop_blocking(clock::duration::zero());
    }

private:
    friend void detail::start_sharer_stop(const std::shared_ptr<sharer_impl>&, clock::duration,
                                          sharer_stop_handler);

    // ---- locked helpers ----

    std::size_t pending_locked() const noexcept { return cache_.size() + in_transfer_.size(); }

    std::vector<sharer_stop_handler> take_empty_waiters_locked() {
        if (empty_waiters_.empty() || pending_locked() != 0) return {};
        return std::move(empty_waiters_);
    }

    void notify_empty(std::vector<sharer_stop_handler> waiters, std::error_code ec) {
        if (waiters.empty()) return;
        asio::any_io_executor ex;
        {
            std::lock_guard lock(mutex_);
            if (strand_) ex = *strand_;
        }
        for (auto& h : waiters) complete_later(ex, std::move(h), ec);
    }

    void sweep_locked(clock::time_point now) {
        for (auto it = cache_.begin(); it != cache_.end();) {
            if (it->second.expiry && *it->second.expiry <= now) {
                it = cache_.erase(it);
                ++stats_.expired;
            } else {
                ++it;
            }
        }
    }

    void start_background_locked() {
        if (user_executor_)
            throw std::logic_error("steward::sharer: built with an executor; no background thread");
        background_wanted_ = true;
        if (background_ctx_) return;
        check_io_uring();
        auto ctx = std::make_unique<asio::io_context>(1);
        auto guard =
            std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(ctx->get_executor());
        // All signals blocked in the server thread: they go to the application's threads.
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        std::unique_ptr<std::thread> thread;
        try {
            thread = std::make_unique<std::thread>([c = ctx.get()] {
                for (;;) {
                    try {
                        c->run();
                        return;
                    } catch (...) {
                        // A handler threw (out of memory): keep serving.
                    }
                }
            });
        } catch (...) {
            pthread_sigmask(SIG_SETMASK, &old, nullptr);
            throw;
        }
        pthread_sigmask(SIG_SETMASK, &old, nullptr);
        background_thread_id_ = thread->get_id();
        strand_.emplace(asio::make_strand(asio::any_io_executor(ctx->get_executor())));
        background_ctx_ = std::move(ctx);
        work_guard_ = std::move(guard);
        background_thread_ = std::move(thread);
    }

    std::error_code start_listener_locked() {
        if (auto probe = io::io_uring_status()) return probe;  // cached per process
        std::vector<std::string> bases;
        if (!options_.socket_base_dir.empty()) {
            bases.push_back(options_.socket_base_dir);
        } else {
            if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && xdg[0] == '/') {
                struct stat st {};
                if (::stat(xdg, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == ::geteuid() &&
                    ::access(xdg, W_OK | X_OK) == 0)
                    bases.emplace_back(xdg);
            }
            if (const char* tmp = std::getenv("TMPDIR"); tmp && tmp[0] == '/') bases.emplace_back(tmp);
            bases.emplace_back("/tmp");
        }
        std::error_code last = std::make_error_code(std::errc::filename_too_long);
        for (std::string base : bases) {
            while (base.size() > 1 && base.back() == '/') base.pop_back();
            std::string templ = base + "/steward-XXXXXX";
            if (templ.size() + 2 > max_sun_path) continue;  // "/s" must still fit
            if (!::mkdtemp(templ.data())) {                 // mkdtemp creates the directory 0700
                last = errno_code(errno);
                continue;
            }
            std::string path = templ + "/s";
            unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
            if (!fd) {
                last = errno_code(errno);
                ::rmdir(templ.c_str());
                return last;
            }
            sockaddr_un addr{};
            addr.sun_family = AF_UNIX;
            std::memcpy(addr.sun_path, path.data(), path.size());
            if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0 ||
                ::listen(fd.get(), SOMAXCONN) != 0) {
                last = errno_code(errno);
                ::unlink(path.c_str());
                ::rmdir(templ.c_str());
                continue;
            }
            dir_ = std::move(templ);
            path_ = std::move(path);
            listener_fd_ = fd.get();
            asio::post(*strand_, [self = shared_from_this(), gen = generation_,
                                  f = std::make_shared<unique_fd>(std::move(fd))]() mutable {
                self->start_accepting(gen, std::move(*f));
            });
            return {};
        }
        return last;
    }

    void check_fork_locked() {
        if (io::process_generation() == owner_process_) return;
        forget_locked();
    }

    // In a forked child: forget the parent's shares and listener. Threads did not survive the fork
    // and the io_uring ring (if the background one) is shared memory with the parent, so nothing
    // asio owns is destroyed or touched here: descriptor numbers the parent's objects hold are
    // overwritten with /dev/null (the child's references to the parent's sockets are dropped, the
    // numbers stay occupied so no later close hits a reused number), and those objects are leaked.
    void forget_locked() {
        owner_process_ = io::process_generation();
        ++generation_;
        unique_fd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
        auto neutralise = [&](int fd) {
            if (fd >= 0 && devnull) ::dup3(devnull.get(), fd, O_CLOEXEC);
        };
        neutralise(listener_fd_);
        listener_fd_ = -1;
        for (auto& c : connections_) {
            neutralise(c->fd);
            c->unconfirmed.clear();  // the child's copies of descriptors in transfer
        }
        // The connection objects belong to coroutine frames that never run here; keep them alive.
        forget_handshaking_locked();
        new std::unordered_set<std::shared_ptr<sharer_connection>>(std::move(connections_));
        connections_.clear();
        cache_.clear();
        in_transfer_.clear();
        new std::vector<sharer_stop_handler>(std::move(empty_waiters_));
        empty_waiters_.clear();
        (void)acceptor_.release();
        (void)sweep_timer_.release();
        path_.clear();  // the parent's socket is never unlinked by the child
        dir_.clear();
        sweep_armed_ = false;
        if (background_ctx_) {
            (void)background_ctx_.release();
            (void)background_thread_.release();
            (void)work_guard_.release();
            // Destroying the strand would lock its service's mutex, which a parent thread may
            // have held at the fork.
            new std::optional<strand_type>(std::move(strand_));
            strand_.reset();
        } else if (user_executor_) {
            // The application must call notify_fork() on its io_context; a fresh strand.
            strand_.emplace(asio::make_strand(*user_executor_));
        }
    }

    // Closes what can be closed from any thread: the cache and the socket file. Asio objects are
    // closed on the strand by stop_coro.
    void close_everything_now() {
        std::vector<sharer_stop_handler> waiters;
        std::unordered_map<share_key, share_entry> doomed;
        {
            std::lock_guard lock(mutex_);
            check_fork_locked();
            stopped_ = true;
            doomed.swap(cache_);
            remove_socket_locked();
            waiters = std::move(empty_waiters_);
            empty_waiters_.clear();
        }
        notify_empty(std::move(waiters), asio::error::operation_aborted);
    }

    void remove_socket_locked() {
        if (!path_.empty()) ::unlink(path_.c_str());
        if (!dir_.empty()) ::rmdir(dir_.c_str());
        dir_.clear();
        // path_ stays: share ids handed out keep naming this (now stopped) sharer for revoke().
    }

    // ---- strand side ----

    void start_accepting(std::uint64_t gen, unique_fd fd) {
        std::lock_guard lock(mutex_);
        if (gen != generation_ || stopped_) return;  // fd closes
        auto acceptor = std::make_unique<acceptor_type>(*strand_);
        std::error_code ec;
        acceptor->assign(asio::local::stream_protocol(), fd.get(), ec);
        if (ec) return;
        (void)fd.release();
        acceptor_ = std::move(acceptor);
        asio::co_spawn(*strand_, accept_loop(shared_from_this(), acceptor_.get(), gen), asio::detached);
    }

    static asio::awaitable<void> accept_loop(std::shared_ptr<sharer_impl> self, acceptor_type* acceptor,
                                             std::uint64_t gen) {
        for (;;) {
            auto [ec] = co_await acceptor->async_wait(asio::socket_base::wait_read, use_tuple);
            if (ec) co_return;
            // The listener is blocking (no O_NONBLOCK on sockets io_uring serves): accept only
            // what readiness says is there (the wait just did; poll for any further ones). At
            // most accept_batch per wake: under a flood the backlog refills as fast as it drains,
            // and the established connections' completions queued meanwhile get their turn.
            for (std::size_t n = 0; n < accept_batch; ++n) {
                pollfd p{acceptor->native_handle(), POLLIN, 0};
                if (n > 0 && (::poll(&p, 1, 0) != 1 || !(p.revents & POLLIN))) break;
                unique_fd fd(::accept4(acceptor->native_handle(), nullptr, nullptr, SOCK_CLOEXEC));
                if (!fd) {
                    if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN) continue;
                    // EMFILE and friends: back off instead of spinning on a readable listener.
                    const asio::any_io_executor ex = co_await asio::this_coro::executor;
                    asio::steady_timer t(ex, std::chrono::milliseconds(50));
                    co_await t.async_wait(use_tuple);
                    break;
                }
                std::shared_ptr<sharer_connection> conn;
                {
                    std::lock_guard lock(self->mutex_);
                    if (gen != self->generation_ || self->stopped_) co_return;
                    ++self->stats_.connections_accepted;
                    if (self->connections_.size() >= self->options_.max_connections &&
                        !self->evict_stalled_handshake_locked()) {
                        ++self->stats_.limit_violations;
                        // Say why before closing: a steward client reports limit_exceeded, not a
                        // key or uid problem (a CPython client fails on it as on a close).
                        send_refusal(fd.get(), native::error_code_value::limit_exceeded,
                                     "too many connections");
                        continue;  // fd closes
                    }
                    conn = std::make_shared<sharer_connection>(*self->strand_);
                    conn->generation = gen;
                    conn->fd = fd.get();
                    std::error_code aec;
                    conn->socket.assign(asio::local::stream_protocol(), fd.get(), aec);
                    if (aec) continue;
                    (void)fd.release();
                    self->connections_.insert(conn);
                    conn->handshake_pos = self->handshaking_.insert(self->handshaking_.end(), conn);
                    conn->in_handshake = true;
                }
                asio::co_spawn(*self->strand_, run_connection(self, conn), asio::detached);
            }
        }
    }

    // At max_connections: the connection that has been in its handshake longest is shut down to
    // make room, if it has been there for a tenth of handshake_timeout (an honest handshake takes
    // one to four round trips). Connections that never authenticate then cannot keep new ones
    // out until their deadline; authenticated connections are never evicted. handshaking_ is in
    // accept order, so the candidate is its front: O(1) per accept. Runs on the strand (as every
    // connection's coroutine), with mutex_ held; the victim's coroutine sees EOF and removes it
    // from connections_, so that set may hold a few more than the limit meanwhile.
    bool evict_stalled_handshake_locked() {
        if (handshaking_.empty()) return false;
        const std::shared_ptr<sharer_connection> victim = handshaking_.front();
        if (victim->accepted_at > clock::now() - options_.handshake_timeout / 10) return false;
        end_handshake_locked(*victim);
        ::shutdown(victim->fd, SHUT_RDWR);
        ++stats_.handshakes_evicted;
        return true;
    }

    // The connection leaves the eviction order: authenticated, evicted, or gone.
    void end_handshake_locked(sharer_connection& conn) {
        if (!conn.in_handshake) return;
        conn.in_handshake = false;
        handshaking_.erase(conn.handshake_pos);
    }

    void end_handshake(sharer_connection& conn) {
        std::lock_guard lock(mutex_);
        end_handshake_locked(conn);
    }

    // With connections_ handed away or cleared (stop, fork, destruction): none is in the
    // eviction order any more.
    void forget_handshaking_locked() {
        for (const auto& c : handshaking_) c->in_handshake = false;
        handshaking_.clear();
    }

    std::optional<share_entry> take(share_key key, pid_t peer, std::uint64_t gen) {
        std::vector<sharer_stop_handler> waiters;
        std::optional<share_entry> out;
        {
            std::lock_guard lock(mutex_);
            ++stats_.requests;
            if (gen != generation_) return std::nullopt;
            auto it = cache_.find(key);
            if (it != cache_.end() && it->second.expiry && *it->second.expiry <= clock::now()) {
                cache_.erase(it);
                ++stats_.expired;
                waiters = take_empty_waiters_locked();
                it = cache_.end();
            }
            if (it == cache_.end() || (it->second.pid && *it->second.pid != peer)) {
                ++stats_.refused_requests;
            } else {
                out.emplace(std::move(it->second));
                cache_.erase(it);
                in_transfer_.emplace(key, false);
            }
        }
        notify_empty(std::move(waiters), {});
        return out;
    }

    void put_back(taken_share t, std::uint64_t gen) {
        std::vector<sharer_stop_handler> waiters;
        {
            std::lock_guard lock(mutex_);
            if (gen != generation_) return;
            bool revoked = false;
            if (auto it = in_transfer_.find(t.key); it != in_transfer_.end()) {
                revoked = it->second;
                in_transfer_.erase(it);
            }
            ++stats_.returned;
            if (!revoked && !stopped_) {
                cache_.emplace(t.key, std::move(t.entry));
            } else if (revoked) {
                ++stats_.revoked;
            }
            waiters = take_empty_waiters_locked();
        }
        notify_empty(std::move(waiters), {});
    }

    void delivered(taken_share& t, std::uint64_t gen) {
        std::vector<sharer_stop_handler> waiters;
        {
            std::lock_guard lock(mutex_);
            if (gen != generation_) return;
            in_transfer_.erase(t.key);
            ++stats_.delivered;
            waiters = take_empty_waiters_locked();
        }
        t.entry.fds.clear();
        notify_empty(std::move(waiters), {});
    }

    // Confirms the first @p n unconfirmed deliveries of @p conn.
    void delivered_prefix(sharer_connection& conn, std::size_t n) {
        std::vector<sharer_stop_handler> waiters;
        {
            std::lock_guard lock(mutex_);
            if (conn.generation == generation_) {
                for (std::size_t i = 0; i < n; ++i) in_transfer_.erase(conn.unconfirmed[i].key);
                stats_.delivered += n;
                waiters = take_empty_waiters_locked();
            }
        }
        conn.unconfirmed.erase(conn.unconfirmed.begin(),
                               conn.unconfirmed.begin() + static_cast<std::ptrdiff_t>(n));
        notify_empty(std::move(waiters), {});
    }

    void count(std::uint64_t sharer_stats::*field) {
        std::lock_guard lock(mutex_);
        ++(stats_.*field);
    }

    void arm_sweep(std::uint64_t gen, clock::time_point when) {
        std::lock_guard lock(mutex_);
        if (gen != generation_ || stopped_ || !strand_) return;
        if (!sweep_timer_) sweep_timer_ = std::make_unique<asio::steady_timer>(*strand_);
        if (sweep_armed_ && sweep_at_ <= when) return;
        sweep_armed_ = true;
        sweep_at_ = when;
        sweep_timer_->expires_at(when);
        sweep_timer_->async_wait([self = shared_from_this(), gen](std::error_code ec) {
            if (ec) return;  // re-armed earlier or stopped
            std::vector<sharer_stop_handler> waiters;
            std::optional<clock::time_point> next;
            {
                std::lock_guard relock(self->mutex_);
                if (gen != self->generation_) return;
                self->sweep_armed_ = false;
                self->sweep_locked(clock::now());
                for (auto& [k, e] : self->cache_)
                    if (e.expiry && (!next || *e.expiry < *next)) next = e.expiry;
                waiters = self->take_empty_waiters_locked();
            }
            self->notify_empty(std::move(waiters), {});
            if (next) self->arm_sweep(gen, *next);
        });
    }

    // Closes a connection after idle_timeout without traffic and with nothing unconfirmed.
    static void arm_idle(const std::shared_ptr<sharer_impl>& self,
                         const std::shared_ptr<sharer_connection>& conn) {
        conn->idle_armed = true;
        // A connection holding unconfirmed deliveries is not idle: look again a full period later
        // (not at a deadline that may already have passed).
        const auto at = conn->unconfirmed.empty()
                            ? conn->last_activity + self->options_.idle_timeout
                            : std::max(conn->last_activity, clock::now()) + self->options_.idle_timeout;
        conn->idle_timer.expires_at(at);
        conn->idle_timer.async_wait([self, conn](std::error_code ec) {
            if (ec || !conn->socket.is_open()) return;
            if (conn->unconfirmed.empty() &&
                clock::now() >= conn->last_activity + self->options_.idle_timeout) {
                conn->idle_closed = true;
                self->count(&sharer_stats::idle_timeouts);
                std::error_code ignored;
                conn->socket.cancel(ignored);
                ::shutdown(conn->socket.native_handle(), SHUT_RDWR);
                return;
            }
            arm_idle(self, conn);
        });
    }

    static asio::awaitable<void> run_connection(std::shared_ptr<sharer_impl> self,
                                                std::shared_ptr<sharer_connection> conn) {
        try {
            co_await serve_connection(self, conn);
        } catch (...) {
            // Out of memory in one connection ends that connection only.
        }
        conn->idle_timer.cancel();
        std::error_code ignored;
        // Whatever was sent but not confirmed goes back (docs/protocol.md 5.3).
        while (!conn->unconfirmed.empty()) {
            taken_share t = std::move(conn->unconfirmed.front());
            conn->unconfirmed.pop_front();
            self->put_back(std::move(t), conn->generation);
        }
        {
            std::lock_guard lock(self->mutex_);
            if (conn->generation != self->generation_) co_return;  // forked child: leave it alone
            self->end_handshake_locked(*conn);
            self->connections_.erase(conn);
        }
        conn->socket.close(ignored);
    }

    // One ERROR frame written without waiting (it fits any empty socket buffer), before a close.
    // What the client already wrote (a QUICK) is read first: closing with unread bytes would
    // reset the connection, and the client could lose the ERROR.
    static void send_refusal(int fd, native::error_code_value code, const char* text) noexcept {
        std::array<std::byte, 512> sink{};
        for (int i = 0; i < 4 && ::recv(fd, sink.data(), sink.size(), MSG_DONTWAIT) > 0; ++i) {
        }
        try {
            std::vector<std::byte> out;
            native::append_frame(out, native::error{code, text});
            (void)wire::send_with_fds(fd, out, {});
        } catch (...) {
            // Out of memory: the close alone still refuses.
        }
    }

    // After a refusal: no more writes, and whatever the peer still sends is read and dropped until
    // it closes (bounded by the handshake deadline). Closing with unread bytes would reset the
    // connection, and the peer might never see the ERROR.
    static asio::awaitable<void> linger_until_eof(const std::shared_ptr<sharer_impl>& self,
                                                  const std::shared_ptr<sharer_connection>& conn) {
        ::shutdown(conn->fd, SHUT_WR);
        fast_handshake::socket_deadline deadline(conn->socket, self->options_.handshake_timeout, conn);
        std::array<std::byte, 512> sink{};
        for (;;) {
            const ssize_t n = ::recv(conn->fd, sink.data(), sink.size(), MSG_DONTWAIT);
            if (n > 0) continue;
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) co_return;
            if (errno == EINTR) continue;
            deadline.arm();
            auto [ec] = co_await conn->socket.async_wait(asio::socket_base::wait_read, use_tuple);
            if (ec == asio::error::operation_aborted || deadline.expired()) co_return;
        }
    }

    static void count_handshake_error(const std::shared_ptr<sharer_impl>& self, std::error_code ec) {
        if (ec == errc::timed_out)
            self->count(&sharer_stats::handshake_timeouts);
        else if (ec == errc::limit_exceeded)
            self->count(&sharer_stats::limit_violations);
        else if (ec == errc::authentication_failed || ec == errc::malformed_message)
            self->count(&sharer_stats::refused_auth);
    }

    static asio::awaitable<void> serve_connection(const std::shared_ptr<sharer_impl>& self,
                                                  const std::shared_ptr<sharer_connection>& conn) {
        // 1. The peer's credentials, from the kernel.
        ucred cred{};
        socklen_t len = sizeof cred;
        if (::getsockopt(conn->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) co_return;
        if (cred.uid != ::geteuid() &&
            std::find(self->options_.allowed_uids.begin(), self->options_.allowed_uids.end(), cred.uid) ==
                self->options_.allowed_uids.end()) {
            self->count(&sharer_stats::refused_peer);
            send_refusal(conn->fd, native::error_code_value::authentication_failed, "peer uid not allowed");
            co_await linger_until_eof(self, conn);
            co_return;
        }
        conn->peer_pid = cred.pid;

        // 2. A quick-connect client writes its QUICK right after connect, without waiting for a
        // challenge: if bytes are already here, they must be that frame and no challenge is sent.
        // Otherwise the CPython challenge goes out and the first frame answers it (or is a QUICK
        // that lost the race with the challenge: the client skips one leading challenge).
        connection_reader reader(self->options_.max_frame_size);
        fast_handshake::socket_deadline deadline(conn->socket, self->options_.handshake_timeout, conn);
        std::span<const std::byte> first;
        std::error_code ec = reader.try_receive(conn->socket);
        if (!ec) {
            if (!reader.has_whole_frame()) deadline.arm();
            ec = deadline.translate(co_await reader.next_frame(conn->socket, first));
            if (!ec && !quick::is_request(first)) ec = errc::authentication_failed;  // no challenge was sent
            if (ec) {
                count_handshake_error(self, ec);
                co_return;
            }
            deadline.disarm();
            self->end_handshake(*conn);
            co_await serve_quick(self, conn, reader, first);
            co_return;
        }
        if (ec != std::errc::resource_unavailable_try_again) co_return;  // EOF or reset before anything

        deadline.arm();
        auth::handshake hs(auth::handshake::role::server, self->key_);
        std::vector<std::byte> response;
        if (auto challenge = hs.start()) ec = co_await fast_handshake::write_frame(conn->socket, *challenge);
        // Exactly one frame (a handshake frame is at most 256 bytes, and a QUICK fits): nothing
        // that follows is consumed here.
        if (!ec) ec = co_await fast_handshake::read_frame(conn->socket, response);
        if (!ec && quick::is_request(response)) {
            deadline.disarm();
            self->end_handshake(*conn);
            co_await serve_quick(self, conn, reader, response);
            co_return;
        }
        if (!ec) ec = co_await fast_handshake::drive(conn->socket, hs, std::span<const std::byte>(response));
        ec = deadline.translate(ec);
        if (ec) {
            count_handshake_error(self, ec);
            co_return;
        }
        deadline.disarm();
        self->end_handshake(*conn);
        conn->last_activity = clock::now();
        arm_idle(self, conn);

        // 3. The first frame picks the protocol.
        ec = co_await reader.next_frame(conn->socket, first);
        if (ec) {
            note_read_error(self, ec);
            co_return;
        }
        conn->last_activity = clock::now();
        switch (native::classify_first_frame(first)) {
            case native::first_frame_kind::cpython_pickle:
                co_await serve_cpython(self, conn, first);
                co_return;
            case native::first_frame_kind::native_hello:
                co_await serve_hello(self, conn, reader, first);
                co_return;
            case native::first_frame_kind::native_quick:  // only valid instead of the handshake
            case native::first_frame_kind::unknown:
                self->count(&sharer_stats::protocol_errors);
                co_return;
        }
    }

    static void note_read_error(const std::shared_ptr<sharer_impl>& self, std::error_code ec) {
        if (ec == errc::limit_exceeded)
            self->count(&sharer_stats::limit_violations);
        else if (ec == errc::malformed_message)
            self->count(&sharer_stats::protocol_errors);
    }

    // Buffered frame reader: one recv takes as many pipelined frames as are queued, and a frame
    // above the limit is refused from its header, before any allocation for it.
    class connection_reader {
    public:
        explicit connection_reader(std::uint64_t max_payload)
            : max_payload_(max_payload), buffer_(std::min<std::uint64_t>(max_payload + 64, initial_size)) {}

        // One recv(MSG_DONTWAIT): success if bytes arrived, resource_unavailable_try_again if none
        // were there, eof, or the socket's error.
        std::error_code try_receive(local_socket& socket) {
            for (;;) {
                const ssize_t n = ::recv(socket.native_handle(), buffer_.data() + end_, buffer_.size() - end_,
                                         MSG_DONTWAIT);
                if (n > 0) {
                    filled_ = end_ + static_cast<std::size_t>(n) == buffer_.size();
                    end_ += static_cast<std::size_t>(n);
                    return {};
                }
                if (n == 0) return make_error_code(asio::error::eof);
                if (errno == EINTR) continue;
                if (errno == EWOULDBLOCK)
                    return std::make_error_code(std::errc::resource_unavailable_try_again);
                return errno_code(errno);
            }
        }

        // The next frame already buffered, without reading: true and @p payload set (valid until
        // the next call), false when more bytes are needed or @p ec is set (limit, malformed).
        bool pop_frame(std::span<const std::byte>& payload, std::error_code& ec) {
            const auto have = std::span<const std::byte>(buffer_).subspan(begin_, end_ - begin_);
            const framing::frame_probe probe = framing::probe_frame(have, max_payload_);
            if (probe.status == framing::frame_status::too_large) {
                ec = make_error_code(errc::limit_exceeded);
                return false;
            }
            if (probe.status == framing::frame_status::malformed) {
                ec = make_error_code(errc::malformed_message);
                return false;
            }
            if (probe.status != framing::frame_status::frame) return false;
            payload = have.subspan(probe.header_size, static_cast<std::size_t>(probe.payload_size));
            begin_ += static_cast<std::size_t>(probe.total_size());
            return true;
        }

        [[nodiscard]] bool has_whole_frame() const noexcept {
            const auto have = std::span<const std::byte>(buffer_).subspan(begin_, end_ - begin_);
            return framing::probe_frame(have, max_payload_).status != framing::frame_status::need_more;
        }

        // The next frame's payload (valid until the next call), or an error (eof, limit_exceeded,
        // malformed_message, socket errors). @p before_wait runs each time the socket has nothing
        // and the reader is about to wait for it.
        template <typename BeforeWait>
        asio::awaitable<std::error_code> next_frame(local_socket& socket, std::span<const std::byte>& payload,
                                                    BeforeWait before_wait) {
            for (;;) {
                std::error_code ec;
                if (pop_frame(payload, ec)) co_return std::error_code{};
                if (ec) co_return ec;
                make_room();
                ec = try_receive(socket);
                if (!ec) continue;
                if (ec != std::errc::resource_unavailable_try_again) co_return ec;
                before_wait();
                auto [wec] = co_await socket.async_wait(asio::socket_base::wait_read, use_tuple);
                if (wec) co_return wec;
            }
        }

        asio::awaitable<std::error_code> next_frame(local_socket& socket,
                                                    std::span<const std::byte>& payload) {
            co_return co_await next_frame(socket, payload, [] {});
        }

        [[nodiscard]] bool has_buffered() const noexcept { return begin_ != end_; }

    public:
        // Frames never exceed the buffer (limit + header): move the partial frame to the front
        // when it would not fit, grow only up to the limit.
        void make_room() {
            const auto have = std::span<const std::byte>(buffer_).subspan(begin_, end_ - begin_);
            const framing::frame_probe probe = framing::probe_frame(have, max_payload_);
            if (begin_ == end_) {
                begin_ = end_ = 0;
                // A read that filled the buffer: the peer pipelines, take bigger bites.
                if (filled_ && buffer_.size() < grown_size) buffer_.resize(grown_size);
                filled_ = false;
            } else if ((probe.header_size != 0 && begin_ + probe.total_size() > buffer_.size()) ||
                       end_ == buffer_.size()) {
                std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
                end_ -= begin_;
                begin_ = 0;
            }
            if (probe.header_size != 0 && probe.total_size() > buffer_.size())
                buffer_.resize(static_cast<std::size_t>(probe.total_size()));  // within max_payload
        }

    private:
        // Small at first (a connection per fetch reads ~100 bytes), larger once a read fills it.
        static constexpr std::size_t initial_size = 4096;
        static constexpr std::size_t grown_size = 64 * 1024;

        std::uint64_t max_payload_;
        std::vector<std::byte> buffer_;
        std::size_t begin_ = 0;
        std::size_t end_ = 0;
        bool filled_ = false;
    };

    // Sends all of @p data, the descriptors riding on its first byte.
    static asio::awaitable<int> send_fully(local_socket& socket, std::span<const std::byte> data,
                                           std::span<const int> fds) {
        std::size_t sent = 0;
        while (sent < data.size()) {
            const wire::attempt r = wire::send_with_fds(socket.native_handle(), data.subspan(sent),
                                                        sent == 0 ? fds : std::span<const int>{});
            if (r.err == EAGAIN) {
                auto [ec] = co_await socket.async_wait(asio::socket_base::wait_write, use_tuple);
                if (ec) co_return ECONNRESET;
                continue;
            }
            if (r.err) co_return r.err;
            sent += r.bytes;
        }
        co_return 0;
    }

    static asio::awaitable<void> serve_cpython(const std::shared_ptr<sharer_impl>& self,
                                               const std::shared_ptr<sharer_connection>& conn,
                                               std::span<const std::byte> payload) {
        std::error_code ec;
        const pickle::decoded request = pickle::decode(payload, ec);
        if (ec) {
            self->count(&sharer_stats::protocol_errors);
            co_return;
        }
        if (request.kind == pickle::value_kind::none) co_return;  // CPython's stop() wake-up
        // The pid in the pickle is only a claim; SO_PEERCRED is the kernel's word.
        std::optional<share_entry> entry = self->take(request.request.key, conn->peer_pid, conn->generation);
        if (!entry) co_return;  // as CPython's server after its KeyError: close, no reply
        taken_share t{0, request.request.key, std::move(*entry)};
        if (t.entry.fds.size() > native::max_fds_per_part) {
            // One CPython reply is one sendmsg; such a share can only go out natively.
            self->put_back(std::move(t), conn->generation);
            co_return;
        }
        const std::vector<int> fds = raw_fds(t.entry.fds);
        const std::byte count{static_cast<unsigned char>(fds.size() % 256)};
        const int err = co_await send_fully(conn->socket, std::span(&count, 1), fds);
        if (err) {
            self->put_back(std::move(t), conn->generation);
            co_return;
        }
        conn->unconfirmed.push_back(std::move(t));
        // CPython 3.14+ clients answer `A`; older ones close. A reset means the peer died with the
        // descriptors unread in its queue: they never arrived, the share goes back.
        std::byte ack{};
        auto [rec, n] = co_await read_one(conn->socket, ack);
        (void)n;
        if (rec == asio::error::connection_reset || rec == std::errc::connection_reset)
            co_return;                             // put back
        if (conn->unconfirmed.empty()) co_return;  // stop() closed it meanwhile
        taken_share done = std::move(conn->unconfirmed.front());
        conn->unconfirmed.pop_front();
        self->delivered(done, conn->generation);
    }

    static asio::awaitable<std::tuple<std::error_code, std::size_t>> read_one(local_socket& socket,
                                                                              std::byte& b) {
        for (;;) {
            const ssize_t n = ::recv(socket.native_handle(), &b, 1, MSG_DONTWAIT);
            if (n >= 0) co_return std::tuple{std::error_code{}, static_cast<std::size_t>(n)};
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                co_return std::tuple{errno_code(errno), std::size_t{0}};
            auto [ec] = co_await socket.async_wait(asio::socket_base::wait_read, use_tuple);
            if (ec) co_return std::tuple{ec, std::size_t{0}};
        }
    }

    static asio::awaitable<void> send_error(local_socket& socket, native::error_code_value code,
                                            const char* text) {
        std::vector<std::byte> out;
        native::append_frame(out, native::error{code, text});
        (void)co_await send_fully(socket, out, {});
    }

    // The replies of one pass over the requests read so far, as packets: a packet is one sendmsg
    // of whole frames plus one SCM_RIGHTS batch. Version 2 puts every single-part reply of the
    // pass into as few packets as the 253-descriptor limit allows (docs/protocol.md, coalesced
    // replies); version 1 sends each part that carries descriptors alone.
    class reply_writer {
    public:
        explicit reply_writer(bool coalesce) : coalesce_(coalesce) { bytes_.reserve(256); }
        [[nodiscard]] bool coalesce() const noexcept { return coalesce_; }
        [[nodiscard]] bool empty() const noexcept { return bytes_.empty(); }
        [[nodiscard]] bool has_fds() const noexcept { return !fds_.empty(); }
        [[nodiscard]] bool fits(std::size_t n) const noexcept {
            return fds_.size() + n <= native::max_fds_per_part;
        }
        std::vector<std::byte>& bytes() noexcept { return bytes_; }

        void add_failure(std::uint64_t id, native::reply_status status) {
            const std::size_t at = bytes_.size();
            bytes_.resize(at + wire::reply_frame_size);
            wire::put_reply(bytes_.data() + at, native::failure_reply(id, status));
        }
        // A whole single-part reply (1..253 descriptors); the caller checked fits().
        void add_single(std::uint64_t id, const std::vector<unique_fd>& fds) {
            native::reply part;
            part.request_id = id;
            part.part_fds = static_cast<std::uint16_t>(fds.size());
            part.total_fds = static_cast<std::uint32_t>(fds.size());
            const std::size_t at = bytes_.size();
            bytes_.resize(at + wire::reply_frame_size);
            wire::put_reply(bytes_.data() + at, part);
            for (const auto& f : fds) fds_.push_back(f.get());
            replies_.push_back(at);
        }
        void clear() noexcept {
            bytes_.clear();
            fds_.clear();
            replies_.clear();
        }
        [[nodiscard]] std::span<const int> fds() const noexcept { return fds_; }
        // Requests answered server_error after ETOOMANYREFS, whose shares go back to the cache.
        std::vector<std::uint64_t>& returned() noexcept { return returned_; }
        // Offsets of the REPLY frames that carry descriptors.
        [[nodiscard]] const std::vector<std::size_t>& replies() const noexcept { return replies_; }
        void drop_fds() noexcept {
            fds_.clear();
            replies_.clear();
        }

    private:
        bool coalesce_;
        std::vector<std::byte> bytes_;
        std::vector<int> fds_;
        std::vector<std::size_t> replies_;
        std::vector<std::uint64_t> returned_;
    };

    // Sends the packet. ETOOMANYREFS (the kernel refused the descriptors, nothing went out): every
    // reply in it becomes server_error and its share goes back; the rest of the packet is sent.
    // Returns false when the connection is unusable.
    static asio::awaitable<bool> flush(const std::shared_ptr<sharer_connection>& conn, reply_writer& w) {
        if (w.empty()) co_return true;
        int err = co_await send_fully(conn->socket, w.bytes(), w.fds());
        if (err == ETOOMANYREFS && w.has_fds()) {
            for (std::size_t at : w.replies()) {
                const auto id = wire::get_be<std::uint64_t>(w.bytes().data() + at + 5);
                w.returned().push_back(id);  // put back once the pass is written (see serve_pass)
                wire::put_reply(w.bytes().data() + at,
                                native::failure_reply(id, native::reply_status::server_error));
            }
            w.drop_fds();
            err = co_await send_fully(conn->socket, w.bytes(), {});
        }
        w.clear();
        co_return err == 0;
    }

    struct fetch_outcome {
        native::reply_status status = native::reply_status::ok;
        share_entry entry;
    };

    // Takes the shares of one pass under one lock. A connection may hold at most @p room more
    // delivered but unconfirmed requests: requests beyond it are answered busy.
    void take_batch(std::span<const native::fetch> fetches, pid_t peer, std::uint64_t gen, std::size_t room,
                    std::vector<fetch_outcome>& out) {
        out.clear();
        out.resize(fetches.size());
        std::vector<sharer_stop_handler> waiters;
        {
            std::lock_guard lock(mutex_);
            const bool current = gen == generation_;
            const auto now = clock::now();
            for (std::size_t i = 0; i < fetches.size(); ++i) {
                fetch_outcome& o = out[i];
                if (room == 0) {
                    o.status = native::reply_status::busy;
                    continue;
                }
                ++stats_.requests;
                auto it = current ? cache_.find(fetches[i].key) : cache_.end();
                if (it != cache_.end() && it->second.expiry && *it->second.expiry <= now) {
                    cache_.erase(it);
                    ++stats_.expired;
                    it = cache_.end();
                }
                if (it == cache_.end() || (it->second.pid && *it->second.pid != peer)) {
                    ++stats_.refused_requests;
                    o.status = native::reply_status::not_available;
                    continue;
                }
                o.entry = std::move(it->second);
                cache_.erase(it);
                in_transfer_.emplace(fetches[i].key, false);
                --room;
            }
            waiters = take_empty_waiters_locked();
        }
        notify_empty(std::move(waiters), {});
    }

    // Serves the fetches of one pass and writes every reply of it. False: connection finished.
    static asio::awaitable<bool> serve_pass(const std::shared_ptr<sharer_impl>& self,
                                            const std::shared_ptr<sharer_connection>& conn, reply_writer& w,
                                            std::vector<native::fetch>& fetches,
                                            std::vector<fetch_outcome>& outcomes) {
        if (!fetches.empty()) {
            const std::size_t max_unconfirmed = std::size_t{self->options_.max_in_flight} * 4;
            const std::size_t room =
                conn->unconfirmed.size() >= max_unconfirmed ? 0 : max_unconfirmed - conn->unconfirmed.size();
            self->take_batch(fetches, conn->peer_pid, conn->generation, room, outcomes);
            // Every share taken goes into `unconfirmed` before anything is written: a write that
            // fails ends the connection, and its cleanup puts back exactly what is there.
            const std::size_t first = conn->unconfirmed.size();
            for (std::size_t i = 0; i < fetches.size(); ++i) {
                if (outcomes[i].status == native::reply_status::ok)
                    conn->unconfirmed.push_back(
                        taken_share{fetches[i].request_id, fetches[i].key, std::move(outcomes[i].entry)});
            }
            std::size_t next = first;
            for (std::size_t i = 0; i < fetches.size(); ++i) {
                const std::uint64_t id = fetches[i].request_id;
                if (outcomes[i].status != native::reply_status::ok) {
                    w.add_failure(id, outcomes[i].status);
                    continue;
                }
                const std::size_t at = next++;
                const std::size_t total = conn->unconfirmed[at].entry.fds.size();
                if (total <= native::max_fds_per_part) {
                    // Version 1: the part alone in its sendmsg; version 2: with the others.
                    if (!w.coalesce() ? !w.empty() : !w.fits(total)) {
                        if (!co_await flush(conn, w)) co_return false;
                    }
                    w.add_single(id, conn->unconfirmed[at].entry.fds);
                    if (!w.coalesce() && !co_await flush(conn, w)) co_return false;
                    continue;
                }
                // More than one part: each part alone, back to back.
                if (!co_await flush(conn, w)) co_return false;
                if (!co_await send_multipart(conn, w, id)) co_return false;
            }
            fetches.clear();
        }
        const bool ok = co_await flush(conn, w);
        // Shares the kernel refused to pass go back now that no index into `unconfirmed` is held.
        // (On failure the connection's cleanup puts back everything unconfirmed anyway.)
        if (ok) {
            for (std::uint64_t id : w.returned()) {
                const auto it = find_unconfirmed(*conn, id);
                if (it == conn->unconfirmed.end()) continue;
                taken_share back = std::move(*it);
                conn->unconfirmed.erase(it);
                self->put_back(std::move(back), conn->generation);
            }
        }
        w.returned().clear();
        co_return ok;
    }

    static std::deque<taken_share>::iterator find_unconfirmed(sharer_connection& conn, std::uint64_t id) {
        return std::find_if(conn.unconfirmed.begin(), conn.unconfirmed.end(),
                            [id](const taken_share& t) { return t.request_id == id; });
    }

    // The reply to request @p id (in conn->unconfirmed), more than 253 descriptors: one sendmsg
    // per part.
    static asio::awaitable<bool> send_multipart(const std::shared_ptr<sharer_connection>& conn,
                                                reply_writer& w, std::uint64_t id) {
        const taken_share& t = *find_unconfirmed(*conn, id);
        const auto total = static_cast<std::uint32_t>(t.entry.fds.size());
        const std::uint32_t parts = native::part_count_for(total);
        std::vector<int> fd_numbers;
        fd_numbers.reserve(native::max_fds_per_part);
        for (std::uint32_t i = 0; i < parts; ++i) {
            native::reply part;
            part.request_id = id;
            part.status = native::reply_status::ok;
            part.part_fds = native::part_fds_for(total, i);
            part.total_fds = total;
            part.part_index = i;
            part.part_count = parts;
            std::array<std::byte, wire::reply_frame_size> frame{};
            wire::put_reply(frame.data(), part);
            fd_numbers.clear();
            for (std::size_t k = 0; k < part.part_fds; ++k)
                fd_numbers.push_back(t.entry.fds[std::size_t{i} * native::max_fds_per_part + k].get());
            const int err = co_await send_fully(conn->socket, frame, fd_numbers);
            if (err == ETOOMANYREFS && i == 0) {
                // Nothing went out: keep the share, tell the client.
                w.returned().push_back(id);
                w.add_failure(id, native::reply_status::server_error);
                co_return true;
            }
            if (err) co_return false;  // mid-reply: the connection is unusable; cleanup puts it back
        }
        co_return true;
    }

    static asio::awaitable<void> serve_hello(const std::shared_ptr<sharer_impl>& self,
                                             const std::shared_ptr<sharer_connection>& conn,
                                             connection_reader& reader, std::span<const std::byte> first) {
        std::error_code ec;
        const native::message hello_msg = native::decode(first, ec);
        if (ec || !std::holds_alternative<native::hello>(hello_msg)) {
            self->count(&sharer_stats::protocol_errors);
            co_await send_error(conn->socket, native::error_code_value::malformed, "malformed HELLO");
            co_return;
        }
        const auto& hello = std::get<native::hello>(hello_msg);
        if (hello.min_version > quick::max_version || hello.max_version < native::protocol_version) {
            co_await send_error(conn->socket, native::error_code_value::unsupported_version,
                                "this server speaks versions 1 and 2");
            co_return;
        }
        const std::uint16_t version = std::min<std::uint16_t>(hello.max_version, quick::max_version);
        reply_writer w(version >= 2);
        native::append_frame(w.bytes(), native::hello_ack{version, self->options_.max_in_flight,
                                                          self->options_.max_frame_size});
        co_await native_session(self, conn, reader, w, std::nullopt);
    }

    static asio::awaitable<void> serve_quick(const std::shared_ptr<sharer_impl>& self,
                                             const std::shared_ptr<sharer_connection>& conn,
                                             connection_reader& reader, std::span<const std::byte> payload) {
        std::error_code ec;
        const quick::request q = quick::decode_request(self->key_, payload, ec);
        if (ec) {
            self->count(&sharer_stats::refused_auth);
            co_await send_error(
                conn->socket, static_cast<native::error_code_value>(quick::error_authentication_failed),
                ec == errc::authentication_failed ? "authentication failed" : "malformed QUICK");
            co_return;
        }
        if (q.min_version > quick::max_version || q.max_version < 2) {
            co_await send_error(conn->socket, native::error_code_value::unsupported_version,
                                "quick connect needs version 2");
            co_return;
        }
        conn->last_activity = clock::now();
        // QUICK_ACK and the reply to the embedded FETCH leave in one sendmsg.
        reply_writer w(true);
        quick::append_ack_frame(
            w.bytes(), self->key_, q.client_nonce,
            native::hello_ack{2, self->options_.max_in_flight, self->options_.max_frame_size});
        co_await native_session(self, conn, reader, w, q.first_fetch);
    }

    static asio::awaitable<void> native_session(const std::shared_ptr<sharer_impl>& self,
                                                const std::shared_ptr<sharer_connection>& conn,
                                                connection_reader& reader, reply_writer& w,
                                                std::optional<native::fetch> first_fetch) {
        std::uint64_t last_id = 0;
        std::vector<native::fetch> fetches;
        std::vector<fetch_outcome> outcomes;
        if (first_fetch) {
            last_id = first_fetch->request_id;
            fetches.push_back(*first_fetch);
        }
        std::error_code ec;
        const auto before_wait = [&self, &conn] {
            // Only a connection with nothing unconfirmed can be idle; arming costs a timer, so a
            // connection that is served without ever waiting idle never arms it.
            if (!conn->idle_armed && conn->unconfirmed.empty()) arm_idle(self, conn);
        };
        for (;;) {
            // Everything already buffered is one pass: its replies are written together.
            if (!reader.has_whole_frame()) {
                if (!co_await serve_pass(self, conn, w, fetches, outcomes)) {
                    drain_confirmations(self, conn, reader);
                    co_return;
                }
            }
            std::span<const std::byte> payload;
            ec = co_await reader.next_frame(conn->socket, payload, before_wait);
            if (ec) {
                note_read_error(self, ec);
                if (ec == errc::limit_exceeded)
                    co_await send_error(conn->socket, native::error_code_value::limit_exceeded,
                                        "frame too large");
                co_return;
            }
            for (;;) {
                native::message msg = native::decode(payload, ec);
                if (ec) {
                    self->count(&sharer_stats::protocol_errors);
                    (void)co_await serve_pass(self, conn, w, fetches, outcomes);
                    co_await send_error(conn->socket, native::error_code_value::malformed, "malformed frame");
                    co_return;
                }
                if (auto* f = std::get_if<native::fetch>(&msg)) {
                    if (f->request_id <= last_id) {
                        self->count(&sharer_stats::protocol_errors);
                        (void)co_await serve_pass(self, conn, w, fetches, outcomes);
                        co_await send_error(conn->socket, native::error_code_value::protocol_violation,
                                            "request ids must increase");
                        co_return;
                    }
                    last_id = f->request_id;
                    fetches.push_back(*f);
                } else if (auto* c = std::get_if<native::confirm>(&msg)) {
                    confirm(self, *conn, *c);
                } else if (auto* g = std::get_if<native::give_back>(&msg)) {
                    auto it = std::find_if(
                        conn->unconfirmed.begin(), conn->unconfirmed.end(),
                        [id = g->request_id](const taken_share& t) { return t.request_id == id; });
                    if (it != conn->unconfirmed.end()) {
                        taken_share t = std::move(*it);
                        conn->unconfirmed.erase(it);
                        self->put_back(std::move(t), conn->generation);
                    }
                } else if (std::holds_alternative<native::error>(msg)) {
                    co_return;
                } else {
                    self->count(&sharer_stats::protocol_errors);
                    (void)co_await serve_pass(self, conn, w, fetches, outcomes);
                    co_await send_error(conn->socket, native::error_code_value::protocol_violation,
                                        "unexpected message");
                    co_return;
                }
                if (!reader.pop_frame(payload, ec)) break;
            }
            conn->last_activity = clock::now();
            // A frame error found while popping is reported by the next next_frame().
        }
    }

    // A write failed (the peer is gone): the CONFIRM and GIVE_BACK frames it wrote before are
    // still queued here, and what they confirm must not be put back (and delivered again).
    static void drain_confirmations(const std::shared_ptr<sharer_impl>& self,
                                    const std::shared_ptr<sharer_connection>& conn,
                                    connection_reader& reader) {
        for (;;) {
            std::span<const std::byte> payload;
            std::error_code ec;
            while (reader.pop_frame(payload, ec)) {
                const native::message msg = native::decode(payload, ec);
                if (ec) return;
                if (const auto* c = std::get_if<native::confirm>(&msg)) {
                    confirm(self, *conn, *c);
                } else if (const auto* g = std::get_if<native::give_back>(&msg)) {
                    const auto it = find_unconfirmed(*conn, g->request_id);
                    if (it == conn->unconfirmed.end()) continue;
                    taken_share t = std::move(*it);
                    conn->unconfirmed.erase(it);
                    self->put_back(std::move(t), conn->generation);
                }
            }
            if (ec) return;
            reader.make_room();
            if (reader.try_receive(conn->socket)) return;  // drained (EAGAIN), EOF or reset
        }
    }

    static void confirm(const std::shared_ptr<sharer_impl>& self, sharer_connection& conn,
                        const native::confirm& c) {
        // The cumulative part under one lock; the descriptors are closed after it.
        std::size_t covered = 0;
        while (covered < conn.unconfirmed.size() && conn.unconfirmed[covered].request_id <= c.up_to)
            ++covered;
        if (covered != 0) self->delivered_prefix(conn, covered);
        for (std::uint64_t id : c.ids) {
            auto it = std::find_if(conn.unconfirmed.begin(), conn.unconfirmed.end(),
                                   [id](const taken_share& t) { return t.request_id == id; });
            if (it == conn.unconfirmed.end()) continue;
            taken_share t = std::move(*it);
            conn.unconfirmed.erase(it);
            self->delivered(t, conn.generation);
        }
    }

    static asio::awaitable<void> stop_coro(std::shared_ptr<sharer_impl> self, clock::duration timeout) {
        const auto deadline = clock::now() + timeout;
        std::vector<std::shared_ptr<sharer_connection>> conns;
        std::vector<sharer_stop_handler> waiters;
        std::unordered_map<share_key, share_entry> doomed;
        {
            std::lock_guard lock(self->mutex_);
            self->stopped_ = true;
            std::error_code ignored;
            if (self->acceptor_) self->acceptor_->close(ignored);
            self->listener_fd_ = -1;
            self->remove_socket_locked();
            if (self->sweep_timer_) self->sweep_timer_->cancel();
            doomed.swap(self->cache_);
            conns.assign(self->connections_.begin(), self->connections_.end());
        }
        doomed.clear();
        // Connections without a transfer in flight go at once; the others get until the deadline
        // for their confirmations.
        std::error_code ignored;
        for (;;) {
            bool busy = false;
            for (auto& c : conns) {
                if (!c->socket.is_open()) continue;
                if (c->unconfirmed.empty()) {
                    ::shutdown(c->socket.native_handle(), SHUT_RDWR);
                    c->socket.cancel(ignored);
                } else {
                    busy = true;
                }
            }
            if (!busy || clock::now() >= deadline) break;
            const asio::any_io_executor ex = co_await asio::this_coro::executor;
            asio::steady_timer t(
                ex, std::min<clock::duration>(std::chrono::milliseconds(5), deadline - clock::now()));
            co_await t.async_wait(use_tuple);
        }
        for (auto& c : conns) {
            c->socket.close(ignored);
            // Unconfirmed copies are closed now (put_back after stop closes instead of caching).
            c->unconfirmed.clear();
        }
        {
            std::lock_guard lock(self->mutex_);
            self->in_transfer_.clear();
            waiters = std::move(self->empty_waiters_);
            self->empty_waiters_.clear();
        }
        self->notify_empty(std::move(waiters), asio::error::operation_aborted);
    }

    sharer_options options_;
    authkey key_;

    mutable std::mutex mutex_;
    std::optional<asio::any_io_executor> user_executor_;
    std::optional<strand_type> strand_;
    std::unique_ptr<asio::io_context> background_ctx_;
    std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> work_guard_;
    std::unique_ptr<std::thread> background_thread_;
    std::thread::id background_thread_id_;
    bool background_wanted_ = false;

    std::uint64_t owner_process_ = io::process_generation();  // a fork() changes it: see check_fork_locked
    std::uint64_t generation_ = 0;
    bool stopped_ = false;
    std::string dir_;
    std::string path_;
    int listener_fd_ = -1;
    std::unique_ptr<acceptor_type> acceptor_;
    std::unique_ptr<asio::steady_timer> sweep_timer_;
    bool sweep_armed_ = false;
    clock::time_point sweep_at_{};

    std::unordered_map<share_key, share_entry> cache_;
    std::unordered_map<share_key, bool> in_transfer_;  // value: revoked while in transfer
    std::unordered_set<std::shared_ptr<sharer_connection>> connections_;
    // The connections still in their handshake, in accept order (the eviction order).
    std::list<std::shared_ptr<sharer_connection>> handshaking_;
    std::vector<sharer_stop_handler> empty_waiters_;
    sharer_stats stats_;
};

void start_sharer_stop(const std::shared_ptr<sharer_impl>& impl, clock::duration timeout,
                       sharer_stop_handler handler) {
    if (!impl) {
        complete_later({}, std::move(handler), {});
        return;
    }
    impl->start_stop(timeout, std::move(handler));
}

void start_sharer_wait_empty(const std::shared_ptr<sharer_impl>& impl, sharer_stop_handler handler) {
    if (!impl) {
        complete_later({}, std::move(handler), asio::error::operation_aborted);
        return;
    }
    impl->wait_empty(std::move(handler));
}

}  // namespace steward::detail

namespace steward {

sharer::sharer(asio::any_io_executor executor, sharer_options options)
    : impl_(std::make_shared<detail::sharer_impl>(std::move(executor), std::move(options))) {}

sharer::sharer(sharer_options options)
    : impl_(std::make_shared<detail::sharer_impl>(std::nullopt, std::move(options))) {}

sharer::sharer(sharer&&) noexcept = default;

sharer& sharer::operator=(sharer&& other) noexcept {
    if (this != &other) {
        if (impl_) impl_->destroy();
        impl_ = std::move(other.impl_);
    }
    return *this;
}

sharer::~sharer() {
    if (impl_) impl_->destroy();
}

void sharer::start_background() {
    if (!impl_) throw std::logic_error("steward::sharer: moved-from");
    impl_->start_background();
}

asio::any_io_executor sharer::get_executor() const {
    return impl_ ? impl_->executor() : asio::any_io_executor{};
}

share_id sharer::share(int fd, share_options options) {
    std::error_code ec;
    share_id id = share(fd, ec, std::move(options));
    throw_if(ec, "steward::sharer::share");
    return id;
}

share_id sharer::share(int fd, std::error_code& ec, share_options options) noexcept {
    return share(std::span<const int>(&fd, 1), ec, std::move(options));
}

share_id sharer::share(std::span<const int> fds, share_options options) {
    std::error_code ec;
    share_id id = share(fds, ec, std::move(options));
    throw_if(ec, "steward::sharer::share");
    return id;
}

share_id sharer::share(std::span<const int> fds, std::error_code& ec, share_options options) noexcept {
    if (!impl_) {
        ec = std::make_error_code(std::errc::operation_not_permitted);
        return {};
    }
    return impl_->share(fds, options, ec);
}

bool sharer::revoke(const share_id& id) noexcept {
    return impl_ && impl_->revoke(id);
}

std::size_t sharer::pending() const noexcept {
    return impl_ ? impl_->pending() : 0;
}

sharer_stats sharer::stats() const noexcept {
    return impl_ ? impl_->stats() : sharer_stats{};
}

std::string sharer::address() const {
    return impl_ ? impl_->address() : std::string{};
}

void sharer::stop(std::chrono::steady_clock::duration timeout) noexcept {
    if (impl_) impl_->stop_blocking(timeout);
}

}  // namespace steward
