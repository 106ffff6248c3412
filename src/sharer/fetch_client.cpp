// The native client: one authenticated connection per (io_context, server address, authkey),
// shared by every fetch on that context, requests pipelined with ids, confirmations batched,
// writes coalesced. All connection state lives on the connection's strand.

#include <steward/fetch.hpp>
#include <steward/io/backend_probe.hpp>

#include <steward/error.hpp>
#include <steward/io/detail/scm_rights.hpp>
#include <steward/io/process_generation.hpp>

#include "sharer/dedicated_fetch.hpp"
#include "sharer/fetch_connect.hpp"
#include "sharer/handshake_driver.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/native_stream.hpp"
#include "sharer/quick_connect.hpp"
#include "sharer/random.hpp"
#include "sharer/sharer_handshake.hpp"
#include "sharer/sharer_wire.hpp"

#include <asio/append.hpp>
#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/dispatch.hpp>
#include <asio/execution_context.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <optional>

namespace steward::detail {
namespace {

using clock = std::chrono::steady_clock;
using strand_type = asio::strand<asio::any_io_executor>;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t max_address = 107;
// A pooled connection unused for this long is closed instead of reused (the server closes idle
// connections too, after its own, longer timeout).
constexpr clock::duration client_idle_timeout = std::chrono::seconds(10);
constexpr std::size_t read_chunk = 16 * 1024;
// HELLO's max_version on the full-handshake path (version 2: the server coalesces replies).
constexpr std::uint16_t client_max_version = quick::max_version;

// The clock read once per fetch: deadlines of seconds and the pool's idle check need no better
// than the kernel tick, and the coarse clock is several times cheaper to read.
clock::time_point coarse_now() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return clock::time_point(std::chrono::duration_cast<clock::duration>(
        std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec)));
}

void complete(fetch_handler& h, std::error_code ec, std::vector<unique_fd> fds) {
    // Through the handler's associated executor (inline when that is the running one).
    asio::dispatch(asio::append(std::move(h), ec, std::move(fds)));
}

class fetch_service;

class fetch_connection : public std::enable_shared_from_this<fetch_connection> {
public:
    struct request {
        std::uint64_t id = 0;
        share_key key;
        clock::time_point deadline;
        fetch_handler handler;  // empty once completed early (cancelled, timed out)
        clock::duration reply_timeout{};
        clock::duration handshake_timeout{};
        std::uint64_t serial = 0;  // names it for cancellation
    };

    fetch_connection(const asio::any_io_executor& ex, std::string address, const authkey& key)
        : strand_(asio::make_strand(ex)),
          socket_(strand_),
          timer_(strand_),
          address_(std::move(address)),
          key_(key),
          control_(io::detail::scm_rights_control::for_receive()) {
        out_.reserve(4096);
        sending_.reserve(4096);
    }

    const std::string& address() const noexcept { return address_; }
    const authkey& key() const noexcept { return key_; }

    // Thread-safe (called under the service's mutex): may a new fetch use this connection?
    bool usable(clock::time_point now) const noexcept {
        return !dead_.load(std::memory_order_acquire) &&
               clock::time_point(clock::duration(last_used_.load(std::memory_order_relaxed))) +
                       client_idle_timeout >
                   now;
    }

    void touch(clock::time_point now) noexcept {
        last_used_.store(now.time_since_epoch().count(), std::memory_order_relaxed);
    }

    void start(clock::duration handshake_timeout) {
        touch(clock::now());
        asio::co_spawn(strand_, setup(shared_from_this(), handshake_timeout), asio::detached);
    }

    // Runs on the strand.
    const strand_type& strand() const noexcept { return strand_; }

    void submit(request r) {
        if (state_ == state::dead) {
            finish(r, dead_error_ ? dead_error_ : std::make_error_code(std::errc::connection_reset));
            return;
        }
        attach_cancellation(r);
        // Until it is sent, a request is bounded by the session set-up plus its reply time.
        r.deadline = coarse_now() + r.handshake_timeout + r.reply_timeout;
        waiting_.push_back(std::move(r));
        if (state_ == state::ready || state_ == state::hello_sent || state_ == state::quick_sent)
            send_waiting();
        else
            arm_timer();
    }

    // Drops everything without running any handler (the io_context is shutting down).
    void shutdown() {
        dead_.store(true);
        waiting_.clear();
        in_flight_.clear();
        std::error_code ignored;
        socket_.close(ignored);
        timer_.cancel();
    }

private:
    enum class state { connecting, quick_sent, hello_sent, ready, dead };

    void attach_cancellation(request& r) {
        auto slot = asio::get_associated_cancellation_slot(r.handler);
        if (!slot.is_connected()) return;
        r.serial = ++serial_;
        slot.assign(
            [weak = weak_from_this(), strand = strand_, serial = r.serial](asio::cancellation_type type) {
                if ((type & asio::cancellation_type::terminal) == asio::cancellation_type::none) return;
                asio::post(strand, [weak, serial] {
                    if (auto self = weak.lock()) self->cancel(serial);
                });
            });
    }

    static void finish(request& r, std::error_code ec, std::vector<unique_fd> fds = {}) {
        if (!r.handler) return;
        auto slot = asio::get_associated_cancellation_slot(r.handler);
        if (slot.is_connected()) slot.clear();
        fetch_handler h = std::move(r.handler);
        r.handler = fetch_handler();
        complete(h, ec, std::move(fds));
    }

    void cancel(std::uint64_t serial) {
        auto match = [serial](const request& r) { return r.serial == serial && r.handler; };
        // Not yet sent: simply forget it. Sent: the reply, when it comes, is given back.
        if (auto it = std::find_if(waiting_.begin(), waiting_.end(), match); it != waiting_.end()) {
            finish(*it, asio::error::operation_aborted);
            waiting_.erase(it);
        } else if (auto jt = std::find_if(in_flight_.begin(), in_flight_.end(), match);
                   jt != in_flight_.end()) {
            finish(*jt, asio::error::operation_aborted);
        }
    }

    void send_waiting() {
        if (state_ == state::quick_sent) {
            // Further requests wait for QUICK_ACK.
            schedule_flush();
            arm_timer();
            return;
        }
        if (!waiting_.empty()) {
            const auto now = clock::now();
            while (!waiting_.empty() && in_flight_.size() < max_in_flight_) {
                request r = std::move(waiting_.front());
                waiting_.pop_front();
                if (!r.handler) continue;
                r.id = next_id_++;
                r.deadline = now + r.reply_timeout;
                const std::size_t at = out_.size();
                out_.resize(at + wire::fetch_frame_size);
                wire::put_fetch(out_.data() + at, r.id, r.key);
                in_flight_.push_back(std::move(r));
            }
        }
        schedule_flush();
        ensure_reader();
        arm_timer();
    }

    void schedule_flush() {
        if (flush_scheduled_ || writing_ || out_.empty()) return;
        flush_scheduled_ = true;
        // Posted, so every request submitted in this round goes out in one send.
        asio::post(strand_, [self = shared_from_this()] {
            self->flush_scheduled_ = false;
            self->flush();
        });
    }

    void flush() {
        if (state_ == state::dead) return;
        for (;;) {
            if (sending_.empty()) {
                if (out_.empty()) {
                    writing_ = false;
                    return;
                }
                sending_.swap(out_);
                sent_ = 0;
            }
            while (sent_ < sending_.size()) {
                const wire::attempt r =
                    wire::send_with_fds(socket_.native_handle(), std::span(sending_).subspan(sent_), {});
                if (r.err == EAGAIN) {
                    writing_ = true;
                    socket_.async_wait(asio::socket_base::wait_write,
                                       [self = shared_from_this()](std::error_code ec) {
                                           if (ec) return self->fail(wire::normalize(ec));
                                           self->flush();
                                       });
                    return;
                }
                if (r.err) {
                    if (state_ == state::quick_sent) {
                        // The server closed at once; what it wrote first (an ERROR saying why)
                        // is still readable: the reader reports that, or the close.
                        ::shutdown(socket_.native_handle(), SHUT_WR);
                        out_.clear();
                        sending_.clear();
                        writing_ = false;
                        return;
                    }
                    return fail(r.err == EPIPE ? std::make_error_code(std::errc::connection_reset)
                                               : errno_code(r.err));
                }
                sent_ += r.bytes;
            }
            sending_.clear();
        }
    }

    void ensure_reader() {
        if (reader_running_ || state_ == state::dead) return;
        reader_running_ = true;
        asio::co_spawn(strand_, reader(shared_from_this()), asio::detached);
    }

    // One timer for the reply deadlines of the requests in flight; not armed while nothing is in
    // flight, so an idle pooled connection keeps no work on the io_context.
    void arm_timer() {
        if (timer_armed_ || state_ == state::dead) return;
        std::optional<clock::time_point> next;
        for (const auto* q : {&in_flight_, &waiting_})
            for (const request& r : *q)
                if (r.handler && (!next || r.deadline < *next)) next = r.deadline;
        if (!next) return;
        timer_armed_ = true;
        timer_.expires_at(*next);
        timer_.async_wait([self = shared_from_this()](std::error_code ec) {
            self->timer_armed_ = false;
            if (ec || self->state_ == state::dead) return;
            const auto now = clock::now();
            for (auto* q : {&self->in_flight_, &self->waiting_})
                for (auto& r : *q)
                    if (r.handler && r.deadline <= now) finish(r, errc::timed_out);
            std::erase_if(self->waiting_, [](const request& r) { return !r.handler; });
            self->arm_timer();
        });
    }

    void disarm_timer_if_idle() {
        if (!timer_armed_) return;
        auto live = [](const request& r) { return static_cast<bool>(r.handler); };
        if (std::none_of(in_flight_.begin(), in_flight_.end(), live) &&
            std::none_of(waiting_.begin(), waiting_.end(), live))
            timer_.cancel();
    }

    void fail(std::error_code ec) {
        if (state_ == state::dead) return;
        state_ = state::dead;
        dead_.store(true, std::memory_order_release);
        dead_error_ = ec;
        std::error_code ignored;
        socket_.close(ignored);
        timer_.cancel();
        auto fail_queue = [&](std::deque<request>& q) {
            std::deque<request> doomed;
            doomed.swap(q);
            for (auto& r : doomed) finish(r, ec);
        };
        fail_queue(in_flight_);
        fail_queue(waiting_);
        out_.clear();
        sending_.clear();
    }

    static asio::awaitable<void> setup(std::shared_ptr<fetch_connection> self,
                                       clock::duration handshake_timeout) {
        std::error_code ec = io::io_uring_status();  // cached per process
        if (ec) co_return self->fail(ec);
        asio::steady_timer connect_pause(self->socket_.get_executor());
        ec = co_await client::connect(self->socket_, self->address_, handshake_timeout, connect_pause,
                                      [&self] { return self->state_ == state::dead; });
        if (ec) co_return self->fail(ec);
        if (self->state_ == state::dead) co_return;
        uid_t server_uid = 0;
        ec = client::peer_uid(self->socket_.native_handle(), server_uid);
        if (ec) co_return self->fail(ec);
        if (quick::peer_allows_quick(server_uid)) {
            // Quick connect: QUICK (with the first request) goes out at once; the session starts
            // when QUICK_ACK verifies (see reader()).
            quick::nonce nonce{};
            fill_random_buffered(nonce, ec);
            if (ec) co_return self->fail(ec);
            quick::request q;
            q.client_nonce = nonce;
            while (!self->waiting_.empty() && !self->waiting_.front().handler) self->waiting_.pop_front();
            if (!self->waiting_.empty()) {
                request r = std::move(self->waiting_.front());
                self->waiting_.pop_front();
                r.id = self->next_id_++;
                r.deadline = clock::now() + r.handshake_timeout + r.reply_timeout;
                q.first_fetch = native::fetch{r.id, r.key};
                self->in_flight_.push_back(std::move(r));
            }
            quick::append_request_frame(self->out_, self->key_, q);
            self->ack_.emplace(self->key_, nonce);
            self->state_ = state::quick_sent;
            self->schedule_flush();
            self->ensure_reader();
            self->arm_timer();
            co_return;
        }
        ec = co_await fast_handshake::run(self->socket_, auth::handshake::role::client, self->key_,
                                          handshake_timeout, self);
        if (ec) {
            // A server that refuses the peer (uid) closes before its challenge.
            if (ec == asio::error::eof || ec == asio::error::connection_reset ||
                ec == asio::error::broken_pipe)
                ec = errc::authentication_failed;
            co_return self->fail(wire::normalize(ec));
        }
        if (self->state_ == state::dead) co_return;
        native::append_frame(self->out_, native::hello{1, client_max_version, 0});
        self->state_ = state::hello_sent;
        // Every server allows at least one request in flight: the first FETCH rides with HELLO
        // instead of waiting a round trip for HELLO_ACK.
        self->send_waiting();
        self->schedule_flush();
        self->ensure_reader();
    }

    // Before QUICK_ACK: the read's bytes go to the ack reader (nothing is decoded, no descriptor
    // accepted until its MAC verified). Returns false when the connection failed.
    bool feed_ack(std::span<const std::byte> bytes, std::vector<unique_fd>& batch, bool truncated) {
        if (!batch.empty()) {
            if (!held_.empty()) {
                fail(errc::malformed_message);
                return false;
            }
            held_ = std::move(batch);
            batch = std::vector<unique_fd>();
        }
        switch (ack_->feed(bytes)) {
            case quick::ack_reader::state::need_more:
                return true;
            case quick::ack_reader::state::failed:
                fail(ack_->error());
                return false;
            case quick::ack_reader::state::acked:
                break;
        }
        state_ = state::ready;
        max_in_flight_ = std::max<std::uint32_t>(1, ack_->ack().max_in_flight);
        decoder_.set_version(ack_->ack().version);
        const auto rest = ack_->rest();
        if (rest.empty() && !held_.empty()) {
            fail(errc::malformed_message);
            return false;
        }
        if (!rest.empty()) {
            const std::span<std::byte> dst = decoder_.prepare(rest.size());
            std::memcpy(dst.data(), rest.data(), rest.size());
            decoder_.commit(rest.size(), std::move(held_), truncated);
            held_ = std::vector<unique_fd>();
        }
        ack_.reset();
        return true;
    }

    // Delivered replies are collected over consecutive reads (each read returns one reply: the
    // kernel never merges descriptor batches) and settled together when the socket has nothing
    // more or a batch is full: one CONFIRM for all of them, written before their handlers run,
    // so that a caller that tears down its io_context right after its fetch completed does not
    // leave the delivery unconfirmed (the server would offer the share again).
    static constexpr std::size_t settle_batch = 32;

    bool settle() {
        const bool had = !delivered_.empty() || !confirmed_.empty();
        if (state_ != state::dead) send_confirmations();
        complete_delivered();
        if (state_ == state::dead) return had;
        send_waiting();
        disarm_timer_if_idle();
        return had;
    }

    static asio::awaitable<void> reader(std::shared_ptr<fetch_connection> self) {
        std::vector<unique_fd> batch;
        for (;;) {
            if (self->state_ == state::dead) break;
            if (self->state_ == state::ready && self->in_flight_.empty() && !self->assembler_.in_progress() &&
                self->decoder_.buffered() == 0) {
                if (self->settle()) continue;
                break;  // nothing expected: no pending read keeps the io_context busy
            }
            const bool before_ack = self->state_ == state::quick_sent;
            const std::span<std::byte> room =
                before_ack ? std::span<std::byte>(self->ack_buffer_) : self->decoder_.prepare(read_chunk);
            batch.clear();
            const io::detail::attempt_result r = io::detail::recv_attempt(
                self->socket_.native_handle(), asio::buffer(room.data(), room.size()), self->control_,
                io::detail::socket_kind::stream, batch);
            if (r.would_block) {
                if (self->settle()) continue;
                auto [ec] = co_await self->socket_.async_wait(asio::socket_base::wait_read, use_tuple);
                // A wait that reports the peer's reset: what it wrote before is still readable,
                // and the next read reports the reset itself.
                if (ec == asio::error::operation_aborted || !self->socket_.is_open()) {
                    self->fail(wire::normalize(ec));
                    break;
                }
                continue;
            }
            const bool truncated = r.ec == errc::control_truncated;
            if ((r.ec && !truncated && r.ec != errc::unexpected_control) || r.bytes == 0) {
                // Closed after the handshake but before HELLO_ACK: the server refused this
                // process. Before QUICK_ACK a refusing server says so (ERROR); a bare close is a
                // lost connection (e.g. the server died).
                self->fail(self->state_ == state::hello_sent ? make_error_code(errc::authentication_failed)
                           : r.ec == asio::error::eof || r.bytes == 0
                               ? std::make_error_code(std::errc::connection_reset)
                               : wire::normalize(r.ec));
                break;
            }
            if (before_ack) {
                if (!self->feed_ack(room.first(r.bytes), batch, truncated)) break;
                if (self->state_ == state::quick_sent) continue;
                self->send_waiting();
            } else {
                self->decoder_.commit(r.bytes, std::move(batch), truncated);
                batch = std::vector<unique_fd>();
            }
            std::error_code ec;
            while (auto ev = self->decoder_.next(ec)) {
                self->handle(std::move(*ev));
                if (self->state_ == state::dead) break;
            }
            if (ec && self->state_ != state::dead) self->fail(ec);
            if (self->state_ == state::dead) break;
            if (self->delivered_.size() >= settle_batch)
                self->settle();
            else
                self->send_waiting();
        }
        self->settle();  // a dead connection still hands over what arrived whole
        self->reader_running_ = false;
    }

    void handle(native::stream_decoder::event ev) {
        if (auto* ack = std::get_if<native::hello_ack>(&ev.msg)) {
            if (state_ != state::hello_sent) return fail(errc::malformed_message);
            state_ = state::ready;
            max_in_flight_ = std::max<std::uint32_t>(1, ack->max_in_flight);
            decoder_.set_version(ack->version);
            return;
        }
        if (auto* part = std::get_if<native::reply>(&ev.msg)) {
            if (state_ != state::ready) return fail(errc::malformed_message);
            std::error_code ec;
            auto done = assembler_.add(*part, std::move(ev.fds), ev.truncated, ec);
            if (ec) return fail(ec);
            if (!done) return;
            auto it = std::find_if(in_flight_.begin(), in_flight_.end(),
                                   [id = done->request_id](const request& r) { return r.id == id; });
            if (it == in_flight_.end()) return fail(errc::malformed_message);
            request r = std::move(*it);
            in_flight_.erase(it);
            switch (done->status) {
                case native::reply_status::ok:
                    if (done->error) {
                        give_back(r.id, native::give_back_reason::control_truncated);
                        finish(r, done->error);
                    } else if (!r.handler) {
                        // Nobody wants it any more (cancelled, timed out): back to the server.
                        done->fds.clear();
                        give_back(r.id, native::give_back_reason::other);
                    } else {
                        // Completed after the CONFIRM is written (see reader()).
                        confirmed_.push_back(r.id);
                        delivered_.push_back(delivered_reply{std::move(r), std::move(done->fds)});
                    }
                    return;
                case native::reply_status::not_available:
                    finish(r, errc::share_not_available);
                    return;
                case native::reply_status::busy:
                    if (r.handler) waiting_.push_front(std::move(r));
                    return;
                case native::reply_status::server_error:
                    finish(r, errc::limit_exceeded);
                    return;
            }
            return fail(errc::malformed_message);
        }
        if (auto* err = std::get_if<native::error>(&ev.msg)) {
            if (static_cast<std::uint16_t>(err->code) == quick::error_authentication_failed)
                return fail(errc::authentication_failed);
            return fail(err->code == native::error_code_value::limit_exceeded
                            ? std::error_code(errc::limit_exceeded)
                            : std::make_error_code(std::errc::connection_reset));
        }
        fail(errc::malformed_message);
    }

    void complete_delivered() {
        if (delivered_.empty()) return;
        std::vector<delivered_reply> ready;
        ready.swap(delivered_);
        for (auto& d : ready) finish(d.r, {}, std::move(d.fds));
        ready.clear();
        if (delivered_.empty()) delivered_.swap(ready);  // keep the capacity
    }

    void give_back(std::uint64_t id, native::give_back_reason reason) {
        // A GIVE_BACK must precede any CONFIRM whose up_to covers it: confirmations collected so
        // far only name ids that were delivered, and they are written after this.
        native::append_frame(out_, native::give_back{id, reason});
    }

    void send_confirmations() {
        if (confirmed_.empty()) return;
        // up_to may only cover ids that are not still in flight (a later GIVE_BACK for one of
        // them would come after a CONFIRM covering it).
        const std::uint64_t floor = in_flight_.empty() ? ~std::uint64_t{0} : in_flight_.front().id;
        native::confirm c;
        for (std::uint64_t id : confirmed_) {
            if (id < floor)
                c.up_to = std::max(c.up_to, id);
            else
                c.ids.push_back(id);
        }
        confirmed_.clear();
        // Ids below up_to that were refused or given back are not "delivered": the server ignores them.
        if (c.ids.size() > native::max_confirm_ids)
            c.ids.resize(native::max_confirm_ids);  // never in practice
        if (c.ids.empty()) {
            const std::size_t at = out_.size();
            out_.resize(at + 4 + 13);
            std::byte* p = wire::put_be<std::uint32_t>(out_.data() + at, 13);
            p = wire::put_u8(p, static_cast<std::uint8_t>(native::msg_type::confirm));
            p = wire::put_be(p, c.up_to);
            wire::put_be<std::uint32_t>(p, 0);
        } else {
            native::append_frame(out_, c);
        }
        // Written now (not posted): see reader().
        if (!writing_) flush();
    }

    strand_type strand_;
    local_socket socket_;
    asio::steady_timer timer_;
    std::string address_;
    authkey key_;
    io::detail::scm_rights_control control_;
    native::stream_decoder decoder_;
    native::reply_assembler assembler_;
    std::optional<quick::ack_reader> ack_;  // until QUICK_ACK arrived
    std::array<std::byte, 1024> ack_buffer_{};
    std::vector<unique_fd> held_;  // descriptors that came before QUICK_ACK was complete

    state state_ = state::connecting;
    std::atomic<bool> dead_{false};
    std::atomic<clock::rep> last_used_{0};
    std::error_code dead_error_;
    std::deque<request> waiting_;
    std::deque<request> in_flight_;
    std::vector<std::uint64_t> confirmed_;
    struct delivered_reply {
        request r;
        std::vector<unique_fd> fds;
    };
    std::vector<delivered_reply> delivered_;
    std::uint64_t next_id_ = 1;
    std::uint32_t max_in_flight_ = 1;
    std::vector<std::byte> out_;
    std::vector<std::byte> sending_;
    std::size_t sent_ = 0;
    bool writing_ = false;
    bool flush_scheduled_ = false;
    bool reader_running_ = false;
    bool timer_armed_ = false;
    std::uint64_t serial_ = 0;
};

// Per execution context: the pool of connections, by address.
class fetch_service : public asio::execution_context::service {
public:
    using key_type = fetch_service;
    static inline asio::execution_context::id id;

    explicit fetch_service(asio::execution_context& ctx) : asio::execution_context::service(ctx) {
        generation.fetch_add(1, std::memory_order_acq_rel);
    }
    ~fetch_service() override { generation.fetch_add(1, std::memory_order_acq_rel); }
    fetch_service(const fetch_service&) = delete;
    fetch_service& operator=(const fetch_service&) = delete;

    // asio::use_service takes the registry's lock and walks its list on every call: the last
    // context's service is remembered per thread, valid while no fetch_service was created or
    // destroyed anywhere since (a new context may reuse a destroyed one's address).
    static fetch_service& of(asio::execution_context& ctx) {
        struct cached {
            asio::execution_context* ctx = nullptr;
            fetch_service* service = nullptr;
            std::uint64_t generation = 0;
        };
        thread_local cached last;
        const std::uint64_t now = generation.load(std::memory_order_acquire);
        if (last.ctx == &ctx && last.generation == now && last.service) return *last.service;
        fetch_service& s = asio::use_service<fetch_service>(ctx);
        last = cached{&ctx, &s, generation.load(std::memory_order_acquire)};
        return s;
    }

    std::shared_ptr<fetch_connection> connection_for(const asio::any_io_executor& ex,
                                                     const std::string& address, const authkey& family_key,
                                                     clock::duration handshake_timeout) {
        const auto now = coarse_now();
        std::shared_ptr<fetch_connection> created;
        {
            std::lock_guard lock(mutex_);
            // Dead or idle connections (to any server) are closed on their strands; an idle one
            // has no operation pending, so this is the moment it goes.
            if (pool_.size() > 1 || (!pool_.empty() && !pool_.begin()->second->usable(now))) {
                for (auto it = pool_.begin(); it != pool_.end();) {
                    if (it->second->usable(now)) {
                        ++it;
                        continue;
                    }
                    auto stale = std::move(it->second);
                    it = pool_.erase(it);
                    asio::post(stale->strand(), [stale] { stale->shutdown(); });
                }
            }
            if (last_ && last_->usable(now) && last_->key() == family_key && last_->address() == address) {
                last_->touch(now);
                return last_;
            }
            auto [first, last] = pool_.equal_range(address);
            for (auto it = first; it != last; ++it) {
                if (it->second->key() == family_key) {
                    it->second->touch(now);
                    last_ = it->second;
                    return it->second;
                }
            }
            created = std::make_shared<fetch_connection>(ex, address, family_key);
            pool_.emplace(address, created);
            last_ = created;
        }
        created->start(handshake_timeout);
        return created;
    }

    // Closes every pooled connection now (the caller is the only thread using the context).
    void close_all() { shutdown(); }

private:
    void shutdown() override {
        std::multimap<std::string, std::shared_ptr<fetch_connection>, std::less<>> pool;
        {
            std::lock_guard lock(mutex_);
            pool.swap(pool_);
            last_.reset();
        }
        for (auto& [a, c] : pool) c->shutdown();
    }

    static inline std::atomic<std::uint64_t> generation{0};
    std::mutex mutex_;
    std::multimap<std::string, std::shared_ptr<fetch_connection>, std::less<>> pool_;
    std::shared_ptr<fetch_connection> last_;  // the connection of the last fetch (in pool_ too)
};

}  // namespace

void start_fetch(const asio::any_io_executor& executor, const share_id& id, const fetch_options& options,
                 fetch_handler handler) {
    std::error_code refused;
    if (id.empty() || id.address().empty() || id.address()[0] != '/')
        refused = std::make_error_code(std::errc::invalid_argument);
    else if (id.address().size() > max_address)
        refused = std::make_error_code(std::errc::filename_too_long);
    if (refused) {
        asio::post(executor, asio::append(std::move(handler), refused, std::vector<unique_fd>{}));
        return;
    }
    try {
        const authkey& key = options.key ? *options.key : authkey::family();
        if (!options.pooled) {
            start_dedicated_fetch(executor, id, key, options, std::move(handler));
            return;
        }
        asio::execution_context& ctx = asio::query(executor, asio::execution::context);
        auto& service = fetch_service::of(ctx);
        auto conn = service.connection_for(executor, id.address(), key, options.handshake_timeout);
        fetch_connection::request r;
        r.key = id.key();
        r.reply_timeout = options.reply_timeout;
        r.handshake_timeout = options.handshake_timeout;
        r.handler = std::move(handler);
        const strand_type strand = conn->strand();
        asio::post(strand,
                   [conn = std::move(conn), r = std::move(r)]() mutable { conn->submit(std::move(r)); });
    } catch (const std::system_error& e) {
        if (handler)
            asio::post(executor, asio::append(std::move(handler), e.code(), std::vector<unique_fd>{}));
    }
}

}  // namespace steward::detail

namespace steward {

namespace {

// Blocking fetches run on one io_context per thread: creating and tearing down an io_uring per
// call costs more than a whole fetch. In a forked child the inherited context shares its ring
// with the parent: it is abandoned, never used or destroyed there.
asio::io_context& blocking_context() {
    struct holder {
        std::uint64_t process = 0;
        std::unique_ptr<asio::io_context> io;
    };
    thread_local holder h;
    if (h.io && h.process != io::process_generation()) (void)h.io.release();
    if (!h.io) {
        h.io = std::make_unique<asio::io_context>(1);
        h.process = io::process_generation();
        // The ring is created with the first I/O object: now, so that the thread's descriptor
        // count does not change at some later call.
        asio::local::stream_protocol::socket warm(*h.io);
    }
    return *h.io;
}

}  // namespace

std::vector<unique_fd> fetch(const share_id& id, std::error_code& ec, const fetch_options& options) noexcept {
    try {
        asio::io_context& ctx = blocking_context();
        ctx.restart();
        std::vector<unique_fd> out;
        bool done = false;
        ec = make_error_code(errc::timed_out);
        fetch_options dedicated = options;
        dedicated.pooled = false;
        async_fetch(
            ctx.get_executor(), id,
            [&](std::error_code result, std::vector<unique_fd> fds) {
                ec = result;
                out = std::move(fds);
                done = true;
            },
            dedicated);
        while (!done && ctx.run_one() != 0) {
        }
        // The connection is closed already (its CONFIRM written); let cancelled waits finish.
        while (ctx.poll() != 0) {
        }
        return out;
    } catch (const std::system_error& e) {
        ec = e.code();
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
    } catch (...) {
        ec = std::make_error_code(std::errc::io_error);
    }
    return {};
}

std::vector<unique_fd> fetch(const share_id& id, const fetch_options& options) {
    std::error_code ec;
    std::vector<unique_fd> fds = fetch(id, ec, options);
    throw_if(ec, "steward::fetch");
    return fds;
}

}  // namespace steward
